"""`cube run`: run a cube's tasks on this machine (python venv runtime by default).

Kept light on imports: a warm `cube run` should cost little more than the task itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from controller.cli import app


def _log(message: str) -> None:
    # cube's own messages go to stderr so the task's stdout stays clean for pipes.
    print(f"cube: {message}", file=sys.stderr, flush=True)


@app.command("run")
def run(
    cube: Path = typer.Argument(..., help="Cube folder (holds mlcube.yaml)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Parameter overrides name=PATH."),
    task: Optional[str] = typer.Option(None, "--task", "-t",
                                       help="Task or comma-separated tasks, run in order."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="python or docker."),
    workspace: Optional[Path] = typer.Option(None, "--workspace",
                                             help="Workspace folder (default CUBE/workspace)."),
    config: Optional[List[str]] = typer.Option(None, "-P",
                                               help="Config override KEY=VALUE, e.g. -P docker.image=x:1."),
    grace: float = typer.Option(10.0, "--grace",
                                help="Seconds between SIGTERM and SIGKILL when stopping a task."),
    plan: bool = typer.Option(False, "--plan", help="Show what would be provisioned and run."),
) -> None:
    """Run TASK(s) of CUBE here; exits with the first failing task's code."""
    from controller.cube import load_cube
    from controller.runtimes import run_tasks
    from controller.taskargs import parse_param_overrides, split_tasks

    loaded = load_cube(cube, workspace=workspace, config_overrides=config or [],
                       requested_runtime=runtime)
    for warning in loaded.warnings:
        _log(f"warning: {warning}")
    names = split_tasks(task or _only_task(loaded), loaded)
    params = parse_param_overrides(overrides or [])
    if plan:
        _show_plan(loaded, names, params)
        return
    run_tasks(loaded, names, params, runtime=loaded.env.runtime, log=_log, grace=grace)


def _only_task(cube) -> str:
    from controller.errors import CubeError

    if len(cube.tasks) == 1:
        return next(iter(cube.tasks))
    raise CubeError(f"Cube '{cube.name}' has several tasks; say which to run.",
                    f"Pass --task NAME[,NAME...]. Valid tasks: {', '.join(cube.tasks)}.")


def _show_plan(cube, names: list[str], params: dict[str, str]) -> None:
    import shlex

    from controller.taskargs import overrides_for

    per_task = overrides_for(cube, names, params)
    _log(f"runtime {cube.env.runtime} ({cube.env.runtime_reason})")
    if cube.env.runtime == "python":
        from controller.runtimes.python import ensure_local_env, python_task_argv

        env_dir = ensure_local_env(cube, _log, plan=True)
        for name in names:
            typer.echo(f"{name}: {shlex.join(python_task_argv(cube, name, per_task[name], env_dir))}")
    else:
        from controller.taskargs import task_argv

        for name in names:
            typer.echo(f"{name}: {shlex.join(task_argv(cube, name, per_task[name]))}")
