"""Runtimes: how a task runs on this machine. Each maps a name to a callable

    run_task(cube, task_name, overrides: dict[str, str], *, log, grace: float) -> exit code

that provisions what it needs (idempotently: it is called once per task) and runs the task.
Entries are "module:function" strings imported on first use, so a runtime's heavy imports
(the docker SDK) stay out of every other command's start-up time.
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable

from controller.errors import CubeError

RUNTIMES: dict[str, str] = {
    "python": "controller.runtimes.python:run_task",
    "docker": "controller.runtimes.docker:run_task_in_docker",
}


def get_runtime(name: str) -> Callable[..., int]:
    if name not in RUNTIMES:
        raise CubeError(f"Unknown runtime '{name}'.",
                        f"Valid runtimes: {', '.join(RUNTIMES)}.")
    module, _, func = RUNTIMES[name].partition(":")
    return getattr(import_module(module), func)


def run_tasks(cube, task_names: list[str], overrides: dict[str, str], *, runtime: str,
              log: Callable[[str], None], grace: float = 10.0) -> None:
    """Run tasks in order on this machine; the first failure raises TaskFailed with its code.
    Inputs are checked just before each task, since an earlier task may write them."""
    from controller.errors import TaskFailed
    from controller.taskargs import check_inputs, overrides_for, prepare_outputs

    per_task = overrides_for(cube, task_names, overrides)
    run_task = get_runtime(runtime)
    for name in task_names:
        check_inputs(cube, name, per_task[name])
        prepare_outputs(cube, name, per_task[name])
        code = run_task(cube, name, per_task[name], log=log, grace=grace)
        if code != 0:
            raise TaskFailed(name, code, _failure_hint(task_names, name, code))
        log(f"task {name} finished")


def _failure_hint(task_names: list[str], failed: str, code: int) -> str:
    rest = task_names[task_names.index(failed) + 1:]
    skipped = f" Not run: {', '.join(rest)}." if rest else ""
    stopped = _signal_note(code) if code > 128 else ""
    return f"See the task's output above and its log file.{stopped}{skipped}"


def _signal_note(code: int) -> str:
    import signal

    try:
        return f" It was stopped by {signal.Signals(code - 128).name}."
    except ValueError:
        return ""
