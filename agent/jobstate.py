"""A job's folder and its state: ROOT/jobs/<id>/ holds spec.json, state.json, output.log,
supervisor.log and the locks.

The supervisor (agent.supervisor) holds an exclusive flock on supervisor.lock for its whole
life, inherited from `launch` so there is no unguarded gap: an unfinished job whose lock is free
has lost its supervisor and is judged "lost" here, under state.lock (one judge at a time).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import tempfile

# boot_id is None off Linux, where the lock alone detects lost jobs
from .landing import boot_id, fsync_path
from .protocol import AgentError

STATE_VERSION = 1
FINAL_STATES = ("succeeded", "failed", "cancelled", "lost")
ACTIVE_STATES = ("pending", "queued", "reserved", "running")  # queued: waiting for slots
# (leases); reserved: a multi-node rank holding its slots until the gang starts (gang)
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LAUNCH_WAIT_S = 30.0  # how long `launch` waits for the supervisor to report "running"
DEFAULT_GRACE_S = 10.0


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
    fsync_path(folder)


def load_json(path):
    with open(path) as handle:
        return json.load(handle)


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


# Jobs another scheduler runs are judged and cancelled by it, not by our locks (agent.slurm
# registers itself): {marker file in the job folder: object with judge(path, state), cancel(path,
# grace)}.
SCHEDULERS: dict = {}


def scheduler_of(path):
    return next((s for marker, s in SCHEDULERS.items()
                 if os.path.exists(os.path.join(path, marker))), None)


def load_state(path):
    """state.json; an unfinished job whose supervisor is gone is reported, and persisted, as lost."""
    state = load_json(os.path.join(path, "state.json"))
    scheduler = scheduler_of(path)
    if scheduler is not None:
        return with_log_size(path, scheduler.judge(path, state))
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
        raise spec_error("on stdin is not valid JSON (%s)." % err) from None
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
