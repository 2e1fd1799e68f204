"""GPUs of this host from nvidia-smi: stdlib only, Python >= 3.8 (it runs inside the agent).

Two queries run side by side: the GPUs (index, model, memory, utilization, driver) and the
compute apps (which process uses which GPU), joined by GPU UUID into each GPU's `busy_pids`.
A GPU busy with a process cube did not start counts as taken for slots, so the apps matter.

    {"gpus": [{index, name, uuid, memory_used_mib, memory_total_mib, utilization_pct,
               driver_version, busy_pids}], "gpu_error": str | None}

No nvidia-smi on PATH means no GPUs and no error; a failing nvidia-smi (driver gone, no
devices) is reported in `gpu_error`. Fields nvidia-smi cannot give ("[N/A]",
"[Not Supported]") are None.
"""

import csv
import shutil
import subprocess
import time

from .commands import communicate

GPU_QUERY = ["nvidia-smi",
             "--query-gpu=index,name,uuid,memory.used,memory.total,utilization.gpu,driver_version",
             "--format=csv,noheader,nounits"]
APPS_QUERY = ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory",
              "--format=csv,noheader,nounits"]
TIMEOUT_S = 15.0  # nvidia-smi can take seconds on a busy 8-GPU box (driver persistence off)


def _rows(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return [[cell.strip() for cell in row] for row in csv.reader(lines, skipinitialspace=True)]


def _value(cell):
    """None for nvidia-smi's placeholders ("[N/A]", "[Not Supported]", "N/A", "")."""
    if not cell or cell in ("N/A", "[N/A]") or (cell.startswith("[") and cell.endswith("]")):
        return None
    return cell


def _int(cell):
    cell = _value(cell)
    try:
        return int(float(cell)) if cell is not None else None
    except ValueError:
        return None


def parse_gpus(text):
    """Rows of GPU_QUERY's output -> GPU dicts (without busy_pids); short rows are skipped."""
    gpus = []
    for row in _rows(text):
        if len(row) < 7:
            continue
        gpus.append({"index": _int(row[0]), "name": _value(row[1]), "uuid": _value(row[2]),
                     "memory_used_mib": _int(row[3]), "memory_total_mib": _int(row[4]),
                     "utilization_pct": _int(row[5]), "driver_version": _value(row[6])})
    return gpus


def parse_compute_apps(text):
    """Rows of APPS_QUERY's output -> [{gpu_uuid, pid, used_memory_mib}]."""
    apps = []
    for row in _rows(text):
        if len(row) >= 2 and _int(row[1]) is not None:
            apps.append({"gpu_uuid": row[0], "pid": _int(row[1]),
                         "used_memory_mib": _int(row[2]) if len(row) > 2 else None})
    return apps


def join_apps(gpus, apps):
    """Each GPU gets `busy_pids`: the compute apps running on it (by UUID)."""
    for gpu in gpus:
        gpu["busy_pids"] = sorted(a["pid"] for a in apps if a["gpu_uuid"] == gpu["uuid"])
    return gpus


def start():
    """Start both queries (they run side by side with the probe's other commands);
    None when nvidia-smi is not installed."""
    if shutil.which("nvidia-smi") is None:
        return None
    procs = []  # type: list  # a Popen, or the OSError that stopped it
    for argv in (GPU_QUERY, APPS_QUERY):
        try:
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE))
        except OSError as err:
            procs.append(err)
    return procs


def _finish(proc, timeout):
    """(exit code or None on timeout, stdout, stderr) as text."""
    if isinstance(proc, OSError):
        return 127, "", str(proc)
    return communicate(proc, timeout)


def _failure(what, code, out, err):
    if code is None:
        return "%s did not answer within %d s" % (what, TIMEOUT_S)
    lines = (err.strip() or out.strip() or "exit code %s" % code).splitlines()
    return "%s failed: %s" % (what, lines[-1].strip())


def finish(procs, timeout=TIMEOUT_S):
    """Wait for start()'s queries and parse them into {"gpus", "gpu_error"}."""
    if procs is None:
        return {"gpus": [], "gpu_error": None}
    gpu_proc, apps_proc = procs
    deadline = time.monotonic() + timeout  # one budget for both: they run side by side
    code, out, err = _finish(gpu_proc, timeout)
    apps_code, apps_out, apps_err = _finish(apps_proc, max(0.1, deadline - time.monotonic()))
    if code != 0:
        return {"gpus": [], "gpu_error": _failure("nvidia-smi", code, out, err)}
    gpus, error = parse_gpus(out), None
    if apps_code == 0:
        apps = parse_compute_apps(apps_out)
    else:  # the GPUs are still worth showing; who uses them is unknown
        apps, error = [], _failure("nvidia-smi --query-compute-apps", apps_code, apps_out,
                                   apps_err)
    return {"gpus": join_apps(gpus, apps), "gpu_error": error}


def query(timeout=TIMEOUT_S):
    """Both queries, start to finish."""
    return finish(start(), timeout)
