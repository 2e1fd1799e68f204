"""`cube run`: run a cube's tasks on this machine (python venv runtime by default).

Kept light on imports: a warm `cube run` should cost little more than the task itself.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import typer

from controller.cli import app


def _log(message: str) -> None:
    # cube's own messages go to stderr so the task's stdout stays clean for pipes.
    print(f"cube: {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cube run", description=RUN_HELP)
    p.add_argument("cube", type=Path, help="Cube folder (holds mlcube.yaml).")
    p.add_argument("overrides", nargs="*", metavar="name=PATH", help="Parameter overrides.")
    p.add_argument("--task", "-t", help="Task or comma-separated tasks, run in order.")
    p.add_argument("--runtime", help="python, docker or podman (default: what the cube declares).")
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
    # The runtime's modules load only here, so `cube --help` and the other commands skip them.
    from controller import local  # noqa: PLC0415
    from controller.taskargs import parse_param_overrides  # noqa: PLC0415

    args = _parser().parse_intermixed_args(argv)
    req = local.LocalRequest(args.cube, args.task, parse_param_overrides(args.overrides),
                             runtime=args.runtime, workspace=args.workspace,
                             config_overrides=args.config, grace=args.grace)
    if not args.plan:
        local.run(req, _log)
        return
    plan = local.load_and_plan(req, _log)
    for task in local.prepare(plan, _log, dry_run=True).tasks:
        typer.echo(f"{task.name}: {shlex.join(task.argv)}")
