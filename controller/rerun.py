"""`cube rerun` / `cube remote rerun`: the same tasks with the same parameters, and what has
changed in the local cube since the recorded run (shown before it starts)."""

from __future__ import annotations

from pathlib import Path

from controller import records
from controller.cube import load_cube
from controller.errors import CubeError
from controller.jobs import Job
from controller.local import LocalRequest
from controller.plan import plan_job
from controller.recorddiff import Difference, diff_records
from controller.remote import RunRequest

# What a rerun compares: what the local cube holds now. The frozen packages, the host and the
# image are what a run finds where it runs, so they are compared after it, with `cube diff`.
COMPARED = ("files", "requirements", "params", "inputs", "config", "cube")


def overrides_of(job: Job) -> dict[str, str]:
    hidden = sorted(k for k, v in job.params.items() if v == "***")
    if hidden:
        raise CubeError(f"Job {job.id} had secret parameters whose values were not recorded: "
                        f"{', '.join(hidden)}.", "Run it again with `cube run`/`cube remote "
                        "run` and give them as NAME=VALUE.")
    return dict(job.params)


def current_state(job: Job, record: dict) -> dict:
    """The parts of a record that the local cube would produce now, for the same request."""
    cube = load_cube(job.cube_path, workspace=Path(record["cube"]["workspace"]),
                     config_overrides=record.get("config") or [],
                     requested_runtime=record["runtime"]["name"])
    plan = plan_job(cube, job.tasks, overrides_of(job))
    return {"files": records.code_files(plan), "requirements": sorted(cube.env.requirements),
            "params": {"overrides": plan.overrides, "resolved": records.resolved_params(plan)},
            "inputs": records.input_entries(plan), "config": record.get("config") or [],
            "cube": {"requirements_file": cube.env.requirements_file},
            "runtime": {"name": plan.runtime}}


def changes_since(job: Job, record: dict) -> list[Difference]:
    recorded = {key: record.get(key) for key in COMPARED}
    recorded["runtime"] = {"name": record["runtime"]["name"]}
    return diff_records(recorded, current_state(job, record))


def local_request(job: Job, record: dict) -> LocalRequest:
    return LocalRequest(Path(job.cube_path), ",".join(job.tasks), overrides_of(job),
                        runtime=record["runtime"]["name"],
                        workspace=Path(record["cube"]["workspace"]),
                        config_overrides=record.get("config") or [])


def remote_request(job: Job, record: dict, host: str | None = None,
                   detach: bool = False) -> RunRequest:
    return RunRequest(cube_path=Path(job.cube_path), host=host or job.host,
                      tasks=",".join(job.tasks), overrides=overrides_of(job),
                      config_overrides=record.get("config") or [],
                      workspace=Path(record["cube"]["workspace"]),
                      runtime=record["runtime"]["name"], detach=detach,
                      inventory=Path(job.inventory) if job.inventory else None)
