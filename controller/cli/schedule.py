"""`cube schedule add | list | remove | run`: nightly runs through the user's crontab."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from controller import schedule
from controller.cli import app

schedule_app = typer.Typer(help="Run cube commands on a schedule (one crontab line each).",
                           no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("add")
def add_cmd(name: str = typer.Argument(..., help="A name for the schedule (and the run)."),
            cron: str = typer.Option(..., "--cron", help="When, in cron's syntax: "
                                     "'0 2 * * *' is every night at 02:00."),
            args: Optional[List[str]] = typer.Argument(
                None, help="The cube command after --, e.g. -- remote run cubes/mnist "
                "--host @lab --task train.")) -> None:
    """Install one crontab line that runs ARGS as cube would, with a log file per night."""
    entry = schedule.add(name, cron, list(args or []))
    typer.echo(f"cube: scheduled '{entry.name}' ({entry.cron}); logs in {entry.log_dir}/",
               err=True)
    typer.echo(entry.line)


@schedule_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
    """The schedules cube installed in your crontab."""
    entries = schedule.schedules()
    if as_json:
        typer.echo(json.dumps([{"name": e.name, "cron": e.cron, "command": e.command,
                                "logs": str(e.log_dir)} for e in entries], indent=2))
        return
    if not entries:
        typer.echo("No schedules. Add one with `cube schedule add NAME --cron '0 2 * * *' -- "
                   "remote run CUBE --host H --task T`.")
    for e in entries:
        typer.echo(f"{e.name:20} {e.cron:15} {e.command}")


@schedule_app.command("remove")
def remove_cmd(name: str) -> None:
    """Take the schedule's line out of your crontab (other lines stay as they are)."""
    schedule.remove(name)
    typer.echo(f"cube: removed schedule '{name}'", err=True)


@schedule_app.command("run")
def run_cmd(name: str) -> None:
    """Run a schedule now, exactly as cron would (bare environment, output to its log)."""
    code = schedule.run_now(name)
    typer.echo(f"cube: schedule '{name}' exited with {code}; log in "
               f"{schedule.find(name).log_dir}/", err=True)
    raise typer.Exit(code)
