#!/usr/bin/env python3
"""cube agent: the only code that touches a host's files and processes.

One stdlib-only file, Python >= 3.8. The controller uploads it to ROOT/agent/<hash>/ and calls
`python3 cube_agent.py --root ROOT VERB [args]`; every verb answers one JSON object on stdout
(`logs` and `send` stream raw bytes). The controller also imports this module for the local side
of sync, so both directions share one implementation.
"""

import argparse
import base64
import io
import json
import os
import sys

AGENT_VERSION = 1


class AgentError(Exception):
    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message, self.hint = message, hint


# ---- jobs and probe (owner: jobs section) ---------------------------------------------------
# A job is a folder ROOT/jobs/<id>/ holding spec.json, state.json, output.log and supervisor.log.
# `launch` double-forks a detached supervisor (the `supervise` verb, in its own session with no
# SSH pipes) that runs the job's tasks in order, each in its own process group, appending their
# output to output.log and recording every transition in state.json. The supervisor holds an
# exclusive flock on supervisor.lock for its whole life, inherited from `launch` so there is no
# unguarded gap: an unfinished job whose lock is free has lost its supervisor and is "lost".
# Imports live here, not at the top, so the sections of this shared file never collide.

import contextlib
import csv
import datetime
import errno
import fcntl
import glob
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import traceback

STATE_VERSION = 1
FINAL_STATES = ("succeeded", "failed", "cancelled", "lost")
ACTIVE_STATES = ("pending", "running")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LAUNCH_WAIT_S = 30.0  # how long `launch` waits for the supervisor to report "running"
DEFAULT_GRACE_S = 10.0
PROBE_TIMEOUT_S = 5.0
PYTHON_NAMES = ["python3"] + ["python3.%d" % minor for minor in range(8, 15)]
PYTHON_DIRS = ["/usr/bin", "/usr/local/bin", "/opt/homebrew/bin", "/opt/local/bin",
               "/opt/conda/bin", "~/.local/bin", "~/.pyenv/shims", "~/.pyenv/versions/*/bin",
               "~/miniconda3/bin", "~/anaconda3/bin"]
VERSION_SNIPPET = "import sys; print('%d.%d.%d' % sys.version_info[:3])"


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def save_json_atomic(path, obj):
    """Temp file in the same folder, fsync, rename, fsync the folder: readers and crashes see the
    old file or the new one, never a torn one."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(obj, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_json(path):
    with open(path) as handle:
        return json.load(handle)


def boot_id():
    """Changes on every boot (Linux); None elsewhere, where the lock alone detects lost jobs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


# -- job folders and locks

def job_dir(root, job_id):
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise AgentError("job id %r is not valid." % (job_id,),
                         hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                              "or digit")
    return os.path.join(root, "jobs", job_id)


def existing_job_dir(root, job_id):
    path = job_dir(root, job_id)
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise AgentError("there is no job %r under %s." % (job_id, root),
                         hint="run `list-jobs` to see this host's jobs")
    return path


def try_lock(path):
    """An exclusive flock taken without waiting: its fd, or None when another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


@contextlib.contextmanager
def held_lock(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def supervisor_alive(path):
    fd = try_lock(os.path.join(path, "supervisor.lock"))
    if fd is None:
        return True
    os.close(fd)
    return False


def vanished_reason(path, state):
    """Why an unfinished job can no longer finish, or None while its supervisor lives."""
    current = boot_id()
    if state.get("boot_id") and current and state["boot_id"] != current:
        return "the host rebooted while the job ran"
    if not supervisor_alive(path):
        return "the job's supervisor ended without recording an end (killed, or out of memory)"
    return None


def with_log_size(path, state):
    try:
        state["log_bytes"] = os.path.getsize(os.path.join(path, "output.log"))
    except OSError:
        state["log_bytes"] = 0
    return state


def load_state(path):
    """state.json; an unfinished job whose supervisor is gone is reported, and persisted, as lost."""
    state = load_json(os.path.join(path, "state.json"))
    if state["state"] in ACTIVE_STATES:
        state = end_if_vanished(path, "lost")
    return with_log_size(path, state)


def end_if_vanished(path, final, error=None):
    """Under the state lock (one judge at a time), re-read the state and, if the job is still
    unfinished and its supervisor gone, persist it as `final`."""
    with held_lock(os.path.join(path, "state.lock")):
        state = load_json(os.path.join(path, "state.json"))
        reason = vanished_reason(path, state) if state["state"] in ACTIVE_STATES else None
        if reason:
            state.update(state=final, ended_at=utc_now(), error=error or reason)
            save_json_atomic(os.path.join(path, "state.json"), state)
        return state


def all_states(root):
    jobs_root = os.path.join(root, "jobs")
    names = sorted(os.listdir(jobs_root)) if os.path.isdir(jobs_root) else []
    states = []
    for name in names:
        path = os.path.join(jobs_root, name)
        if JOB_ID_RE.match(name) and os.path.isfile(os.path.join(path, "state.json")):
            states.append(load_state(path))
    return sorted(states, key=lambda state: state.get("created_at") or "")


# -- the job spec

def spec_error(message):
    return AgentError("launch: the job spec " + message,
                      hint="send one JSON object on stdin: {job_id, name, argv: [..], cwd, env: "
                           "{..}, task_names: [..]} or `tasks: [{name, argv, cwd}]` instead of argv")


def check_task(task, where):
    if not isinstance(task, dict):
        raise spec_error("%s must be an object, got %r." % (where, task))
    argv = task.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise spec_error("%s.argv must be a non-empty list of strings, got %r." % (where, argv))
    if not isinstance(task.get("name", ""), str):
        raise spec_error("%s.name must be a string." % where)
    if task.get("cwd") is not None and not isinstance(task["cwd"], str):
        raise spec_error("%s.cwd must be a string (a path), got %r." % (where, task["cwd"]))


def spec_tasks(spec):
    """The tasks a spec runs in order: its `tasks`, or one task made of its own argv and cwd."""
    if spec.get("tasks") is not None:
        tasks = spec["tasks"]
        if not isinstance(tasks, list) or not tasks:
            raise spec_error("field tasks must be a non-empty list of {name, argv, cwd} objects.")
        for number, task in enumerate(tasks):
            check_task(task, "tasks[%d]" % number)
        return [dict(task, name=task.get("name") or "task%d" % (n + 1))
                for n, task in enumerate(tasks)]
    names = spec.get("task_names") or [spec.get("name") or "task"]
    task = {"name": "+".join(str(name) for name in names), "argv": spec.get("argv"),
            "cwd": spec.get("cwd")}
    check_task(task, "spec")
    return [task]


def read_spec(stream):
    try:
        spec = json.load(stream)
    except ValueError as err:
        raise spec_error("on stdin is not valid JSON (%s)." % err)
    if not isinstance(spec, dict):
        raise spec_error("must be a JSON object.")
    job_dir("", spec.get("job_id"))  # validates the id before anything is created
    env = spec.get("env") or {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise spec_error("field env must map names to string values.")
    if spec.get("cwd") is not None and not isinstance(spec["cwd"], str):
        raise spec_error("field cwd must be a string (a path).")
    mkdirs = spec.get("mkdirs") or []
    if not isinstance(mkdirs, list) or not all(isinstance(d, str) for d in mkdirs):
        raise spec_error("field mkdirs must be a list of folder paths.")
    spec_tasks(spec)
    return spec


# -- launch

def launch_verb(args):
    spec = read_spec(sys.stdin)
    path = job_dir(args.root, spec["job_id"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        raise AgentError("job %r already exists under %s." % (spec["job_id"], args.root),
                         hint="job ids are unique: launch with a new id, or follow the existing "
                              "job with `status %s`" % spec["job_id"])
    save_json_atomic(os.path.join(path, "spec.json"), spec)
    for folder in spec.get("mkdirs") or []:  # the tasks' output folders, made before they start
        os.makedirs(os.path.join(path, folder), exist_ok=True)
    open(os.path.join(path, "output.log"), "ab").close()
    save_json_atomic(os.path.join(path, "state.json"), new_state(spec))
    lock_fd = try_lock(os.path.join(path, "supervisor.lock"))  # a fresh folder: always free
    try:
        spawn_supervisor(args.root, spec["job_id"], path, lock_fd)
    finally:
        os.close(lock_fd)  # from here on only the supervisor holds the lock
    return wait_started(path)


def new_state(spec):
    return {"version": STATE_VERSION, "job_id": spec["job_id"], "name": spec.get("name"),
            "state": "pending", "tasks": [task["name"] for task in spec_tasks(spec)],
            "task": None, "pid": None, "pgid": None, "task_pid": None, "task_pgid": None,
            "exit_code": None, "error": None, "created_at": utc_now(), "started_at": None,
            "ended_at": None, "boot_id": boot_id()}


def agent_python():
    return sys.executable or shutil.which("python3") or "/usr/bin/python3"


def spawn_supervisor(root, job_id, path, lock_fd):
    """Double fork: the supervisor gets its own session, no terminal and none of the SSH
    channel's pipes, so it outlives the SSH session and this process; init adopts it."""
    argv = [agent_python(), os.path.abspath(__file__), "--root", root, "supervise", job_id,
            "--lock-fd", str(lock_fd)]
    log_path = os.path.join(path, "supervisor.log")
    pid = os.fork()
    if pid == 0:  # only os.* calls until exec or _exit: this is a forked copy of the agent
        code = 127
        try:
            os.setsid()
            if os.fork() == 0:
                null_fd = os.open(os.devnull, os.O_RDONLY)
                log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(null_fd, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.set_inheritable(lock_fd, True)
                os.chdir(path)
                os.execv(argv[0], argv)
            code = 0
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def wait_started(path):
    deadline = time.monotonic() + LAUNCH_WAIT_S
    while True:
        state = load_json(os.path.join(path, "state.json"))
        if state["state"] != "pending" or time.monotonic() > deadline:
            return with_log_size(path, state)
        if not supervisor_alive(path):
            return with_log_size(path, end_if_vanished(
                path, "failed", "the job's supervisor did not start: " + supervisor_log_tail(path)))
        time.sleep(0.005)


def supervisor_log_tail(path):
    try:
        with open(os.path.join(path, "supervisor.log"), "rb") as handle:
            text = handle.read()[-2000:].decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "(supervisor.log is empty)"


# -- the supervisor

def supervise_verb(args):
    path = existing_job_dir(args.root, args.job)
    os.set_inheritable(args.lock_fd, False)  # held till we exit; never passed to the tasks
    cancel = []  # the SIGTERM handler only appends: all the work happens in the main loop
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: cancel.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    spec = load_json(os.path.join(path, "spec.json"))
    state = load_json(os.path.join(path, "state.json"))
    state.update(state="running", pid=os.getpid(), pgid=os.getpgid(0), started_at=utc_now(),
                 boot_id=boot_id())
    save_json_atomic(os.path.join(path, "state.json"), state)
    if os.path.exists(os.path.join(path, "cancel.json")):
        cancel.append(signal.SIGTERM)  # cancelled before we were up
    try:
        final, code, error = run_tasks(path, spec, state, cancel)
    except Exception as err:  # recorded, so the job ends "failed" instead of "lost"
        traceback.print_exc()
        if state.get("task_pgid"):
            signal_group(state["task_pgid"], signal.SIGKILL)  # no task outlives its supervisor
        final, code, error = "failed", None, "the job's supervisor failed: %r" % err
    state.update(state=final, exit_code=code, error=error, ended_at=utc_now())
    save_json_atomic(os.path.join(path, "state.json"), state)
    return None


def task_env(spec):
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # so a followed log shows lines as they happen
    env.update(spec.get("env") or {})
    return env


def task_cwd(root, path, spec, task):
    """A task's folder: its own cwd, else the spec's; relative paths are under ROOT; by default
    the job's workspace/ folder."""
    cwd = task.get("cwd") or spec.get("cwd")
    if not cwd:
        cwd = os.path.join(path, "workspace")
        os.makedirs(cwd, exist_ok=True)
    return os.path.join(root, os.path.expanduser(cwd))


def run_tasks(path, spec, state, cancel):
    """Run the tasks in order, stopping at the first failure: (final state, exit code, error)."""
    root = os.path.dirname(os.path.dirname(path))
    env = task_env(spec)
    log_fd = os.open(os.path.join(path, "output.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o644)
    try:
        for task in spec_tasks(spec):
            if cancel:
                return "cancelled", None, None
            try:
                proc = subprocess.Popen(task["argv"], cwd=task_cwd(root, path, spec, task),
                                        env=env, stdin=subprocess.DEVNULL, stdout=log_fd,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as err:
                message = "cube-agent: cannot start task %r: %s" % (task["name"], err)
                os.write(log_fd, (message + "\n").encode("utf-8"))
                return "failed", 127, message
            state.update(task=task["name"], task_pid=proc.pid, task_pgid=proc.pid)
            save_json_atomic(os.path.join(path, "state.json"), state)
            code = wait_task(proc, cancel, path)
            if cancel:
                return "cancelled", code, None
            if code != 0:
                return "failed", code, None
        return "succeeded", 0, None
    finally:
        os.close(log_fd)


def wait_task(proc, cancel, path):
    """The task's exit code (128+N when killed by signal N), stopping it on cancel. Processes
    it leaves behind in its group are killed: the job ends when its task does."""
    while True:
        try:
            code = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if cancel:
                code = stop_group(proc.pid, cancel_grace(path), proc)
                break
    signal_group(proc.pid, signal.SIGKILL)
    return 128 - code if code < 0 else code


def cancel_grace(path):
    try:
        return float(load_json(os.path.join(path, "cancel.json"))["grace"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_GRACE_S


def signal_group(pgid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def group_exists(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid, grace, proc=None):
    """SIGTERM to the group; SIGKILL once the grace has passed with any member left. `proc`, when
    we are the leader's parent, is reaped as we go (its zombie would keep the group alive)."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if (proc is None or proc.returncode is not None) and not group_exists(pgid):
            break
        time.sleep(0.05)
    signal_group(pgid, signal.SIGKILL)
    code = proc.wait() if proc is not None else None
    wait_group_dead(pgid, 5.0)
    return code


def wait_group_dead(pgid, seconds):
    """SIGKILL is delivered, not finished: wait (bounded) until no member still runs, so a
    caller told "cancelled" finds none. Zombies count as dead; whoever adopted them reaps."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and live_group_members(pgid):
        time.sleep(0.02)


def live_group_members(pgid):
    members = []
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_file) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(stat_file)
    return members


# -- status, logs, cancel

def status_verb(args):
    if args.all:
        return {"jobs": all_states(args.root)}
    if args.name:
        named = [state for state in all_states(args.root) if state.get("name") == args.name]
        if not named:
            raise AgentError("there is no job named %r under %s." % (args.name, args.root),
                             hint="`list-jobs --name NAME` answers an empty list instead")
        return named[-1]
    if args.job:
        return load_state(existing_job_dir(args.root, args.job))
    raise AgentError("status needs a job id, --name NAME or --all.",
                     hint="e.g. `status JOB_ID`")


def list_jobs_verb(args):
    states = all_states(args.root)
    if args.name:
        states = [state for state in states if state.get("name") == args.name]
    return {"jobs": states}


def logs_verb(args):
    path = existing_job_dir(args.root, args.job)
    out = sys.stdout.buffer
    with open(os.path.join(path, "output.log"), "rb") as log:
        size = os.fstat(log.fileno()).st_size
        if args.offset < 0 or args.offset > size:
            raise AgentError("offset %d is outside the job's log (%d bytes so far)."
                             % (args.offset, size), hint="pass an offset from 0 to the log size")
        log.seek(args.offset)
        try:
            while True:
                # Read the state first: once it is final, everything the job wrote is in the file.
                final = args.follow and load_state(path)["state"] in FINAL_STATES
                copy_to_end(log, out)
                if final or not args.follow or reader_gone(out.fileno(), args.poll):
                    return None
        except BrokenPipeError:  # the reader went away: nothing left to say
            null_fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null_fd, out.fileno())
            return None


def reader_gone(fd, seconds):
    """Wait `seconds`, returning early with True once the reader of our stdout pipe or socket is
    gone (the SSH session died): a quiet job would otherwise keep a stale follower alive."""
    if not hasattr(select, "poll"):
        time.sleep(seconds)
        return False
    poller = select.poll()
    poller.register(fd, 0)  # no events asked: only POLLERR / POLLHUP / POLLNVAL are reported
    return bool(poller.poll(int(seconds * 1000)))


def copy_to_end(log, out):
    while True:
        chunk = log.read(1 << 16)
        if not chunk:
            return
        out.write(chunk)
        out.flush()


def cancel_verb(args):
    path = existing_job_dir(args.root, args.job)
    if load_state(path)["state"] in ("succeeded", "failed", "cancelled"):
        return load_state(path)
    # The request goes first: a supervisor not yet up finds it; one already up has its pid read.
    save_json_atomic(os.path.join(path, "cancel.json"), {"grace": args.grace,
                                                          "requested_at": utc_now()})
    state = load_state(path)
    if state["state"] in ACTIVE_STATES and state.get("pid"):
        signal_pid(state["pid"], signal.SIGTERM)  # the supervisor stops the task and records it
    container = load_json(os.path.join(path, "spec.json")).get("docker_container")
    if container:
        docker_stop(container, args.grace)
    state = wait_final(path, args.grace + 10.0)
    if state["state"] in ACTIVE_STATES or state["state"] == "lost":
        state = cancel_without_supervisor(path, state, args.grace)
    return with_log_size(path, state)


def signal_pid(pid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def docker_stop(container, grace):
    """Killing the docker CLI does not stop its container: ask the daemon. Errors (already
    gone, never started) change nothing for the job's state, so they are ignored."""
    if shutil.which("docker"):
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(["docker", "stop", "-t", str(int(grace)), container],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=grace + 30.0)


def wait_final(path, timeout):
    deadline = time.monotonic() + timeout
    while True:
        state = load_state(path)
        if state["state"] in FINAL_STATES or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def cancel_without_supervisor(path, state, grace):
    """The supervisor is gone (lost) or stuck: stop the task's group and the supervisor here."""
    same_boot = not state.get("boot_id") or state["boot_id"] == boot_id()
    if same_boot and state["state"] in ACTIVE_STATES and state.get("pid"):
        signal_pid(state["pid"], signal.SIGKILL)
    if same_boot and state.get("task_pgid"):
        stop_group(state["task_pgid"], grace)
    deadline = time.monotonic() + 5.0
    while supervisor_alive(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    with held_lock(os.path.join(path, "state.lock")):
        state = load_json(os.path.join(path, "state.json"))
        if state["state"] == "lost" or (state["state"] in ACTIVE_STATES
                                        and not supervisor_alive(path)):
            state.update(state="cancelled", ended_at=state.get("ended_at") or utc_now())
            save_json_atomic(os.path.join(path, "state.json"), state)
    return state


# -- probe

def probe_verb(args):
    pythons = start_python_probes(args.root)
    docker = start_command(["docker", "version", "--format", "{{.Server.Version}}"])
    gpus = start_command(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used",
                          "--format=csv,noheader,nounits"])
    result = {"agent_version": AGENT_VERSION, "hostname": socket.gethostname(),
              "os": os_info(), "root": args.root, "boot_id": boot_id(),
              "disk_free_bytes": disk_free(args.root), "load": load_average(),
              "cpu_count": os.cpu_count(), "mem_total_bytes": mem_total(),
              "uid": os.getuid(), "gid": os.getgid()}
    result["running_jobs"] = [state for state in all_states(args.root)
                              if state["state"] in ACTIVE_STATES]
    result["python"] = finish_python_probes(args.root, pythons)
    result["docker"] = docker_info(docker)
    result["gpus"], result["gpu_error"] = gpu_info(gpus)
    return result


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
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


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


def gpu_info(proc):
    """(GPUs from nvidia-smi, error or None); no nvidia-smi means no GPUs, not an error."""
    if proc is None:
        return [], None
    code, out, err = finish_command(proc, timeout=15.0)
    if code != 0:
        return [], "nvidia-smi failed: " + ((err or out).strip() or "exit code %s" % code)
    gpus = []
    for row in csv.reader(out.strip().splitlines(), skipinitialspace=True):
        if len(row) >= 4:
            gpus.append({"index": as_int(row[0]), "name": row[1].strip(),
                         "memory_total_mib": as_int(row[2]), "memory_used_mib": as_int(row[3])})
    return gpus, None


def as_int(text):
    try:
        return int(text.strip())
    except ValueError:
        return None  # "[N/A]" on some boards


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


# -- verb table (merged into VERBS in the command line section)

def add_no_arguments(parser):
    return parser


def add_job_argument(parser):
    parser.add_argument("job", help="job id")


def add_status_arguments(parser):
    parser.add_argument("job", nargs="?", help="job id")
    parser.add_argument("--name", help="the newest job with this name")
    parser.add_argument("--all", action="store_true", help="every job under ROOT")


def add_list_arguments(parser):
    parser.add_argument("--name", help="only jobs with this name")


def add_logs_arguments(parser):
    add_job_argument(parser)
    parser.add_argument("--offset", type=int, default=0, help="first byte to send")
    parser.add_argument("--follow", action="store_true", help="until the job ends")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between checks")


def add_cancel_arguments(parser):
    add_job_argument(parser)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help="seconds between SIGTERM and SIGKILL")


def add_supervise_arguments(parser):
    add_job_argument(parser)
    parser.add_argument("--lock-fd", type=int, required=True, help=argparse.SUPPRESS)


JOB_VERBS = {
    "probe": (add_no_arguments, probe_verb),
    "launch": (add_no_arguments, launch_verb),
    "supervise": (add_supervise_arguments, supervise_verb),
    "status": (add_status_arguments, status_verb),
    "list-jobs": (add_list_arguments, list_jobs_verb),
    "logs": (add_logs_arguments, logs_verb),
    "cancel": (add_cancel_arguments, cancel_verb),
}


# ---- sync (owner: sync section) -------------------------------------------------------------
# Manifests, safe apply and block patches, shared by both directions: the host runs them through
# the `manifest`, `receive` and `send` verbs, the controller imports them for its own side.
# A sync stream is a pax tar whose members are all regular entries carrying a `CUBE.op` header
# (file, patch, link, dir, delete, rmdir); any other member (link, device, fifo, escape) is refused.

import hashlib
import posixpath
import stat
import tarfile
import threading

BLOCK_SIZE = 1 << 18          # patch granularity for large files (256 KiB)
BLOCK_THRESHOLD = 4 << 20     # files this big also get per-block digests
IO_CHUNK = 1 << 20            # read/write/hash in large buffers
TMP_PREFIX = ".cube-tmp-"
IGNORED_DIRS = frozenset([".git", "__pycache__", ".venv", "venv", ".ipynb_checkpoints"])
HASH_STATS = {"files": 0, "bytes": 0}   # lets tests prove that a cached tree is not re-read
# Data reaches the disk before its rename. CUBE_SYNC_FSYNC=0 (benchmarks only) measures its cost.
FSYNC = os.environ.get("CUBE_SYNC_FSYNC", "1") != "0"
_tmp_counter = [0]


def check_rel(rel):
    """Normalise a relative path, refusing any that could leave the root."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise AgentError("Refusing path %r: not a plain relative path." % (rel,),
                         "Sync only carries relative paths inside the synced directory.")
    if rel.startswith("/"):
        raise AgentError("Refusing absolute path '%s' in a sync." % rel,
                         "Sync only writes inside the synced directory.")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise AgentError("Refusing path '%s': it leaves the synced directory." % rel,
                         "Remove '..' components from the path.")
    return "/".join(parts)


def check_link(rel, target):
    """A symlink may only point inside the synced tree (relative target, no escape)."""
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target or "/"))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise AgentError("Refusing symlink '%s' -> '%s': it points outside the synced directory."
                         % (rel, target), "Replace the link by a copy or a relative link inside.")
    return target


def ignored_name(name, is_dir, builtin):
    if name.startswith(TMP_PREFIX):
        return True
    return builtin and (name in IGNORED_DIRS if is_dir else name.endswith(".pyc"))


def hash_file(path, with_blocks):
    """sha256 of a file (and per-block digests) in one pass over large buffers."""
    # Reads of one block each: a regular file only reads short at its end, so every digest
    # covers exactly one block.
    full, blocks, buf, total = hashlib.sha256(), [], bytearray(BLOCK_SIZE), 0
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
            full.update(view[:n])
            if with_blocks:
                blocks.append(hashlib.sha256(view[:n]).hexdigest())
    HASH_STATS["files"] += 1
    HASH_STATS["bytes"] += total
    return full.hexdigest(), (blocks if with_blocks else None)


def _walk(top, builtin):
    """(rel, lstat) for every entry under top, never following symlinks."""
    stack = [("", top)]
    while stack:
        rel_dir, path = stack.pop()
        with os.scandir(path) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                is_dir = stat.S_ISDIR(st.st_mode)
                if ignored_name(e.name, is_dir, builtin):
                    continue
                rel = rel_dir + e.name
                yield rel, st
                if is_dir:
                    stack.append((rel + "/", e.path))


def load_cache(cache_file):
    try:
        with open(cache_file) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_cache(path, data):
    """Write the hash cache by temp name + rename. No fsync: the cache is advisory (a lost or
    unreadable cache only means hashing again), and on ext4 an fsync here would also force out
    every dirty data block of the sync that just ran."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = "%s.%s%d" % (path, TMP_PREFIX, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _entry(path, st, cache, rel, fresh_before, need_hash):
    key = [st.st_size, st.st_mtime_ns, st.st_ino]
    # A file written in the last second could change again within the same mtime tick:
    # hash it again next time rather than trust the cache (git's "racy clean" rule).
    cacheable = st.st_mtime_ns < fresh_before
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)}
    hit = cache.get(rel)
    if hit and hit[:3] == key:
        sha, blocks = hit[3], hit[4]
    elif need_hash is None or need_hash(rel, st):
        sha, blocks = hash_file(path, st.st_size >= BLOCK_THRESHOLD)
    else:   # the other side lacks it: the sender hashes while streaming (one read, not two)
        entry.update(sha256=None, key=key if cacheable else None)
        return entry, None
    entry["sha256"] = sha
    if blocks is not None:
        entry["blocks"] = blocks
    return entry, (key + [sha, blocks] if cacheable else None)


def scan(top, cache_file=None, builtin_ignores=True, need_hash=None):
    """Manifest {files: {rel: entry}, dirs: {rel: mode}, links: {rel: target}} of a tree.
    need_hash(rel, stat) -> False leaves an uncached file's sha256 None (see write_stream)."""
    manifest = {"files": {}, "dirs": {}, "links": {}, "exists": os.path.isdir(top)}
    if not manifest["exists"]:
        return manifest
    cache = load_cache(cache_file) if cache_file else {}
    new_cache, fresh_before = {}, time.time_ns() - 1000000000
    for rel, st in _walk(top, builtin_ignores):
        if stat.S_ISDIR(st.st_mode):
            manifest["dirs"][rel] = stat.S_IMODE(st.st_mode)
        elif stat.S_ISLNK(st.st_mode):
            manifest["links"][rel] = os.readlink(os.path.join(top, rel))
        elif stat.S_ISREG(st.st_mode):
            entry, cached = _entry(os.path.join(top, rel), st, cache, rel, fresh_before,
                                   need_hash)
            manifest["files"][rel] = entry
            if cached:
                new_cache[rel] = cached
    if cache_file and new_cache != cache:
        write_cache(cache_file, json.dumps(new_cache).encode())
    return manifest


def record_hashes(cache_file, entries):
    """Add {rel: [size, mtime_ns, ino, sha256, blocks]} rows to a hash cache."""
    if cache_file and entries:
        cache = load_cache(cache_file)
        cache.update(entries)
        write_cache(cache_file, json.dumps(cache).encode())


def update_cache(cache_file, top, entries):
    """Record hashes the receiver just verified, so its next manifest does not re-read them."""
    if not cache_file or not entries:
        return
    cache = load_cache(cache_file)
    for rel, (sha, blocks) in entries.items():
        try:
            st = os.lstat(os.path.join(top, rel))
        except OSError:
            continue
        cache[rel] = [st.st_size, st.st_mtime_ns, st.st_ino, sha, blocks]
    write_cache(cache_file, json.dumps(cache).encode())


# -- planning: what must travel from src to dst (both manifests already filtered) --

def changed_blocks(new_blocks, old_blocks):
    return [i for i, d in enumerate(new_blocks) if i >= len(old_blocks) or old_blocks[i] != d]


def plan(src, dst, delete):
    """Ops turning dst into src: deletes first (type changes need them), then dirs, then data."""
    ops = []
    if delete:
        gone = [r for r in dst["files"] if r not in src["files"]]
        gone += [r for r in dst["links"] if src["links"].get(r) != dst["links"][r]]
        ops += [{"op": "delete", "path": r} for r in sorted(gone)]
        ops += [{"op": "rmdir", "path": r}
                for r in sorted((d for d in dst["dirs"] if d not in src["dirs"]), reverse=True)]
    for rel, mode in sorted(src["dirs"].items()):
        if dst["dirs"].get(rel) != mode:
            ops.append({"op": "dir", "path": rel, "mode": mode})
    for rel, target in sorted(src["links"].items()):
        if dst["links"].get(rel) != target:
            ops.append({"op": "link", "path": rel, "target": target})
    for rel, e in sorted(src["files"].items()):
        old = dst["files"].get(rel)
        if old and old["sha256"] == e["sha256"] and old["mode"] == e["mode"]:
            continue
        op = {"op": "file", "path": rel}
        if old and old.get("blocks") and e.get("blocks"):
            op["base_blocks"] = old["blocks"]
        ops.append(op)
    return ops


# -- sending --

class TarWriter(object):
    """A minimal pax tar writer straight onto the output: tarfile's stream mode re-buffers
    (and copies) every byte, which costs more than hashing it."""

    def __init__(self, out):
        self.out, self.buf = out, bytearray(IO_CHUNK)

    def addfile(self, info, chunks=()):
        self.out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        sent = 0
        for chunk in chunks:
            self.out.write(chunk)
            sent += len(chunk)
        if sent != info.size:
            raise AgentError("'%s' changed size while it was being sent." % info.name,
                             "Run the sync again once the file is no longer being written.")
        if sent % tarfile.BLOCKSIZE:
            self.out.write(tarfile.NUL * (tarfile.BLOCKSIZE - sent % tarfile.BLOCKSIZE))

    def close(self):
        self.out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))

    def ranges(self, f, spans, chunk=IO_CHUNK):
        """Chunks of the file for (offset, length) spans, read into one reused buffer."""
        view = memoryview(self.buf)
        for offset, length in spans:
            f.seek(offset)
            while length > 0:
                n = f.readinto(view[:min(length, chunk)])
                if not n:
                    return
                yield view[:n]
                length -= n


def _info(rel, op, payload=0, **pax):
    ti = tarfile.TarInfo(rel)
    ti.size, ti.type = payload, tarfile.REGTYPE
    ti.pax_headers = dict({"CUBE.op": op}, **{"CUBE." + k: str(v) for k, v in pax.items()})
    return ti


def _hashing(chunks, full, blocks):
    """Pass chunks (one block each) through, hashing them on the way."""
    for chunk in chunks:
        full.update(chunk)
        if blocks is not None:
            blocks.append(hashlib.sha256(chunk).hexdigest())
        yield chunk


def _add_hashed_file(tar, f, rel, entry, meta):
    """Stream a file not hashed yet; its sha256 follows in a `commit` member."""
    size, full = entry["size"], hashlib.sha256()
    blocks = [] if size >= BLOCK_THRESHOLD else None
    del meta["sha256"]
    chunks = _hashing(tar.ranges(f, [(0, size)], BLOCK_SIZE), full, blocks)
    tar.addfile(_info(rel, "file", size, **meta), chunks)
    tar.addfile(_info(rel, "commit", sha256=full.hexdigest()))
    key = entry.get("key")
    return {rel: key + [full.hexdigest(), blocks]} if key else {}


def _add_file(tar, top, rel, entry, base_blocks):
    path, size = os.path.join(top, rel), entry["size"]
    meta = dict(sha256=entry["sha256"], mode=entry["mode"], mtime_ns=entry["mtime_ns"],
                size=size)
    with open(path, "rb", buffering=0) as f:
        if entry["sha256"] is None:
            return _add_hashed_file(tar, f, rel, entry, meta)
        if base_blocks is not None:
            idx = changed_blocks(entry["blocks"], base_blocks)
            spans = [(i * BLOCK_SIZE, min(BLOCK_SIZE, size - i * BLOCK_SIZE)) for i in idx]
            ti = _info(rel, "patch", sum(n for _, n in spans),
                       blocks=",".join(map(str, idx)), **meta)
            tar.addfile(ti, tar.ranges(f, spans))
        else:
            tar.addfile(_info(rel, "file", size, **meta), tar.ranges(f, [(0, size)]))
    return {}


def write_stream(top, ops, out, manifest):
    """Write the sync stream for ops (entries taken from top's manifest) to a binary file.
    Returns hash-cache rows for files hashed while streaming."""
    tar, hashed = TarWriter(out), {}
    for op in ops:
        hashed.update(_add_op(tar, top, op, manifest) or {})
    tar.close()
    return hashed


def _add_op(tar, top, op, manifest):
    rel, kind = check_rel(op["path"]), op["op"]
    if kind == "file":
        entry = manifest["files"].get(rel)
        if entry is None:
            raise AgentError("'%s' is not a file in %s." % (rel, top),
                             "It was removed or replaced since the sync began; run it again.")
        return _add_file(tar, top, rel, entry, op.get("base_blocks"))
    elif kind == "link" and rel in manifest["links"]:
        tar.addfile(_info(rel, "link", target=check_link(rel, manifest["links"][rel])))
    elif kind == "dir" and rel in manifest["dirs"]:
        tar.addfile(_info(rel, "dir", mode=manifest["dirs"][rel]))
    elif kind in ("delete", "rmdir"):
        tar.addfile(_info(rel, kind))
    else:
        raise AgentError("Cannot send '%s' as %s: no such entry in %s." % (rel, kind, top),
                         "It changed since the sync began; run it again.")


# -- receiving: every path is checked, every file lands by temp name + verify + rename --

def _safe_parent(top, rel):
    """Create missing parents of rel under top; refuse a parent that is a symlink or file."""
    parts, cur = rel.split("/")[:-1], top
    for p in parts:
        cur = os.path.join(cur, p)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise AgentError("Refusing to write '%s': its parent '%s' is a symlink or not a "
                             "directory." % (rel, os.path.relpath(cur, top)),
                             "A sync never writes through a symlink.")
    return os.path.join(top, rel)


def _tmp_name(dest):
    _tmp_counter[0] += 1
    return os.path.join(os.path.dirname(dest), "%s%d-%d" % (TMP_PREFIX, os.getpid(),
                                                             _tmp_counter[0]))


def clean_stale_tmp(top):
    """Remove temp files an interrupted sync left behind."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + dirnames:
            if name.startswith(TMP_PREFIX):
                path = os.path.join(dirpath, name)
                if not os.path.isdir(path) or os.path.islink(path):
                    os.unlink(path)


def _hash_and_write(src, fd, size, progress):
    """Copy size bytes from src to fd, hashing as we go (block digests for large files)."""
    full, blocks, left = hashlib.sha256(), [], size
    block = hashlib.sha256() if size >= BLOCK_THRESHOLD else None
    in_block = 0
    while left:
        data = src.read(min(IO_CHUNK, left))
        if not data:
            raise AgentError("The sync stream ended early (connection cut?).",
                             "Run the sync again; it resumes where it stopped.")
        left -= len(data)
        full.update(data)
        if block is not None:
            for piece in _split_blocks(data, in_block):
                block.update(piece)
                in_block += len(piece)
                if in_block == BLOCK_SIZE:
                    blocks.append(block.hexdigest())
                    block, in_block = hashlib.sha256(), 0
        _write_all(fd, data)
        if progress:
            progress(len(data))
    if block is not None and in_block:
        blocks.append(block.hexdigest())
    return full.hexdigest(), (blocks if block is not None else None)


def _split_blocks(data, in_block):
    view, start = memoryview(data), 0
    while start < len(data):
        end = min(len(data), start + BLOCK_SIZE - in_block)
        yield view[start:end]
        start, in_block = end, 0


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _finish(tmp, dest, rel, pax, got_sha, finisher):
    if got_sha != pax["CUBE.sha256"]:
        raise AgentError("'%s' arrived with the wrong sha256 (changed during the sync, or the "
                         "stream was damaged); the previous version is kept." % rel,
                         "Run the sync again.")
    os.chmod(tmp, int(pax["CUBE.mode"]) & 0o7777)
    mtime = int(pax["CUBE.mtime_ns"])
    os.utime(tmp, ns=(mtime, mtime))
    finisher.submit(tmp, dest)


class Finisher(object):
    """fsync then rename verified temp files on worker threads: the stream keeps flowing, and
    concurrent fsyncs share journal commits (one fsync per small file in a row costs ms each)."""

    def __init__(self, workers=16):
        from concurrent.futures import ThreadPoolExecutor   # only receivers pay for the import
        self.pool = ThreadPoolExecutor(workers)
        self.futures, self.errors, self.landed = [], [], set()
        self.lock = threading.Lock()

    def submit(self, tmp, dest):
        self.futures.append(self.pool.submit(self._land, tmp, dest))

    def _land(self, tmp, dest):
        try:
            if FSYNC:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, dest)
            with self.lock:
                self.landed.add(dest)
        except OSError as err:
            _unlink_quiet(tmp)
            with self.lock:
                self.errors.append(err)

    def close(self):
        """Wait until every file has landed; raise the first failure."""
        self.pool.shutdown(wait=True)
        if self.errors:
            raise self.errors[0]


def _receive_file(tar, member, dest, rel, progress, finisher, pending):
    tmp = _tmp_name(dest)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            sha, blocks = _hash_and_write(tar, fd, member.size, progress)
        finally:
            os.close(fd)
        if "CUBE.sha256" in member.pax_headers:
            _finish(tmp, dest, rel, member.pax_headers, sha, finisher)
        else:   # hashed by the sender while streaming: the next member carries the sha256
            pending.append((tmp, dest, rel, member.pax_headers, sha))
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return sha, blocks


def _receive_patch(tar, member, dest, rel, progress, finisher):
    """New file = old blocks + received blocks, built in one pass that hashes as it writes."""
    pax = member.pax_headers
    try:
        if not stat.S_ISREG(os.lstat(dest).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError:
        raise AgentError("A block patch for '%s' arrived but there is no regular file to patch."
                         % rel, "Run the sync again; it sends the whole file.")
    size = int(pax["CUBE.size"])
    changed = set(int(i) for i in pax["CUBE.blocks"].split(",") if i)
    tmp = _tmp_name(dest)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            with open(dest, "rb", buffering=0) as old:
                pieces = _patched_blocks(old, tar, changed, size, progress)
                sha, blocks = _hash_and_write(_Chunks(pieces), fd, size, None)
        finally:
            os.close(fd)
        _finish(tmp, dest, rel, pax, sha, finisher)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return sha, blocks


def _patched_blocks(old, new, changed, size, progress):
    for i in range((size + BLOCK_SIZE - 1) // BLOCK_SIZE):
        n = min(BLOCK_SIZE, size - i * BLOCK_SIZE)
        if i in changed:
            data = new.read(n)
            if progress:
                progress(n)
        else:
            old.seek(i * BLOCK_SIZE)
            data = old.read(n)
        if len(data) != n:
            raise AgentError("The sync stream ended early, or the file to patch changed.",
                             "Run the sync again; it resumes where it stopped.")
        yield data


class _Chunks(object):
    """read() over an iterator of byte strings (each read returns the next one)."""

    def __init__(self, it):
        self.it = it

    def read(self, n=-1):
        return next(self.it, b"")


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _receive_link(dest, rel, target):
    check_link(rel, target)
    tmp = _tmp_name(dest)
    os.symlink(target, tmp)
    os.replace(tmp, dest)


def _delete(dest, rel, rmdir):
    try:
        if rmdir:
            os.rmdir(dest)
        elif stat.S_ISDIR(os.lstat(dest).st_mode):
            raise AgentError("Refusing to delete directory '%s' as a file." % rel)
        else:
            os.unlink(dest)
        return 1
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            return 0   # gone already, or still holds ignored files: keep it
        raise


def _check_member(member):
    """Only our own regular members are accepted: never links, devices, fifos or dirs."""
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise AgentError("Refusing tar member '%s': it is a link, device, fifo or directory, "
                         "which a cube sync never sends." % member.name,
                         "The other side sent a stream cube did not make; do not trust it.")
    op = member.pax_headers.get("CUBE.op")
    if op not in ("file", "commit", "patch", "link", "dir", "delete", "rmdir"):
        raise AgentError("Refusing tar member '%s': not a cube sync entry." % member.name,
                         "The other side sent a stream cube did not make; do not trust it.")
    return op, check_rel(member.name)


class TarReader(object):
    """Reads a sync stream: per member one pax header ('x') then one ustar header, then data.
    Stricter and far cheaper than tarfile's stream mode (which copies every byte twice more);
    anything else (global headers, GNU long names, ...) surfaces as a refused member type."""

    MAX_PAX = 64 << 20

    def __init__(self, f):
        self.f, self.left, self.pad = f, 0, 0

    def _exact(self, n):
        parts, got = [], 0
        while got < n:
            data = self.f.read(n - got)
            if not data:
                raise AgentError("The sync stream ended early (connection cut?).",
                                 "Run the sync again; it resumes where it stopped.")
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def next(self):
        """The next member's TarInfo (name and size from its pax header), None at the end."""
        while self.left:
            self.read(min(self.left, IO_CHUNK))
        if self.pad:
            self._exact(self.pad)
        block = self._exact(tarfile.BLOCKSIZE)
        if block == tarfile.NUL * tarfile.BLOCKSIZE:
            return None
        info, pax = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape"), {}
        if info.type == tarfile.XHDTYPE and 0 <= info.size <= self.MAX_PAX:
            pax = _parse_pax(self._exact(-(-info.size // 512) * 512)[:info.size])
            info = tarfile.TarInfo.frombuf(self._exact(tarfile.BLOCKSIZE), "utf-8",
                                           "surrogateescape")
        info.pax_headers = pax
        info.name = pax.get("path", info.name)
        info.size = int(pax.get("size", info.size))
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.size < 0:
            info.size = 0   # refused by _check_member; never read as data
        self.left, self.pad = info.size, -info.size % tarfile.BLOCKSIZE
        return info

    def read(self, n=-1):
        """The current member's data, up to n bytes."""
        n = self.left if n < 0 else min(n, self.left)
        if n <= 0:
            return b""
        data = self.f.read(n)
        if not data:
            raise AgentError("The sync stream ended early (connection cut?).",
                             "Run the sync again; it resumes where it stopped.")
        self.left -= len(data)
        return data


def _parse_pax(data):
    """pax records: b"<len> <key>=<value>\n", len counting the whole record."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise ValueError("bad pax record length")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def apply_stream(top, instream, allow_delete=False, cache_file=None, progress=None):
    """Apply a sync stream under top. Returns counts; files verified land by rename."""
    os.makedirs(top, exist_ok=True)
    top = os.path.realpath(top)
    clean_stale_tmp(top)
    report, verified, finisher = {"files": 0, "bytes": 0, "deleted": 0}, {}, Finisher()
    pending = []   # at most one file waiting for its `commit` member
    try:
        try:
            tar = TarReader(instream)
            for member in iter(tar.next, None):
                _apply_member(tar, member, top, allow_delete, progress, finisher, report,
                              verified, pending)
            if pending:
                _commit(None, None, pending, finisher)
        finally:
            for tmp in [p[0] for p in pending]:
                _unlink_quiet(tmp)
            finisher.close()   # files verified before a failure still land
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as err:
        raise AgentError("The sync stream is damaged or was cut (%s)." % err,
                         "Run the sync again; files already received are kept.")
    except OSError as err:
        raise AgentError("Could not write into %s: %s." % (top, err),
                         "Check free disk space and permissions, then run the sync again.")
    finally:
        landed = {rel: v for rel, v in verified.items() if os.path.join(top, rel)
                  in finisher.landed}
        update_cache(cache_file, top, landed)
    return report


def _commit(member, rel, pending, finisher):
    """A file streamed before its hash lands only when its `commit` member confirms it."""
    tmp, dest, got_rel, pax, sha = pending.pop()
    try:
        if member is None or got_rel != rel:
            raise AgentError("'%s' arrived without its checksum; it was not installed." % got_rel,
                             "Run the sync again.")
        pax = dict(pax, **{"CUBE.sha256": member.pax_headers.get("CUBE.sha256")})
        _finish(tmp, dest, rel, pax, sha, finisher)
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _apply_member(tar, member, top, allow_delete, progress, finisher, report, verified,
                  pending):
    op, rel = _check_member(member)
    if pending or op == "commit":
        if not pending:
            raise AgentError("Refusing tar member '%s': a checksum with no file before it." % rel,
                             "The other side sent a stream cube did not make; do not trust it.")
        return _commit(member if op == "commit" else None, rel, pending, finisher)
    if op in ("delete", "rmdir") and not allow_delete:
        raise AgentError("Refusing to delete '%s': this sync may not delete files." % rel)
    dest = _safe_parent(top, rel)
    if op == "file":
        verified[rel] = _receive_file(tar, member, dest, rel, progress, finisher, pending)
    elif op == "patch":
        verified[rel] = _receive_patch(tar, member, dest, rel, progress, finisher)
    elif op == "link":
        _receive_link(dest, rel, member.pax_headers.get("CUBE.target", ""))
    elif op == "dir":
        _receive_dir(dest, rel, int(member.pax_headers["CUBE.mode"]))
    else:
        report["deleted"] += _delete(dest, rel, op == "rmdir")
        return
    report["files"] += op != "dir"
    report["bytes"] += member.size


def _receive_dir(dest, rel, mode):
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        os.mkdir(dest)
    else:
        if not stat.S_ISDIR(st.st_mode):
            raise AgentError("Refusing to make directory '%s': something else is there." % rel)
    os.chmod(dest, mode & 0o7777 | 0o700)


# -- verbs --

def _sync_dir(args):
    return os.path.join(args.root, os.path.expanduser(args.dir))


def _cache_file(directory, root):
    key = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
    return os.path.join(root, "cache", "hashes-%s.json" % key)


def _dir_argument(parser):
    parser.add_argument("dir", help="directory, relative to --root unless absolute")


def _manifest_arguments(parser):
    _dir_argument(parser)
    parser.add_argument("--all", action="store_true", help="no built-in ignores")


def verb_manifest(args):
    d = _sync_dir(args)
    return scan(d, _cache_file(d, args.root), builtin_ignores=not args.all)


def _receive_arguments(parser):
    _dir_argument(parser)
    parser.add_argument("--delete", action="store_true", help="honour delete entries")


def verb_receive(args):
    d = _sync_dir(args)
    return apply_stream(d, sys.stdin.buffer, args.delete, _cache_file(d, args.root))


def verb_send(args):
    """Request (JSON ops) on stdin, sync stream on stdout; errors go to stderr as JSON."""
    d = _sync_dir(args)
    try:
        ops = json.loads(sys.stdin.buffer.read().decode() or "[]")
        manifest = scan(d, _cache_file(d, args.root), builtin_ignores=False)
        write_stream(d, ops, sys.stdout.buffer, manifest)
        sys.stdout.buffer.flush()
    except AgentError as err:
        if getattr(args, "in_session", False):
            raise  # the session answers errors itself
        sys.stderr.write(json.dumps({"error": err.message, "hint": err.hint}) + "\n")
        sys.exit(1)
    return None


def register_sync_verbs(verbs):
    verbs["manifest"] = (_manifest_arguments, verb_manifest)
    verbs["receive"] = (_receive_arguments, verb_receive)
    verbs["send"] = (_dir_argument, verb_send)


# ---- session: many requests over one SSH channel ---------------------------------------------
# Every SSH command costs a login shell and a Python start on the host (0.5 s on a host whose
# shell rc files do real work); a run needs a dozen small requests, so they share one process.
# Protocol: JSON lines. The agent greets with {"ready": true, ...}; each request
# {"verb", "args": [..], "input": str|null} gets one answer line {"ok": true, "result": {..}}
# or {"ok": false, "error", "hint"}. Bulk byte streams (sync) keep their own channels.

SESSION_UNSAFE = ("serve", "logs", "supervise")


def serve_verb(args):
    parser = build_parser()
    reply({"ready": True, "agent_version": AGENT_VERSION, "python": sys.executable,
           "path": os.path.abspath(__file__), "root": args.root})
    for line in sys.stdin:
        if line.strip():
            reply(serve_one(parser, args.root, json.loads(line)))
    return None


def serve_one(parser, root, request):
    """One request. A sync stream may ride along: `input_b64` is its stdin, and with
    `capture` its stdout comes back as `stdout_b64` (small transfers skip a new SSH command)."""
    verb = request.get("verb")
    if verb not in VERBS or verb in SESSION_UNSAFE:
        return {"ok": False, "error": "verb %r cannot run in a session." % (verb,), "hint": None}
    saved = sys.stdin, sys.stdout
    raw = request.get("input_b64")
    raw = base64.b64decode(raw) if raw is not None else (request.get("input") or "").encode()
    sys.stdin = io.TextIOWrapper(io.BytesIO(raw))
    captured = io.BytesIO()
    if request.get("capture"):
        sys.stdout = io.TextIOWrapper(captured, write_through=True)
    try:
        args = parser.parse_args(["--root", root, verb] + list(request.get("args", [])))
        args.in_session = True
        result = call_verb(args)
        sys.stdout.flush()
        output = captured.getvalue()  # now: dropping the wrapper below closes `captured`
    except SystemExit:  # argparse refused the arguments
        return {"ok": False, "error": "bad arguments for %s: %r" % (verb, request.get("args")),
                "hint": None}
    except Exception as err:  # one bad request must not end the session
        return {"ok": False, "error": "%s failed: %s: %s" % (verb, type(err).__name__, err),
                "hint": traceback.format_exc(limit=3)}
    finally:
        sys.stdin, sys.stdout = saved
    if isinstance(result, dict) and "error" in result and "state" not in result:
        return {"ok": False, "error": result["error"], "hint": result.get("hint")}
    if request.get("capture"):
        result = {"stdout_b64": base64.b64encode(output).decode("ascii")}
    return {"ok": True, "result": result}


def reply(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def sh_verb(args):
    """A shell command (a playbook check or step) run from the session's process."""
    shell = shutil.which("bash") or "/bin/sh"
    # bash re-reads ~/.bashrc when it thinks sshd started it (SSH_CLIENT is set); the session
    # already carries the login environment, so spare every command that cost.
    env = dict((k, v) for k, v in os.environ.items() if k not in ("SSH_CLIENT", "SSH2_CLIENT"))
    try:
        proc = subprocess.run([shell, "-c", args.command], stdin=subprocess.DEVNULL, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired as err:
        return {"code": 124, "stdout": decode(err.stdout),
                "stderr": decode(err.stderr) + "\ntimed out after %s s" % args.timeout}
    return {"code": proc.returncode, "stdout": decode(proc.stdout), "stderr": decode(proc.stderr)}


def decode(data):
    return (data or b"").decode("utf-8", "replace")


def read_log_verb(args):
    """Long poll: the job's log from OFFSET, as soon as there is some, the job ends, or WAIT
    seconds pass. The answer says the next offset and whether the job is final and drained."""
    path = existing_job_dir(args.root, args.job)
    deadline = time.monotonic() + args.wait
    while True:
        state = load_state(path)  # first: once final, the file holds everything
        with open(os.path.join(path, "output.log"), "rb") as log:
            log.seek(args.offset)
            data = log.read(args.max_bytes)
        end = args.offset + len(data)
        drained = end >= state.get("log_bytes", 0)
        final = state["state"] in FINAL_STATES
        if data or final or time.monotonic() >= deadline:
            return {"data": base64.b64encode(data).decode("ascii"), "offset": end,
                    "done": final and drained, "state": state}
        time.sleep(0.1)


def add_sh_arguments(parser):
    parser.add_argument("command")
    parser.add_argument("--timeout", type=float, default=None)


def add_read_log_arguments(parser):
    add_job_argument(parser)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--wait", type=float, default=5.0)
    parser.add_argument("--max-bytes", type=int, default=1 << 20)


SESSION_VERBS = {
    "serve": (add_no_arguments, serve_verb),
    "sh": (add_sh_arguments, sh_verb),
    "read-log": (add_read_log_arguments, read_log_verb),
}


# ---- command line -----------------------------------------------------------------------------

VERBS = {}  # verb name -> (add_arguments(parser), handler(args) -> dict | None)
VERBS.update(JOB_VERBS)
register_sync_verbs(VERBS)  # sync section
VERBS.update(SESSION_VERBS)


def build_parser():
    parser = argparse.ArgumentParser(prog="cube_agent")
    parser.add_argument("--root", required=True, help="cube root on this host")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, (add_arguments, _) in sorted(VERBS.items()):
        add_arguments(sub.add_parser(name))
    return parser


def call_verb(args):
    """Run one verb; its answer, or an error answer, as a dict (None for streaming verbs)."""
    args.root = os.path.abspath(os.path.expanduser(args.root))
    try:
        return VERBS[args.verb][1](args)
    except AgentError as err:
        return {"error": err.message, "hint": err.hint}
    except OSError as err:  # the controller expects JSON, not a traceback
        return {"error": "%s failed: %s" % (args.verb, err),
                "hint": "check that %s is writable and its disk not full" % args.root}


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = call_verb(args)
    if result is not None:
        print(json.dumps(result))
    return 1 if isinstance(result, dict) and "error" in result and "state" not in result else 0


if __name__ == "__main__":
    sys.exit(main())
