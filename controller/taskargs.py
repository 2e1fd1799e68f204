"""Task arguments: the ONE place that turns a task and its parameters into a command line.

Overrides are applied once, by controller.plan.plan_job (with `overrides_for` and
`apply_param_overrides` below); what follows reads the resolved parameters. Local, remote and
container runs all call `task_argv`; they differ only in `path_for`, which maps a parameter to
the path the task sees (a job folder on a host, a mount point in a container). The command is
`ENTRY TASK --name=path ...`, inputs first, then outputs, as MLCube passes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from controller.cube import Cube, Param, Task, make_param, split_override
from controller.errors import CubeError


def parse_param_overrides(items: Iterable[str]) -> dict[str, str]:
    """`["data_dir=/data", ...]` -> {"data_dir": "/data"}; a malformed item is a CubeError."""
    return dict(split_override(item, "param") for item in items)


def split_tasks(spec: str, cube: Cube | None = None) -> list[str]:
    """`"download,train"` -> ["download", "train"], each checked against the cube's tasks."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        valid = f" Valid tasks: {', '.join(cube.tasks)}." if cube else ""
        raise CubeError(f"No task given in '{spec}'.", f"Pass --task NAME[,NAME...].{valid}")
    for name in names:
        if cube is not None:
            cube.task(name)
    return names


def overrides_for(cube: Cube, task_names: list[str], overrides: dict[str, str]) -> dict[str, dict]:
    """Split one run's overrides per task: a name must belong to at least one of the run's
    tasks (MLCube silently ignores unknown names; cube refuses them) and goes to those that
    have it."""
    tasks = [cube.task(n) for n in task_names]
    known = sorted({name for t in tasks for name in t.param_names()})
    for name in overrides:
        if name not in known:
            raise _unknown_param(cube, name, ", ".join(task_names), known)
    return {t.name: {k: v for k, v in overrides.items() if k in t.param_names()} for t in tasks}


def apply_param_overrides(cube: Cube, task: str | Task, overrides: dict[str, str]) -> list[Param]:
    """The task's parameters with `name=value` overrides applied; values resolve against the
    workspace. An unknown name is a CubeError listing the valid ones."""
    task = cube.task(task) if isinstance(task, str) else task
    for name in overrides:
        if name not in task.param_names():
            raise _unknown_param(cube, name, task.name, task.param_names())
    return [_override(cube, p, overrides[p.name]) if p.name in overrides else p
            for p in task.params]


def _override(cube: Cube, param: Param, value: str) -> Param:
    if not value:
        raise CubeError(f"Parameter override '{param.name}=' has an empty path.",
                        f"Write it as {param.name}=PATH.")
    ptype = param.type if param.explicit_type else None
    return make_param(param.name, param.io, value, cube.workspace, ptype, param.opts)


def _unknown_param(cube: Cube, name: str, task: str, valid: list[str]) -> CubeError:
    return CubeError(f"Task '{task}' of cube '{cube.name}' has no parameter '{name}'.",
                     f"Valid parameters: {', '.join(valid) or '(none)'}.")


def task_argv(cube: Cube, task_name: str, params: Sequence[Param] | None = None,
              path_for: Callable[[Param], str] = lambda p: str(p.path),
              with_entry: bool = True) -> list[str]:
    """entry + [task] + --name=path for inputs, then outputs. `params` are the task's
    parameters as resolved by the job plan (default: as declared). A task with its own MLCube
    `entrypoint` runs that instead of the entry, and (as in MLCube) gets no task name.
    `with_entry=False` leaves the entry out: the arguments after an image's ENTRYPOINT."""
    task = cube.task(task_name)
    params = task.params if params is None else params
    if task.entry:
        head = list(task.entry) if with_entry else []
    else:
        head = [*cube.env.entry, task.name] if with_entry else [task.name]
    ordered = [p for p in params if p.io == "input"] + [p for p in params if p.io == "output"]
    return head + [f"--{p.name}={path_for(p)}" for p in ordered]


def prepare_outputs(params: Sequence[Param], root: Path | None = None) -> list[Path]:
    """Create output folders and the parent folders of file outputs; returns the folders.
    With `root`, workspace-relative outputs are made under root instead (a job's own copy);
    outputs outside the workspace are left to whoever maps them."""
    made = []
    for p in params:
        if p.io != "output":
            continue
        if root is not None and p.rel is None:
            continue
        path = Path(root) / str(p.rel) if root is not None else p.path
        folder = path if p.type == "directory" else path.parent
        folder.mkdir(parents=True, exist_ok=True)
        made.append(folder)
    return made


def check_inputs(cube: Cube, task_name: str, params: Sequence[Param]) -> None:
    """Refuse to start when an input is missing or of the wrong kind, naming the parameter,
    the path and, when another task writes that path, the task to run first."""
    for p in params:
        if p.io != "input":
            continue
        if not p.path.exists():
            raise CubeError(f"Input '{p.name}' of task '{task_name}' does not exist: {p.path}",
                            missing_input_hint(cube, task_name, p))
        if p.type == "directory" and not p.path.is_dir():
            raise CubeError(f"Input '{p.name}' of task '{task_name}' must be a directory, "
                            f"but {p.path} is a file.", f"Pass a folder: {p.name}=PATH/.")
        if p.type == "file" and p.path.is_dir():
            raise CubeError(f"Input '{p.name}' of task '{task_name}' must be a file, "
                            f"but {p.path} is a directory.", f"Pass a file: {p.name}=PATH.")


def missing_input_hint(cube: Cube, task_name: str, param: Param) -> str:
    producers = [t.name for t in cube.tasks.values() if t.name != task_name
                 and any(o.path == param.path for o in t.outputs)]
    if producers:
        return (f"Task '{producers[0]}' writes it: run it first "
                f"(--task {producers[0]},{task_name}).")
    return f"Create it, or point the parameter elsewhere with {param.name}=PATH."
