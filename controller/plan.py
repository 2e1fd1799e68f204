"""A job, resolved once: which tasks, with which parameters, where each path lives, what
travels to the target and what comes back.

`plan_job` is the only place that applies parameter overrides and chooses the runtime. The
runtimes, sync, launchers and the ledger read the plan; none of them goes back to the cube to
derive it again. Where a parameter lives on the target is the layout's business: `LocalLayout`
(the paths as they are, for `cube run`) or `HostLayout` (a job folder under a host's cube root).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from controller.cube import Cube, Param
from controller.errors import CubeError
from controller.taskargs import apply_param_overrides, overrides_for, split_tasks


@dataclass(frozen=True)
class TaskPlan:
    name: str
    overrides: dict[str, str]       # this task's share of the run's overrides
    params: tuple[Param, ...]       # overrides applied; inputs first, then outputs

    @property
    def inputs(self) -> list[Param]:
        return [p for p in self.params if p.io == "input"]

    @property
    def outputs(self) -> list[Param]:
        return [p for p in self.params if p.io == "output"]


@dataclass(frozen=True)
class JobPlan:
    cube: Cube
    tasks: tuple[TaskPlan, ...]
    runtime: str
    runtime_reason: str
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskPlan:
        return next(t for t in self.tasks if t.name == name)

    @property
    def warnings(self) -> list[str]:
        return list(self.cube.warnings)

    @property
    def produced(self) -> set[str]:
        """Workspace-relative paths some task of the job writes."""
        return {str(p.rel) for t in self.tasks for p in t.outputs if p.rel is not None}

    def is_produced(self, param: Param) -> bool:
        return param.io == "output" or param.rel in self.produced

    @property
    def outputs_to_pull(self) -> list[str]:
        return sorted(self.produced)

    def inputs_to_push(self) -> list[str]:
        """Workspace-relative inputs that must travel: those no task of the job writes. Each
        must exist and lie inside the workspace (remote runs sync only the workspace)."""
        needed = set()
        for task in self.tasks:
            for p in task.inputs:
                if self.is_produced(p):
                    continue
                require_inside_workspace(task.name, p)
                if not p.path.exists():
                    raise CubeError(
                        f"Input '{p.name}' of task '{task.name}' does not exist: {p.path}.",
                        "Create it, point the parameter elsewhere with name=PATH, or add the "
                        "task that produces it to --task.")
                needed.add(str(p.rel))
        return sorted(needed)


def plan_job(cube: Cube, tasks: str | list[str], overrides: dict[str, str] | None = None
             ) -> JobPlan:
    """Resolve a run: tasks checked against the cube, overrides split per task and applied.
    The runtime is the one load_cube chose (--runtime > metadata `runtime:` > a python entry
    > mlcube.yaml `docker:`)."""
    names = split_tasks(tasks, cube) if isinstance(tasks, str) else list(tasks)
    overrides = dict(overrides or {})
    per_task = overrides_for(cube, names, overrides)
    planned = tuple(TaskPlan(n, per_task[n], tuple(apply_param_overrides(cube, n, per_task[n])))
                    for n in names)
    return JobPlan(cube, planned, cube.env.runtime, cube.env.runtime_reason, overrides)


def require_inside_workspace(task: str, p: Param) -> None:
    if p.rel is None:
        raise CubeError(
            f"Parameter '{p.name}' of task '{task}' points outside the workspace ({p.path}); "
            "remote runs sync only the workspace.",
            "Move the file into the workspace, or use --workspace to choose one that holds it.")


# ---- where things live on the target -------------------------------------------------------

class JobLayout(Protocol):
    """Paths on the target, as strings in the target's own syntax."""

    @property
    def cube_dir(self) -> str: ...          # the cube's code; tasks run here

    @property
    def envs_dir(self) -> str: ...          # provisioned python environments

    def path_for(self, param: Param) -> str: ...


@dataclass(frozen=True)
class LocalLayout:
    """`cube run`: the cube where it is, parameters at their own paths, envs under CUBE_HOME."""

    cube_root: Path
    envs: Path

    @property
    def cube_dir(self) -> str:
        return str(self.cube_root)

    @property
    def envs_dir(self) -> str:
        return str(self.envs)

    def path_for(self, param: Param) -> str:
        return str(param.path)


@dataclass(frozen=True)
class HostLayout:
    """A job on a host (ROOT = its cube root):

        ROOT/cubes/<cube>/              cube code (mirror of the local cube, minus its workspace)
        ROOT/cubes/<cube>/workspace/    the task inputs pushed from the local workspace
        ROOT/jobs/<job>/workspace/      this job's outputs, and inputs a task of it writes
        ROOT/envs/<env hash>/           python environments
    """

    root: str
    cube_name: str
    job_id: str
    produced: frozenset[str] = frozenset()

    @classmethod
    def for_plan(cls, root: str, plan: JobPlan, job_id: str) -> HostLayout:
        return cls(root, plan.cube.name, job_id, frozenset(plan.produced))

    @property
    def cube_dir(self) -> str:
        return posixpath.join(self.root, "cubes", self.cube_name)

    @property
    def inputs_dir(self) -> str:
        return posixpath.join(self.cube_dir, "workspace")

    @property
    def job_dir(self) -> str:
        return posixpath.join(self.root, "jobs", self.job_id)

    @property
    def outputs_dir(self) -> str:
        return posixpath.join(self.job_dir, "workspace")

    @property
    def envs_dir(self) -> str:
        return posixpath.join(self.root, "envs")

    def path_for(self, param: Param) -> str:
        require_inside_workspace("?", param)
        written = param.io == "output" or param.rel in self.produced
        return posixpath.join(self.outputs_dir if written else self.inputs_dir, str(param.rel))


def output_dirs(plan: JobPlan, layout: JobLayout) -> list[str]:
    """Folders the job's outputs need before a task starts (a file output needs its parent)."""
    dirs = set()
    for task in plan.tasks:
        for p in task.outputs:
            target = layout.path_for(p)
            dirs.add(target if p.type == "directory" else posixpath.dirname(target))
    return sorted(dirs)
