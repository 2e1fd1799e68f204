"""`cube run`: run a cube's tasks on this machine (python venv runtime by default).

Kept light on imports: a warm `cube run` should cost little more than the task itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
import typer

from controller.cli import app


def _log(message: str) -> None:
    # cube's own messages go to stderr so the task's stdout stays clean for pipes.
    print(f"cube: {message}", file=sys.stderr, flush=True)


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="cube run", description=RUN_HELP)
    p.add_argument("cube", type=Path, help="Cube folder (holds mlcube.yaml).")
    p.add_argument("overrides", nargs="*", metavar="name=PATH", help="Parameter overrides.")
    p.add_argument("--task", "-t", help="Task or comma-separated tasks, run in order.")
    p.add_argument("--runtime", help="python or docker (default: what the cube declares).")
    p.add_argument("--workspace", type=Path, help="Workspace folder (default CUBE/workspace).")
    p.add_argument("-P", dest="config", action="append", default=[], metavar="KEY=VALUE",
                   help="Config override, e.g. -P docker.image=x:1 (repeatable).")
    p.add_argument("--grace", type=float, default=10.0,
                   help="Seconds between SIGTERM and SIGKILL when stopping a task (default 10).")
    p.add_argument("--plan", action="store_true", help="Show what would be provisioned and run.")
    return p


RUN_HELP = "Run TASK(s) of CUBE here; exits with the first failing task's code."


# This typer version coerces every typed option through pydantic (~0.3 s of imports), so `run`
# takes its arguments raw and parses them with argparse: a warm run must stay well under 1 s.
@app.command("run", help=RUN_HELP, add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False})
def run(ctx: typer.Context) -> None:
    main_run(ctx.args)


def main_run(argv: list[str]) -> None:
    """`cube run` from raw arguments; the CLI entry can call it directly, skipping typer."""
    args = _parser().parse_intermixed_args(argv)
    run_cube(args.cube, args.task, args.overrides, runtime=args.runtime,
             workspace=args.workspace, config=args.config, grace=args.grace, plan=args.plan)


def run_cube(path: Path, task: str | None, overrides: list[str], *, runtime: str | None = None,
             workspace: Path | None = None, config: list[str] | None = None,
             grace: float = 10.0, plan: bool = False) -> None:
    """Load, check and run; raises TaskFailed (exit = the task's code) on the first failure."""
    from controller.cube import load_cube
    from controller.runtimes import run_tasks
    from controller.taskargs import parse_param_overrides, split_tasks

    loaded = load_cube(path, workspace=workspace, config_overrides=config or [],
                       requested_runtime=runtime)
    for warning in loaded.warnings:
        _log(f"warning: {warning}")
    names = split_tasks(task or _only_task(loaded), loaded)
    params = parse_param_overrides(overrides)
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
    argv_for = _planner(cube)
    for name in names:
        typer.echo(f"{name}: {shlex.join(argv_for(name, per_task[name]))}")


def _planner(cube):
    """(task, overrides) -> the argv a run would start, after reporting what it would provision."""
    if cube.env.runtime == "docker":
        from controller.runtimes.docker import plan_task

        return lambda name, over: plan_task(cube, name, over, _log)
    from controller.runtimes.python import ensure_local_env, python_task_argv

    env_dir = ensure_local_env(cube, _log, plan=True)
    return lambda name, over: python_task_argv(cube, name, over, env_dir)
