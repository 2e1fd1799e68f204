"""`cube run`: a job on this machine, through the same seams as a remote one.

The job is planned once (controller.plan), its runtime prepares this machine (LocalTarget,
LocalLayout) and returns a launch spec, and the foreground launcher runs the tasks in order.
Nothing here prints: messages go to the caller's `log` sink, task output to the terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controller import paths, records
from controller.cube import Cube, load_cube
from controller.errors import CubeError, TaskFailed
from controller.jobs import Job, Ledger, new_job_id
from controller.launchers import ForegroundLauncher, check_job_inputs, failure_hint
from controller.plan import JobPlan, LocalLayout, plan_job
from controller.runtimes import get_runtime
from controller.runtimes.base import LaunchSpec, LocalFacts
from controller.target import LocalTarget

Log = Callable[[str], None]


@dataclass
class LocalRequest:
    cube_path: Path
    tasks: str | None = None
    overrides: dict[str, str] | None = None
    runtime: str | None = None
    workspace: Path | None = None
    config_overrides: list[str] | None = None
    grace: float = 10.0


def load_and_plan(req: LocalRequest, log: Log) -> JobPlan:
    """The cube loaded, its warnings shown, the job resolved once."""
    cube = load_cube(req.cube_path, workspace=req.workspace,
                     config_overrides=req.config_overrides or [], requested_runtime=req.runtime)
    for warning in cube.warnings:
        log(f"warning: {warning}")
    return plan_job(cube, req.tasks or only_task(cube), req.overrides or {})


def only_task(cube: Cube) -> str:
    if len(cube.tasks) == 1:
        return next(iter(cube.tasks))
    raise CubeError(f"Cube '{cube.name}' has several tasks; say which to run.",
                    f"Pass --task NAME[,NAME...]. Valid tasks: {', '.join(cube.tasks)}.")


def prepare(plan: JobPlan, log: Log, *, dry_run: bool = False) -> LaunchSpec:
    """This machine made ready for the job (or, with dry_run, what would be done)."""
    layout = LocalLayout(plan.cube.root, paths.envs_dir())
    log(f"runtime {plan.runtime} ({plan.runtime_reason})")
    return get_runtime(plan.runtime).prepare(plan, LocalTarget(), layout, LocalFacts(), log,
                                             dry_run=dry_run)


def run(req: LocalRequest, log: Log) -> str:
    """Plan, prepare and run the tasks here, recorded in the ledger as a job; returns its id.
    The first failure raises TaskFailed with the task's exit code."""
    plan = load_and_plan(req, log)
    check_job_inputs(plan)
    spec = prepare(plan, log)
    with Ledger() as ledger:
        job = _new_job(plan, req)
        ledger.save_record(job.id, records.start_record(
            plan, job, spec, records.local_host(), req.config_overrides or [], LocalTarget(),
            str(paths.envs_dir())))
        job.started_at, job.state = time.time(), "running"
        ledger.save(job)
        state: dict = {"state": "failed", "exit_code": None}   # until the launcher answers
        try:
            state = ForegroundLauncher(plan, log, req.grace).launch(LocalTarget(), job.id,
                                                                     None, spec)
        except KeyboardInterrupt:
            state = {"state": "cancelled", "exit_code": 130}
            raise
        finally:
            _finish(ledger, job, state)
    if state["state"] != "succeeded":
        task, code = state["task"], state["exit_code"]
        raise TaskFailed(task, code, failure_hint(plan, task, code))
    return job.id


def _new_job(plan: JobPlan, req: LocalRequest) -> Job:
    cube = plan.cube
    return Job(id=new_job_id(cube.name), cube=cube.name, host="local", tasks=plan.task_names,
               cube_path=str(cube.root), params=dict(plan.overrides), runtime=plan.runtime,
               workspace=str(cube.workspace), outputs=plan.outputs_to_pull,
               launcher="foreground")


def _finish(ledger: Ledger, job: Job, state: dict) -> None:
    job.state, job.exit_code = state["state"], state.get("exit_code")
    job.ended_at = time.time()
    job.outputs_pulled = True   # they were written in place
    ledger.save(job)
    record = ledger.record(job.id)
    if record is not None:
        outputs = records.output_digests(Path(job.workspace), job.outputs)
        ledger.save_record(job.id, records.finish_record(record, job, state, outputs))
