"""The `probe` verb: what a runtime needs to know about a host, in one answer.

Probe commands (each interpreter's version query, `docker version`, nvidia-smi) start side by
side and are collected at the end, so a probe costs about its slowest command. Interpreter
versions are remembered in ROOT/probe-cache.json, keyed by the real file's path, size and mtime.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess

from . import gpus as gpu_query
from . import leases
from .commands import communicate
from .jobstate import ACTIVE_STATES, all_states, boot_id, load_json, save_json_atomic
from .protocol import AGENT_VERSION, arg, verb

PROBE_TIMEOUT_S = 5.0
PYTHON_NAMES = ["python3"] + ["python3.%d" % minor for minor in range(8, 15)]
PYTHON_DIRS = ["/usr/bin", "/usr/local/bin", "/opt/homebrew/bin", "/opt/local/bin",
               "/opt/conda/bin", "~/.local/bin", "~/.pyenv/shims", "~/.pyenv/versions/*/bin",
               "~/miniconda3/bin", "~/anaconda3/bin"]
VERSION_SNIPPET = "import sys; print('%d.%d.%d' % sys.version_info[:3])"


@verb("probe", arg("--lease-dir", help="the host's lease folder: report its slots and queue"),
      arg("--slots", type=int, default=1, help="slots of a host without GPUs"))
def probe(args):
    pythons = start_python_probes(args.root)
    docker = start_command(["docker", "version", "--format", "{{.Server.Version}}"])
    gpus = gpu_query.start()  # GPUs and their compute apps (busy_pids), see agent/gpus.py
    result = {"agent_version": AGENT_VERSION, "hostname": socket.gethostname(),
              "os": os_info(), "root": args.root, "boot_id": boot_id(),
              "disk_free_bytes": disk_free(args.root), "load": load_average(),
              "cpu_count": os.cpu_count(), "mem_total_bytes": mem_total(),
              "uid": os.getuid(), "gid": os.getgid()}
    result["running_jobs"] = [state for state in all_states(args.root)
                              if state["state"] in ACTIVE_STATES]
    result["python"] = finish_python_probes(args.root, pythons)
    result["docker"] = docker_info(docker)
    result.update(gpu_query.finish(gpus))
    if args.lease_dir:
        result.update(slots_and_jobs(args.lease_dir, args.slots, result))
    return result


def slots_and_jobs(lease_dir, slots, result):
    """`slots` (one per GPU, else the inventory's) with every user's holders and queue, and
    `jobs`: those, plus this root's unfinished jobs that hold no lease (older launches)."""
    gpus = [g["index"] for g in result.get("gpus") or [] if g.get("index") is not None]
    busy = {g["index"] for g in result.get("gpus") or [] if g.get("busy_pids")}
    view = leases.slot_view(lease_dir, len(gpus) or max(1, slots), gpus, busy)
    jobs = [dict(j, state="running") for j in view["holders"]]
    jobs += [dict(j, state="queued") for j in view["queued"]]
    listed = {j["job_id"] for j in jobs}
    owner = leases.owner_name()
    jobs += [{"job_id": s["job_id"], "name": s.get("name"), "owner": owner,
              "state": s["state"]} for s in result["running_jobs"] if s["job_id"] not in listed]
    return {"slots": view, "jobs": jobs}


def start_command(argv):
    """Start a probe command (they run side by side); None when it is not installed."""
    if not (os.path.isabs(argv[0]) or shutil.which(argv[0])):
        return None
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError:
        return None


def finish_command(proc, timeout=PROBE_TIMEOUT_S):
    """(exit code, stdout, stderr) as text; exit code None when it ran past the timeout."""
    return communicate(proc, timeout)


def python_candidates():
    """Interpreter paths by name, from PATH then common folders; one path per real file."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    for pattern in PYTHON_DIRS:
        folders.extend(sorted(glob.glob(os.path.expanduser(pattern))))
    found, seen = [], set()
    for name in PYTHON_NAMES:
        for folder in folders:
            candidate = os.path.join(folder, name)
            if not folder or not os.path.isfile(candidate) or not os.access(candidate, os.X_OK):
                continue
            real = os.path.realpath(candidate)
            if real not in seen:
                seen.add(real)
                found.append(candidate)
    return found


def is_script(path):
    """Wrapper scripts (pyenv shims, ...) start with #!; their target shows up on its own."""
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"#!"
    except OSError:
        return True


def python_key(path):
    """What a cached version is valid for: the real file's path, size and mtime."""
    info = os.stat(path)
    return "%s:%d:%d" % (os.path.realpath(path), info.st_size, info.st_mtime_ns)


def load_version_cache(root):
    try:
        cache = load_json(os.path.join(root, "probe-cache.json"))
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def start_python_probes(root):
    """(path, cache key, cached version or the running version query) per interpreter: each
    interpreter is asked once, then remembered in ROOT/probe-cache.json."""
    cache, probes = load_version_cache(root), []
    for path in python_candidates():
        if is_script(path):
            continue
        key = python_key(path)
        if key in cache:
            probes.append((path, key, cache[key]))
        else:
            probes.append((path, key, start_command([path, "-I", "-S", "-c", VERSION_SNIPPET])))
    return probes


def finish_python_probes(root, probes):
    pythons, learned = [], {}
    for path, key, version in probes:
        if isinstance(version, subprocess.Popen):
            code, out, _ = finish_command(version)
            version = out.strip() if code == 0 and out.strip() else None
            if version:
                learned[key] = version
        if version:
            pythons.append({"path": path, "version": version})
    if learned and os.path.isdir(root):
        cache = load_version_cache(root)
        cache.update(learned)
        with contextlib.suppress(OSError):
            save_json_atomic(os.path.join(root, "probe-cache.json"), cache)
    return pythons


def docker_info(proc):
    if proc is None:
        return {"cli": False, "reachable": False, "server_version": None,
                "error": "there is no docker CLI on PATH",
                "hint": "install Docker (e.g. apt-get install docker.io) to use the docker runtime"}
    code, out, err = finish_command(proc)
    info = {"cli": True, "reachable": code == 0, "server_version": None, "error": None,
            "hint": None}
    if code == 0:
        info["server_version"] = out.strip() or None
    elif code is None:
        info.update(error="docker did not answer within %d s" % PROBE_TIMEOUT_S,
                    hint="check the Docker daemon (systemctl status docker)")
    elif "permission denied" in err.lower():
        info.update(error="permission denied on the Docker socket",
                    hint="add the user to the docker group (sudo usermod -aG docker USER), "
                         "then log in again")
    elif "cannot connect" in err.lower() or "is the docker daemon running" in err.lower():
        info.update(error="the Docker daemon is not running",
                    hint="start it (sudo systemctl start docker)")
    else:
        lines = err.strip().splitlines() or ["exit code %s" % code]
        info.update(error="docker version failed: " + lines[-1],
                    hint="run `docker version` on the host to see why")
    return info


def os_info():
    uname = os.uname()
    info = {"system": uname.sysname, "release": uname.release, "version": uname.version,
            "machine": uname.machine, "pretty_name": None}
    with contextlib.suppress(OSError):
        with open("/etc/os-release") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    info["pretty_name"] = line.split("=", 1)[1].strip().strip('"')
    return info


def disk_free(root):
    folder = root
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)  # ROOT may not exist yet: measure where it will be
    return shutil.disk_usage(folder).free


def load_average():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def mem_total():
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


