"""Job verbs: launch, status, list-jobs, logs, read-log, cancel.

`launch` writes the job folder (agent.jobstate) and starts its supervisor (agent.supervisor);
the other verbs read the folder, judging a job whose supervisor vanished as lost.
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time

from . import after, gang
from .jobstate import (
    ACTIVE_STATES,
    DEFAULT_GRACE_S,
    FINAL_STATES,
    LAUNCH_WAIT_S,
    STATE_VERSION,
    all_states,
    boot_id,
    end_if_vanished,
    existing_job_dir,
    held_lock,
    job_dir,
    load_json,
    load_state,
    read_spec,
    save_json_atomic,
    scheduler_of,
    spec_tasks,
    supervisor_alive,
    try_lock,
    utc_now,
    with_log_size,
)
from .leases import check_spec
from .protocol import AgentError, arg, verb
from .pruning import record_use
from .supervisor import spawn_supervisor, stop_group

JOB = arg("job", help="job id")


# -- launch

@verb("launch")
def launch(args):
    spec = read_spec(sys.stdin)
    check_spec(spec)
    after.check_spec(spec)
    gang.check_spec(spec)
    path = job_dir(args.root, spec["job_id"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        raise AgentError("job %r already exists under %s." % (spec["job_id"], args.root),
                         hint="job ids are unique: launch with a new id, or follow the existing "
                              "job with `status %s`" % spec["job_id"]) from None
    save_json_atomic(os.path.join(path, "spec.json"), spec)
    for folder in spec.get("mkdirs") or []:  # the tasks' output folders, made before they start
        os.makedirs(os.path.join(path, folder), exist_ok=True)
    open(os.path.join(path, "output.log"), "ab").close()
    save_json_atomic(os.path.join(path, "state.json"), new_state(spec))
    record_use(args.root, spec)  # what `prune` keeps: environments and images used lately
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



# -- status, logs, cancel

@verb("status", arg("job", nargs="?", help="job id"),
      arg("--name", help="the newest job with this name"),
      arg("--all", action="store_true", help="every job under ROOT"))
def status(args):
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


@verb("list-jobs", arg("--name", help="only jobs with this name"))
def list_jobs(args):
    states = all_states(args.root)
    if args.name:
        states = [state for state in states if state.get("name") == args.name]
    return {"jobs": states}


@verb("logs", JOB, arg("--offset", type=int, default=0, help="first byte to send"),
      arg("--follow", action="store_true", help="until the job ends"),
      arg("--poll", type=float, default=0.2, help="seconds between checks"),
      output="own", in_session=False)
def logs(args):
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


@verb("cancel", JOB, arg("--grace", type=float, default=DEFAULT_GRACE_S,
                         help="seconds between SIGTERM and SIGKILL"))
def cancel(args):
    path = existing_job_dir(args.root, args.job)
    if load_state(path)["state"] in ("succeeded", "failed", "cancelled"):
        return load_state(path)
    if scheduler_of(path) is not None:  # Slurm runs it: Slurm stops it (scancel)
        return scheduler_of(path).cancel(path, args.grace)
    # The request goes first: a supervisor not yet up finds it; one already up has its pid read.
    save_json_atomic(os.path.join(path, "cancel.json"), {"grace": args.grace,
                                                          "requested_at": utc_now()})
    state = load_state(path)
    if state["state"] in ACTIVE_STATES and state.get("pid"):
        signal_pid(state["pid"], signal.SIGTERM)  # the supervisor stops the task and records it
    spec = load_json(os.path.join(path, "spec.json"))
    if spec.get("docker_container"):
        container_stop(spec.get("container_engine") or "docker", spec["docker_container"],
                       args.grace)
    state = wait_final(path, args.grace + 10.0)
    if state["state"] in ACTIVE_STATES or state["state"] == "lost":
        state = cancel_without_supervisor(path, state, args.grace)
    return with_log_size(path, state)


def signal_pid(pid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def container_stop(engine, container, grace):
    """Killing the engine's CLI (docker or podman run) does not stop its container: ask the
    engine. Errors (already gone, never started) change nothing for the job's state, so they
    are ignored."""
    if shutil.which(engine):
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run([engine, "stop", "-t", str(int(grace)), container],
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


@verb("read-log", JOB, arg("--offset", type=int, default=0),
      arg("--wait", type=float, default=5.0), arg("--max-bytes", type=int, default=1 << 20))
def read_log(args):
    """Long poll: the job's log from OFFSET, as soon as there is some, the job ends, or WAIT
    seconds pass. The answer says the next offset and whether the job is final and drained."""
    path = existing_job_dir(args.root, args.job)
    deadline = time.monotonic() + args.wait
    began = None
    while True:
        state = load_state(path)  # first: once final, the file holds everything
        began = began or state["state"]  # a change (queued -> running) is news for a follower
        with open(os.path.join(path, "output.log"), "rb") as log:
            log.seek(args.offset)
            data = log.read(args.max_bytes)
        end = args.offset + len(data)
        drained = end >= state.get("log_bytes", 0)
        final = state["state"] in FINAL_STATES
        if data or final or state["state"] != began or time.monotonic() >= deadline:
            return {"data": base64.b64encode(data).decode("ascii"), "offset": end,
                    "done": final and drained, "state": state}
        time.sleep(0.1)
