"""The supervisor: a detached process per job that runs its tasks and records every transition.

`launch` (agent.jobs) double-forks it by re-executing this agent (the zipapp archive, see
protocol.self_argv) as `supervise JOB --lock-fd N`, in its own session with no SSH pipes, so it
outlives the SSH session. Tasks run in order, each in its own process group, their output
appended to output.log; whatever a task leaves behind in its group is killed when it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import signal
import subprocess
import time
import traceback

from . import after, gang, leases
from .jobstate import (
    DEFAULT_GRACE_S,
    boot_id,
    existing_job_dir,
    load_json,
    save_json_atomic,
    spec_tasks,
    utc_now,
)
from .protocol import arg, self_argv, verb


def spawn_supervisor(root, job_id, path, lock_fd):
    """Double fork: the supervisor gets its own session, no terminal and none of the SSH
    channel's pipes, so it outlives the SSH session and this process; init adopts it."""
    argv = self_argv() + ["--root", root, "supervise", job_id, "--lock-fd", str(lock_fd)]
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



@verb("supervise", arg("job", help="job id"),
      arg("--lock-fd", type=int, required=True, help=argparse.SUPPRESS),
      output="own", in_session=False)
def supervise(args):
    path = existing_job_dir(args.root, args.job)
    os.set_inheritable(args.lock_fd, False)  # held till we exit; never passed to the tasks
    cancel = []  # the SIGTERM handler only appends: all the work happens in the main loop
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: cancel.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    spec = load_json(os.path.join(path, "spec.json"))
    state = load_json(os.path.join(path, "state.json"))
    state.update(pid=os.getpid(), pgid=os.getpgid(0), boot_id=boot_id())
    if os.path.exists(os.path.join(path, "cancel.json")):
        cancel.append(signal.SIGTERM)  # cancelled before we were up
    lease = None
    refused: list = []  # wait_for_slots appends when --no-queue refuses a busy host
    if spec.get("after") and not cancel and not after.wait(path, spec, state, cancel):
        end_unstarted(path, state, refused)  # cancelled while it waited for earlier jobs
        return None
    if leases.wanted(spec) and not cancel:
        lease = wait_for_slots(path, spec, state, cancel, refused)
        if lease is None:  # cancelled while queued, or busy with --no-queue: it never starts
            end_unstarted(path, state, refused)
            return None
    if spec.get("gang"):  # one rank of a multi-node job: hold the slots until every rank has
        go_env = gang.wait_for_go(path, spec, state, cancel)  # its own (agent/gang.py)
        if go_env is None:
            if lease is not None:
                lease.release()
            return None
        spec["env"] = dict(spec.get("env") or {}, **go_env)
    state.update(state="running", started_at=utc_now(),
                 lease={"slots": lease.slots, "gpus": lease.gpus} if lease else None)
    save_json_atomic(os.path.join(path, "state.json"), state)
    try:
        final, code, error = run_tasks(path, spec, state, cancel, lease)
    except Exception as err:  # recorded, so the job ends "failed" instead of "lost"
        traceback.print_exc()
        if state.get("task_pgid"):
            signal_group(state["task_pgid"], signal.SIGKILL)  # no task outlives its supervisor
        final, code, error = "failed", None, "the job's supervisor failed: %r" % err
    state.update(state=final, exit_code=code, error=error, ended_at=utc_now())
    save_json_atomic(os.path.join(path, "state.json"), state)
    if lease is not None:
        lease.release()  # the locks would go with this process anyway; the record goes now
    return None


def wait_for_slots(path, spec, state, cancel, refused):
    """The job's place in the host's queue (agent.leases): a Lease once granted, None when
    cancelled while waiting or, with no_queue, refused because the slots are busy."""
    def on_wait():
        if spec.get("no_queue"):
            refused.append(True)
            return False
        state.update(state="queued", queued_at=utc_now())
        save_json_atomic(os.path.join(path, "state.json"), state)
        return True

    return leases.acquire(leases.Ticket(spec, os.path.dirname(os.path.dirname(path))),
                          lambda: bool(cancel), on_wait)


def end_unstarted(path, state, refused):
    if refused:
        state.update(state="failed", refused=True, ended_at=utc_now(),
                     error="no free slot on this host and the job may not queue (--no-queue)")
    else:
        state.update(state="cancelled", ended_at=utc_now())
    save_json_atomic(os.path.join(path, "state.json"), state)


def task_env(spec, task=None, lease=None):
    """The job's environment, then the task's own, then its lease's (granted GPUs); its
    path_prepend folders first on PATH."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # so a followed log shows lines as they happen
    env.update(spec.get("env") or {})
    env.update((task or {}).get("env") or {})
    env.update(lease.env() if lease else {})
    prepend = (task or {}).get("path_prepend") or []
    if prepend:
        env["PATH"] = os.pathsep.join(list(prepend) + [env.get("PATH", "")])
    return env


def task_argv(spec, task, lease):
    """A container task's GPU flags name the granted GPUs (the controller built them before
    the grant, naming the first ones)."""
    if lease and lease.gpus and spec.get("container_engine"):
        return leases.container_gpu_argv(task["argv"], lease.gpus)
    return task["argv"]


def task_cwd(root, path, spec, task):
    """A task's folder: its own cwd, else the spec's; relative paths are under ROOT; by default
    the job's workspace/ folder."""
    cwd = task.get("cwd") or spec.get("cwd")
    if not cwd:
        cwd = os.path.join(path, "workspace")
        os.makedirs(cwd, exist_ok=True)
    return os.path.join(root, os.path.expanduser(cwd))


def run_tasks(path, spec, state, cancel, lease=None):
    """Run the tasks in order, stopping at the first failure: (final state, exit code, error).
    A leased job's tasks see only its GPUs: in their environment, and in a container's argv."""
    root = os.path.dirname(os.path.dirname(path))
    log_fd = os.open(os.path.join(path, "output.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o644)
    try:
        for task in spec_tasks(spec):
            if cancel:
                return "cancelled", None, None
            try:
                proc = subprocess.Popen(task_argv(spec, task, lease),
                                        cwd=task_cwd(root, path, spec, task),
                                        env=task_env(spec, task, lease), stdin=subprocess.DEVNULL,
                                        stdout=log_fd, stderr=subprocess.STDOUT,
                                        start_new_session=True)
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


