"""The life of a remote job: plan, connect, probe, sync up, prepare the runtime, launch, follow,
pull outputs, record. `attach` resumes following and pulling for a job started earlier.

Each step goes through a seam: the job plan (controller.plan) says what runs and what travels,
the runtime (controller.runtimes) prepares the host and returns a launch spec, the launcher
(controller.launchers) starts it. Nothing here prints: messages and log bytes go to the
caller's sinks. Each command opens one ledger and closes it.
"""

from __future__ import annotations

import base64
import fcntl
import os
import posixpath
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, TypeVar

import paramiko

from controller import jobs as ledger_mod
from controller import paths, placement, records, slurm, sync
from controller.cube import Cube, load_cube
from controller.errors import CubeError, HostUnreachable, TaskFailed
from controller.fleet import probe_args
from controller.hosts import resolve_host
from controller.jobs import Job, Ledger
from controller.launchers import launcher_for
from controller.plan import HostLayout, JobPlan, plan_job
from controller.runtimes import get_runtime
from controller.runtimes.base import ProbedFacts
from controller.sinks import Sinks
from controller.transport import ConnectionLost, HostTarget, connect, openssh_shell_argv

T = TypeVar("T")


@dataclass
class RunRequest:
    cube_path: Path
    host: str
    tasks: str
    overrides: dict[str, str] = field(default_factory=dict)
    config_overrides: list[str] = field(default_factory=list)
    workspace: Path | None = None
    runtime: str | None = None
    name: str | None = None
    detach: bool = False
    inventory: Path | None = None
    accept_new_host_key: bool = False
    gpus: int | None = None       # --gpus N: the accelerator count for this run (and demand)
    slots: int | None = None      # --slots N: slots the job holds on its host
    no_queue: bool = False        # fail (exit 2) instead of queueing on a busy host
    labels: list[str] = field(default_factory=list)  # --label: placement within the selection
    partition: str | None = None  # Slurm hosts: --partition and --time for this run
    time: str | None = None
    sweep: str | None = None      # controller.sweeps: the sweep and variant this job is
    variant: str | None = None
    after: list[str] = field(default_factory=list)  # start once these jobs on the host are final
    slurm_stage: bool = False     # a Slurm host: write the job only (a sweep's job array submits it)


@dataclass
class RunResult:
    job_id: str
    state: str               # the job's state when the command returns (running if detached)
    exit_code: int           # what the CLI exits with


# ---- starting a job ---------------------------------------------------------------------------


def run(req: RunRequest, sinks: Sinks) -> RunResult:
    """`cube remote run`: plan the job, start it on the host, follow it unless detached."""
    overrides = [*req.config_overrides, *placement.gpu_overrides(req.gpus)]
    cube = load_cube(req.cube_path, workspace=req.workspace,
                     config_overrides=overrides, requested_runtime=req.runtime)
    for warning in cube.warnings:
        sinks.log(f"warning: {warning}")
    plan = plan_job(cube, req.tasks, req.overrides)
    inputs = plan.inputs_to_push()
    demand = placement.demand_for(cube, req.gpus, req.slots)
    if placement.is_selection(req.host, req.labels):  # the ledger records the chosen host
        req = replace(req, host=placement.place(
            req.host, req.labels, req.inventory, demand, plan.runtime,
            cube.env.python_version, no_queue=req.no_queue, log=sinks.log))
    with Ledger() as ledger, _connect(req.host, req.inventory, req.accept_new_host_key,
                                      sinks.log) as target:
        # A Slurm login node is checked before the agent writes anything under its root.
        slurm.prepare_run(target, req.partition, req.time, cube, stage=req.slurm_stage)
        if req.name:
            running = _running_job_named(target, req.name)
            if running:
                sinks.log(f"job '{req.name}' is already running on {req.host} as {running}; "
                          "attaching")
                return _attach(ledger, ledger.get(running), sinks, target)
        job = _new_job(plan, req, target)
        sinks.job_started(job.id)
        sinks.log(f"job {job.id}: {', '.join(plan.task_names)} on {req.host} "
                  f"({plan.runtime}: {plan.runtime_reason})")
        _start(ledger, job, plan, inputs, target, sinks.log, overrides,
               demand=demand, no_queue=req.no_queue, after=req.after)
        if req.detach:
            sinks.log(f"detached; follow with `cube remote attach {job.id}`")
            return RunResult(job.id, job.state, 0)
        return _follow_and_finish(ledger, target, job, sinks)


def _start(ledger: Ledger, job: Job, plan: JobPlan, inputs: list[str], target: HostTarget,
           log: Callable[[str], None], config_overrides: list[str], *,
           demand: placement.Demand | None = None, no_queue: bool = False,
           after: list[str] | None = None) -> None:
    layout = HostLayout.for_plan(target.root, plan, job.id)
    probe = _timed(log, "probe", lambda: target.agent("probe", *probe_args(target.spec)))
    slots = placement.slot_request(target.spec, probe, demand, no_queue) if demand else None
    if slots is not None and after:
        slots.after = list(after)  # the agent waits for them before it queues (agent/after.py)
    facts = ProbedFacts(probe)
    _sync_up(target, plan.cube, layout, inputs, log)
    start = time.monotonic()
    spec = get_runtime(plan.runtime).prepare(plan, target, layout, facts, log)
    log(f"prepare {plan.runtime}: {time.monotonic() - start:.2f}s")
    job.env_hash = spec.env_key
    record = records.start_record(plan, job, spec, records.host_from_probe(job.host, probe),
                                  config_overrides, target, layout.envs_dir)
    ledger.save_record(job.id, record)
    state = launcher_for(target, slots).launch(target, job.id, job.name, spec)
    job.state = state.get("state", "running")
    job.slurm_job_id = state.get("slurm_job_id")
    job.launcher = "slurm" if job.slurm_job_id or state.get("scheduler") == "slurm" \
        else job.launcher
    job.started_at = time.time()
    ledger.save(job)
    if state.get("refused"):
        raise CubeError(f"Host {job.host} has no free slot for job {job.id} and --no-queue "
                        f"was given ({state.get('error')}).",
                        "Drop --no-queue to wait in the host's queue, or try another host.")
    if job.slurm_job_id:
        log(f"job {job.id} submitted to Slurm on {job.host} as job {job.slurm_job_id} "
            f"({state.get('slurm_state') or 'submitted'})")
    elif job.launcher == "slurm":
        log(f"job {job.id} staged on {job.host}; it is submitted with the sweep's job array")
    elif job.state == "queued":
        log(f"job {job.id} is queued on {job.host}: it starts when {slots.slots if slots else 1}"
            " slot(s) free up (`cube hosts` shows the queue)")
    elif job.state not in ("pending", "running"):
        log(f"job {job.id} did not start: {state}")


def _connect(host: str, inventory: Path | None, accept_new: bool,
             log: Callable[[str], None]) -> HostTarget:
    spec = resolve_host(host, inventory)
    return _timed(log, f"connect {host}", lambda: connect(spec, accept_new_host_key=accept_new))


def _timed(log: Callable[[str], None], what: str, fn: Callable[[], T]) -> T:
    start = time.monotonic()
    result = fn()
    log(f"{what}: {time.monotonic() - start:.2f}s")
    return result


def _running_job_named(target: HostTarget, name: str) -> str | None:
    found = target.agent("list-jobs", "--name", name).get("jobs", [])
    running = [j for j in found if j.get("state") in ("pending", "queued", "running")]
    return running[0]["job_id"] if running else None


def _new_job(plan: JobPlan, req: RunRequest, target: HostTarget) -> Job:
    cube = plan.cube
    job = Job(id=ledger_mod.new_job_id(cube.name), cube=cube.name, host=req.host,
              tasks=plan.task_names, name=req.name, cube_path=str(cube.root),
              params=dict(req.overrides), runtime=plan.runtime, remote_dir=target.root,
              workspace=str(cube.workspace), outputs=plan.outputs_to_pull,
              inventory=str(req.inventory or ""), launcher="agent", sweep=req.sweep,
              variant=req.variant)
    job.log_path = str(paths.cube_home() / "jobs" / job.id / "output.log")
    return job


def _sync_up(target: HostTarget, cube: Cube, layout: HostLayout, inputs: list[str],
             log: Callable[[str], None]) -> None:
    code = sync.push(target, cube.root, layout.cube_dir, exclude=_workspace_inside(cube))
    log(f"sync code: {describe_sync(code)}")
    if inputs:
        data = sync.push(target, cube.workspace, layout.inputs_dir, paths=inputs, delete=False)
        log(f"sync inputs: {describe_sync(data)}")


def describe_sync(report: sync.SyncReport) -> str:
    return (f"{report.files_sent} files, {report.bytes_sent:,} bytes sent, "
            f"{report.files_deleted} deleted, {report.seconds:.2f}s")


def _workspace_inside(cube: Cube) -> list[str]:
    try:
        return [cube.workspace.relative_to(cube.root).as_posix()]
    except ValueError:
        return []


# ---- following a job --------------------------------------------------------------------------

# How long one `read-log` long poll may wait for new output. Bounded polls let a read timeout
# tell a dead link (no TCP error for minutes) from a quiet task.
FOLLOW_WINDOW_S = float(os.environ.get("CUBE_FOLLOW_WINDOW", 20))
READ_TIMEOUT_S = FOLLOW_WINDOW_S + max(5.0, FOLLOW_WINDOW_S)
RECONNECT_BUDGET_S = float(os.environ.get("CUBE_RECONNECT_BUDGET", 600))
CONNECTION_ERRORS = (socket.error, socket.timeout, EOFError, paramiko.SSHException,
                     ConnectionError, ConnectionLost)


def _follow_and_finish(ledger: Ledger, target: HostTarget, job: Job, sinks: Sinks) -> RunResult:
    state = _follow(target, job, sinks)
    _finish(ledger, target, job, state, sinks.log)
    return RunResult(job.id, job.state, _exit_code(job, sinks.log))


def _follow(target: HostTarget, job: Job, sinks: Sinks) -> dict:
    """Stream the job's log from where the local copy ends until the job is final; reconnect
    on a dropped link. The local log file's size IS the offset, so no byte is lost or doubled,
    even across a killed controller, or with several followers of one job (a terminal and the
    web page): each appends under a lock only if the file has not grown meanwhile, and shows
    what the file gained, whoever wrote it."""
    path = Path(job.log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as out, open(path, "rb") as shown:
        shown.seek(0, os.SEEK_END)
        seen = None
        while True:
            offset = os.fstat(out.fileno()).st_size
            try:
                answer = _read_log(target, job.id, offset)
            except CONNECTION_ERRORS as err:
                sinks.log(f"connection to {job.host} lost ({type(err).__name__}: {err}); "
                          "reconnecting")
                reconnect(target, sinks.log)
                continue
            _append_at(out, offset, base64.b64decode(answer["data"]))
            _show_new(shown, sinks)
            seen = slurm.note_state(answer["state"], seen, sinks.log)
            if answer["done"]:
                return answer["state"]


def _append_at(out: BinaryIO, offset: int, chunk: bytes) -> None:
    """Append `chunk`, read from `offset`, unless another follower appended meanwhile."""
    if not chunk:
        return
    fcntl.flock(out.fileno(), fcntl.LOCK_EX)
    try:
        if os.fstat(out.fileno()).st_size == offset:
            out.write(chunk)
            out.flush()
    finally:
        fcntl.flock(out.fileno(), fcntl.LOCK_UN)


def _show_new(shown: BinaryIO, sinks: Sinks) -> None:
    chunk = shown.read()
    if chunk:
        sinks.output(chunk)


def _read_log(target: HostTarget, job_id: str, offset: int) -> dict:
    """One long poll: returns as soon as the log grows or the job ends. Its timeout is how a
    dead link (silent for minutes at the TCP level) is told from a quiet task."""
    return target.agent("read-log", job_id, "--offset", str(offset), "--wait",
                        str(FOLLOW_WINDOW_S), timeout=READ_TIMEOUT_S)


def reconnect(target: HostTarget, log: Callable[[str], None]) -> None:
    """Reconnect a dropped link, retrying for up to CUBE_RECONNECT_BUDGET seconds (default 600);
    HostUnreachable once that is spent. The single-host follow and each rank's follower use it."""
    deadline = time.monotonic() + RECONNECT_BUDGET_S
    while True:
        try:
            target.reconnect()
            log("reconnected")
            return
        except HostUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _finish(ledger: Ledger, target: HostTarget, job: Job, state: dict,
            log: Callable[[str], None]) -> None:
    job.state = state.get("state", job.state)
    job.exit_code = state.get("exit_code")
    job.reason = state.get("error") or state.get("reason")
    job.ended_at = time.time()
    ledger.save(job)
    pull_outputs(ledger, target, job, log)
    record = ledger.record(job.id)
    if record is not None:
        outputs = records.output_digests(Path(job.workspace), job.outputs)
        ledger.save_record(job.id, records.finish_record(record, job, state, outputs))


def finish(ledger: Ledger, target: HostTarget, job: Job, state: dict,
           log: Callable[[str], None]) -> None:
    """A job found final (controller.sweeps polls many): its end recorded, outputs pulled."""
    _finish(ledger, target, job, state, log)


def pull_outputs(ledger: Ledger, target: HostTarget, job: Job,
                 log: Callable[[str], None]) -> None:
    outputs_dir = HostLayout(job.remote_dir, job.cube, job.id).outputs_dir
    report = sync.pull(target, outputs_dir, Path(job.workspace), paths=job.outputs)
    log(f"pulled outputs into {job.workspace}: {describe_sync(report)}")
    job.outputs_pulled = True
    ledger.save(job)


def _exit_code(job: Job, log: Callable[[str], None]) -> int:
    log(f"job {job.id} {job.state}" + (f" (exit {job.exit_code})" if job.exit_code else ""))
    if job.state == "succeeded":
        return 0
    if job.state == "failed":
        raise TaskFailed(",".join(job.tasks), job.exit_code or 1,
                         f"Its log: {job.log_path} (`cube remote logs {job.id}`).")
    if job.state == "cancelled":
        return 130
    raise CubeError(f"Job {job.id} was lost on {job.host}: its process vanished without "
                    "recording an end (host reboot or killed supervisor).",
                    f"Outputs it wrote were pulled into {job.workspace}; re-run the task.",
                    exit_code=1)


# ---- jobs started earlier -----------------------------------------------------------------------


def connect_for(job: Job, log: Callable[[str], None]) -> HostTarget:
    return _connect(job.host, Path(job.inventory) if job.inventory else None, False, log)


def attach(ref: str, sinks: Sinks) -> RunResult:
    """Follow a job to its end and pull its outputs (again if needed)."""
    with Ledger() as ledger:
        job = ledger.get(ref)
        sinks.job_started(job.id)
        if job.launcher == "gang":  # a multi-node job: every rank's host
            from controller import gangjobs  # noqa: PLC0415 (only multi-node jobs need it)
            return gangjobs.attach(ledger, job, sinks)
        with connect_for(job, sinks.log) as target:
            return _attach(ledger, job, sinks, target)


def _attach(ledger: Ledger, job: Job, sinks: Sinks, target: HostTarget) -> RunResult:
    return _follow_and_finish(ledger, target, job, sinks)


def status(ref: str) -> dict:
    with Ledger() as ledger:
        job = ledger.get(ref)
        if job.launcher == "gang":
            from controller import gangjobs  # noqa: PLC0415
            return gangjobs.status(ledger, job)
        with connect_for(job, lambda _m: None) as target:
            state = target.agent("status", job.id)
        if state.get("state") != job.state and not job.finished:
            job.state, job.exit_code = state.get("state"), state.get("exit_code")
            job.reason = state.get("error") or state.get("reason")
            ledger.save(job)
    return {"job": job.id, "host": job.host, **state}


def cancel(ref: str, grace: float, log: Callable[[str], None]) -> dict:
    with Ledger() as ledger:
        job = ledger.get(ref)
        if job.launcher == "gang":
            from controller import gangjobs  # noqa: PLC0415
            return gangjobs.cancel(ledger, job, grace, log)
        with connect_for(job, log) as target:
            state = target.agent("cancel", job.id, "--grace", str(grace))
        job.state, job.exit_code = state.get("state", job.state), state.get("exit_code")
        job.reason = state.get("error") or state.get("reason")
        ledger.save(job)
    return state


def fetch(ref: str, log: Callable[[str], None]) -> None:
    with Ledger() as ledger:
        job = ledger.get(ref)
        if job.launcher == "gang":
            from controller import gangjobs  # noqa: PLC0415
            return gangjobs.fetch(ledger, job, log)
        with connect_for(job, log) as target:
            pull_outputs(ledger, target, job, log)


def logs(ref: str, follow: bool, sinks: Sinks) -> None:
    """The job's log: the local copy, then (with follow, or if the job may have more) the rest."""
    with Ledger() as ledger:
        job = ledger.get(ref)
    if job.launcher == "gang":
        from controller import gangjobs  # noqa: PLC0415
        return gangjobs.logs(job, follow, sinks)
    path = Path(job.log_path)
    if path.exists():
        sinks.output(path.read_bytes())
    if job.finished and not follow and job.outputs_pulled:
        return
    with connect_for(job, sinks.log) as target:
        if follow:
            _follow(target, job, sinks)
        else:
            _copy_new_log(target, job, path, sinks)


def shell_argv(ref: str) -> list[str]:
    """OpenSSH's client gives a real TTY; host keys are checked against the same files."""
    with Ledger() as ledger:
        job = ledger.get(ref)
    spec = resolve_host(job.host, Path(job.inventory) if job.inventory else None)
    layout = HostLayout(job.remote_dir, job.cube, job.id)
    rc = ["[ -f ~/.bashrc ] && . ~/.bashrc"]  # the user's own setup first, then the env on top
    if job.runtime == "python":
        env = posixpath.join(layout.envs_dir, job.env_hash)
        rc.append(f"export VIRTUAL_ENV={shlex.quote(env)} PATH={shlex.quote(env)}/bin:\"$PATH\"")
    rc_file = posixpath.join(layout.job_dir, ".cube-shellrc")
    remote_cmd = (f"cd {shlex.quote(layout.job_dir)} && printf '%s\\n' "
                  f"{' '.join(shlex.quote(line) for line in rc)} > {shlex.quote(rc_file)} && "
                  f"exec bash --rcfile {shlex.quote(rc_file)} -i")
    return [*openssh_shell_argv(spec), remote_cmd]


def _copy_new_log(target: HostTarget, job: Job, path: Path, sinks: Sinks) -> None:
    """What the host's log has beyond the local copy, appended there and passed on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as out:
        while True:
            answer = target.agent("read-log", job.id, "--offset", str(out.tell()), "--wait", "0")
            chunk = base64.b64decode(answer["data"])
            if not chunk:
                return
            _append_log(out, chunk, sinks)


def _append_log(out: BinaryIO, chunk: bytes, sinks: Sinks) -> None:
    """Log bytes from the host: into the local copy (its size is the next offset), and shown."""
    out.write(chunk)
    out.flush()
    if chunk:
        sinks.output(chunk)
