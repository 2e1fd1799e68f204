"""Jobs that Slurm runs: `slurm-submit` on the login node, `slurm-run` inside the batch job.

`slurm-submit` writes the job folder as `launch` does (spec.json, output.log, state.json, now
`queued`) plus `slurm.sh` (the batch script) and `slurm.json` (the Slurm job id), then runs
sbatch. The batch script runs `slurm-run JOB`, which runs the ordinary supervisor
(agent.supervisor) in the batch job, so state.json and output.log are written as for any job.

A Slurm job's liveness is Slurm's to judge, not our locks' (the supervisor runs on a compute
node with its own boot id): agent.jobstate hands any folder holding `slurm.json` to `judge`
below, which reads `scontrol show job` (one call: state, reason, restart count; slurmctld
keeps finished jobs MinJobAge seconds), then `sacct` (accounting, for jobs slurmctld forgot).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

from . import jobstate
from .jobstate import (
    FINAL_STATES,
    existing_job_dir,
    held_lock,
    job_dir,
    load_json,
    read_spec,
    save_json_atomic,
    try_lock,
    utc_now,
    with_log_size,
)
from .protocol import AgentError, arg, self_argv, verb
from .supervisor import supervise

MARKER = "slurm.json"
# Slurm job states (squeue(1) "JOB STATE CODES") by what they mean to cube.
WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD",
           "SPECIAL_EXIT", "RESIZING", "STOPPED")
ACTIVE = ("RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT")
FAILED = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
          "PREEMPTED")
CACHE_S = 2.0      # a followed job asks 10 times a second; slurmctld hears at most this often
_cache: dict = {}  # slurm job id -> (monotonic time, answer, state.json's state then)


# -- submit (login node)

@verb("slurm-submit")
def slurm_submit(args):
    """stdin: {"spec": <job spec>, "sbatch": [extra sbatch args]}. Answers the job's state
    with `slurm_job_id`; sbatch's refusal is an error carrying sbatch's own words."""
    try:
        payload = json.load(sys.stdin)
    except ValueError as err:
        raise AgentError("slurm-submit: stdin is not JSON (%s)." % err) from None
    spec = read_spec(io.StringIO(json.dumps(payload.get("spec"))))
    for key in ("slots", "total_slots", "no_queue"):  # Slurm allocates; no host slots to lease
        spec.pop(key, None)
    path = make_job_dir(args.root, spec)
    script = os.path.join(path, "slurm.sh")
    with open(script, "w") as out:
        out.write(batch_script(args.root, spec["job_id"]))
    argv = ["sbatch", "--parsable", "--job-name=" + spec["job_id"], "--chdir=" + path,
            "--output=" + os.path.join(path, "slurm.out"), "--open-mode=append",
            "--requeue", "--signal=B:USR1@90"] + list(payload.get("sbatch") or []) + [script]
    proc = run(argv, 60)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        end_state(path, "failed", "sbatch refused the job: " + message)
        raise AgentError("sbatch refused the job: " + message, hint="sbatch " + " ".join(argv[1:]))
    slurm_id = proc.stdout.strip().split(";")[0]
    save_json_atomic(os.path.join(path, MARKER), {"job_id": slurm_id, "submitted_at": utc_now(),
                                                  "sbatch": argv})
    return with_log_size(path, judge(path, load_json(os.path.join(path, "state.json"))))


@verb("slurm-stage")
def slurm_stage(args):
    """stdin: {"spec": <job spec>, "sbatch": [extra sbatch args]}. Writes the job folder as
    slurm-submit does (state `queued`, `slurm.json` with no Slurm id yet, keeping the sbatch
    args) but submits nothing: `slurm-array` submits staged jobs together."""
    try:
        payload = json.load(sys.stdin)
    except ValueError as err:
        raise AgentError("slurm-stage: stdin is not JSON (%s)." % err) from None
    spec = read_spec(io.StringIO(json.dumps(payload.get("spec"))))
    for key in ("slots", "total_slots", "no_queue", "after"):
        spec.pop(key, None)
    path = make_job_dir(args.root, spec)
    save_json_atomic(os.path.join(path, MARKER), {"job_id": None,
                                                  "sbatch_args": payload.get("sbatch") or []})
    return with_log_size(path, load_json(os.path.join(path, "state.json")))


@verb("slurm-array")
def slurm_array(args):
    """stdin: {"name", "jobs": [staged job ids], "max_parallel": N or null}. Submits ONE job
    array (the first job's staged sbatch args; `--array=0-K%N`) whose task i runs `slurm-run
    JOBS[i]`; each job's slurm.json then names `<array id>_<i>`. Answers {"array_job_id",
    "jobs": {job id: its state}}."""
    try:
        payload = json.load(sys.stdin)
    except ValueError as err:
        raise AgentError("slurm-array: stdin is not JSON (%s)." % err) from None
    jobs = list(payload.get("jobs") or [])
    if not jobs:
        raise AgentError("slurm-array: no jobs given.")
    paths = [existing_job_dir(args.root, job) for job in jobs]
    folder = os.path.join(args.root, "slurm-arrays", jobs[0])
    os.makedirs(folder, exist_ok=True)
    table = os.path.join(folder, "jobs.txt")
    with open(table, "w") as out:
        out.write("".join("%s %s\n" % (job, path) for job, path in zip(jobs, paths)))
    script = os.path.join(folder, "slurm.sh")
    with open(script, "w") as out:
        out.write(array_script(args.root, table))
    throttle = "%%%d" % payload["max_parallel"] if payload.get("max_parallel") else ""
    argv = ["sbatch", "--parsable", "--array=0-%d%s" % (len(jobs) - 1, throttle),
            "--job-name=" + str(payload.get("name") or jobs[0]), "--chdir=" + folder,
            "--output=" + os.path.join(folder, "slurm-%a.out"), "--open-mode=append",
            "--requeue", "--signal=B:USR1@90"] + list(
                load_json(os.path.join(paths[0], MARKER)).get("sbatch_args") or []) + [script]
    proc = run(argv, 60)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        for path in paths:
            end_state(path, "failed", "sbatch refused the job array: " + message)
        raise AgentError("sbatch refused the job array: " + message,
                         hint="sbatch " + " ".join(argv[1:]))
    array_id = proc.stdout.strip().split(";")[0]
    states = {}
    for i, (job, path) in enumerate(zip(jobs, paths)):
        save_json_atomic(os.path.join(path, MARKER), {
            "job_id": "%s_%d" % (array_id, i), "array_job_id": array_id, "array_task_id": i,
            "submitted_at": utc_now(), "sbatch": argv})
        states[job] = with_log_size(path, judge(path, load_json(os.path.join(path,
                                                                              "state.json"))))
    return {"array_job_id": array_id, "jobs": states}


def array_script(root, table):
    """Array task i runs the supervisor of the table's line i+1 (`JOB FOLDER`), exec'd as in
    batch_script, with its output in that job's own slurm.out."""
    argv = ["python3"] + self_argv()[1:] + ["--root", root, "slurm-run"]
    return ("#!/bin/sh\n# cube job array, submitted by the cube agent's slurm-array\n"
            "set -- $(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" %s)\n"
            "[ -n \"$2\" ] || { echo \"cube: no job for array task $SLURM_ARRAY_TASK_ID\" >&2; "
            "exit 1; }\n"
            "cd \"$2\" && exec >>\"$2/slurm.out\" 2>&1\nexec %s \"$1\"\n"
            % (quote(table), " ".join(quote(a) for a in argv)))


def make_job_dir(root, spec):
    path = job_dir(root, spec["job_id"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        raise AgentError("job %r already exists under %s." % (spec["job_id"], root),
                         hint="job ids are unique: submit with a new id") from None
    save_json_atomic(os.path.join(path, "spec.json"), spec)
    for folder in spec.get("mkdirs") or []:
        os.makedirs(os.path.join(path, folder), exist_ok=True)
    open(os.path.join(path, "output.log"), "ab").close()
    # The marker first: from here on jobstate hands the folder to `judge`, never to the lock
    # test that would call a job without a supervisor lost.
    save_json_atomic(os.path.join(path, MARKER), {"job_id": None})
    state = {"version": jobstate.STATE_VERSION, "job_id": spec["job_id"], "name": spec.get("name"),
             "state": "queued", "scheduler": "slurm", "tasks": [t["name"] for t in
                                                                jobstate.spec_tasks(spec)],
             "task": None, "pid": None, "pgid": None, "task_pid": None, "task_pgid": None,
             "exit_code": None, "error": None, "created_at": utc_now(), "started_at": None,
             "ended_at": None, "boot_id": None}
    save_json_atomic(os.path.join(path, "state.json"), state)
    return path


def batch_script(root, job_id):
    """exec: the supervisor IS the batch step, so Slurm's signals (USR1 before the limit,
    TERM on cancel or requeue) reach it directly."""
    # python3 as found on the compute node (as the agent's session starts on any host), with
    # this agent's interpreter flags.
    argv = ["python3"] + self_argv()[1:] + ["--root", root, "slurm-run", job_id]
    return ("#!/bin/sh\n# cube job %s, submitted by the cube agent's slurm-submit\nexec %s\n"
            % (job_id, " ".join(quote(a) for a in argv)))


def quote(word):
    return word if re.match(r"^[A-Za-z0-9_./=:@%+-]+$", word) else "'" + word.replace(
        "'", "'\"'\"'") + "'"


def run(argv, timeout):
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(argv, 127, "", "%s: %s" % (argv[0], err))


def end_state(path, final, error):
    with held_lock(os.path.join(path, "state.lock")):
        state = load_json(os.path.join(path, "state.json"))
        state.update(state=final, error=error, ended_at=state.get("ended_at") or utc_now(),
                     slurm_final=True)
        save_json_atomic(os.path.join(path, "state.json"), state)
        return state


# -- run (inside the batch job)

@verb("slurm-run", arg("job", help="job id"), output="own", in_session=False)
def slurm_run(args):
    """The batch script's command: mark a rerun in the log, then supervise as `launch` would."""
    path = existing_job_dir(args.root, args.job)
    lock_fd = wait_lock(os.path.join(path, "supervisor.lock"), 60.0)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts:
        with open(os.path.join(path, "output.log"), "ab") as log:
            log.write(("\n==== cube: Slurm requeued job %s (restart %d) on %s; the tasks run "
                       "again ====\n" % (os.environ.get("SLURM_JOB_ID"), restarts,
                                         os.environ.get("SLURMD_NODENAME"))).encode())
    with held_lock(os.path.join(path, "state.lock")):
        state = load_json(os.path.join(path, "state.json"))
        state.update(exit_code=None, error=None, ended_at=None, task=None, requeues=restarts,
                     node=os.environ.get("SLURMD_NODENAME"))
        save_json_atomic(os.path.join(path, "state.json"), state)
    signal.signal(signal.SIGUSR1, lambda signum, frame: forward_warning(path, signum))
    return supervise(argparse.Namespace(root=args.root, job=args.job, lock_fd=lock_fd))


def wait_lock(lock_path, seconds):
    """On a requeue the previous attempt's supervisor may still be dying: wait for its lock."""
    deadline = time.monotonic() + seconds
    while True:
        fd = try_lock(lock_path)
        if fd is not None or time.monotonic() > deadline:
            return fd if fd is not None else os.open(lock_path, os.O_RDWR)
        time.sleep(0.2)


def forward_warning(path, signum):
    """Slurm's warning before the time limit (or a preemption): passed to the running task when
    it handles the signal (it checkpoints); one that does not would just die of it early."""
    state = load_json(os.path.join(path, "state.json"))
    pid, pgid = state.get("task_pid"), state.get("task_pgid")
    handled = bool(pid) and catches(pid, signum)
    note = "passed to task %s" % state.get("task") if handled else \
        "not passed on (the task does not handle it)"
    with open(os.path.join(path, "output.log"), "ab") as log:
        log.write(("\n==== cube: Slurm sent %s before the job's time limit; %s ====\n"
                   % (signal.Signals(signum).name, note)).encode())
    if handled:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)


def catches(pid, signum):
    """Whether the process has a handler for the signal (SigCgt in /proc/PID/status)."""
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


# -- judge and cancel (login node; called through agent.jobstate)

def judge(path, state):
    """The job's state as Slurm sees it, on top of state.json. Final verdicts are persisted
    once (`slurm_final`); waiting and running ones are answered live."""
    if state.get("slurm_final"):
        return state
    try:
        marker = load_json(os.path.join(path, MARKER))
    except (OSError, ValueError):
        marker = {}
    if not marker.get("job_id"):
        return state  # sbatch has not answered yet
    # A change in state.json (the supervisor started or ended) makes a cached answer stale.
    info = query(marker["job_id"], seen=state["state"])
    state = dict(state, slurm_job_id=marker["job_id"])
    if info.get("error"):
        return dict(state, slurm_error=info["error"])
    if info.get("state") is None:
        final = state["state"] if state["state"] in FINAL_STATES else "lost"
        return settle(path, final, "Slurm no longer knows job %s" % marker["job_id"]
                      if final == "lost" else None, info)
    slurm_state = info["state"]
    state.update(slurm_state=slurm_state, requeues=info.get("restarts", state.get("requeues")))
    if info.get("array_job_id"):
        state.update(slurm_array_job_id=info["array_job_id"],
                     slurm_array_task_id=info.get("array_task_id"))
    if slurm_state in WAITING:
        return dict(state, state="queued", reason=reason_of(info))
    if slurm_state in ACTIVE or slurm_state not in FAILED + ("COMPLETED", "CANCELLED"):
        return dict(state, state="running", reason=None)
    if slurm_state == "COMPLETED" and state["state"] in FINAL_STATES:
        return settle(path, state["state"], None, info)
    if slurm_state == "COMPLETED":
        return settle(path, "failed", "the batch job ended without the supervisor recording "
                                      "an end (see slurm.out)", info)
    final = "cancelled" if slurm_state == "CANCELLED" else "failed"
    reason = reason_of(info)
    return settle(path, final, "Slurm: %s%s" % (slurm_state, " (%s)" % reason if reason else ""),
                  info)


def reason_of(info):
    """Slurm's reason (Resources, Priority, TimeLimit, ...); its "None" is none."""
    return info.get("reason") if info.get("reason") not in (None, "None", "(null)") else None


def settle(path, final, error, info):
    """Persist the final verdict under the state lock; Slurm's reason goes into `error`."""
    with held_lock(os.path.join(path, "state.lock")):
        state = load_json(os.path.join(path, "state.json"))
        state.update(state=final, slurm_final=True, slurm_state=info.get("state"),
                     slurm_job_id=load_json(os.path.join(path, MARKER)).get("job_id"),
                     requeues=info.get("restarts", state.get("requeues") or 0),
                     reason=reason_of(info), ended_at=state.get("ended_at") or utc_now())
        if info.get("array_job_id"):
            state.update(slurm_array_job_id=info["array_job_id"],
                         slurm_array_task_id=info.get("array_task_id"))
        if error:
            state["error"] = error
        save_json_atomic(os.path.join(path, "state.json"), state)
        return state


def query(slurm_id, fresh=False, seen=None):
    """{state, reason, restarts, exit_code} from scontrol, else sacct; {state: None} when
    Slurm does not know the job; {error} when Slurm does not answer (state.json stands)."""
    cached = _cache.get(slurm_id)
    if cached and not fresh and time.monotonic() - cached[0] < CACHE_S and cached[2] == seen:
        return cached[1]
    proc = run(["scontrol", "show", "job", "-o", slurm_id], 30)
    if proc.returncode == 0 and "JobState=" in proc.stdout:
        fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
        answer = {"state": fields.get("JobState"), "reason": fields.get("Reason"),
                  "restarts": int(fields.get("Restarts") or 0),
                  "exit_code": fields.get("ExitCode")}
        if fields.get("ArrayJobId"):  # a task of a job array (scontrol reports each task)
            answer.update(array_job_id=fields["ArrayJobId"],
                          array_task_id=fields.get("ArrayTaskId"))
    elif "Invalid job id" in proc.stderr:
        answer = from_sacct(slurm_id)
    else:
        answer = {"error": (proc.stderr or proc.stdout).strip() or "scontrol failed"}
    _cache[slurm_id] = (time.monotonic(), answer, seen)
    return answer


def from_sacct(slurm_id):
    proc = run(["sacct", "-X", "-n", "-P", "-j", slurm_id, "-o", "State,ExitCode"], 30)
    line = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
    if not line:
        return {"state": None}  # accounting off (no slurmdbd) or the job is unknown there too
    state, _, code = line[0].partition("|")
    return {"state": state.split()[0], "reason": None, "exit_code": code}


def cancel(path, grace):
    """scancel: a pending job leaves the queue; a running one gets SIGTERM (the supervisor
    records `cancelled`) and SIGKILL after Slurm's KillWait. Waits for the final state."""
    marker = load_json(os.path.join(path, MARKER))
    save_json_atomic(os.path.join(path, "cancel.json"), {"grace": grace, "requested_at": utc_now()})
    proc = run(["scancel", marker["job_id"]], 30)
    if proc.returncode != 0:
        raise AgentError("scancel %s failed: %s" % (marker["job_id"], proc.stderr.strip()),
                         hint="check the job with `scontrol show job %s`" % marker["job_id"])
    deadline = time.monotonic() + grace + 60.0
    while True:
        query(marker["job_id"], fresh=True)
        state = judge(path, load_json(os.path.join(path, "state.json")))
        if state["state"] in FINAL_STATES or time.monotonic() > deadline:
            return with_log_size(path, state)
        time.sleep(0.5)


class SlurmJobs:
    """What agent.jobstate and agent.jobs call for a folder holding slurm.json."""
    judge = staticmethod(judge)
    cancel = staticmethod(cancel)


jobstate.SCHEDULERS[MARKER] = SlurmJobs
