"""`cube remote ...`: run cubes on hosts over SSH and manage the jobs they become."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from controller import remote
from controller.cli import app
from controller.jobs import Ledger
from controller.sinks import Sinks
from controller.taskargs import parse_param_overrides

remote_app = typer.Typer(help="Run cubes on SSH hosts; watch, attach, cancel, fetch jobs.",
                         no_args_is_help=True)
app.add_typer(remote_app, name="remote")


def _sinks() -> Sinks:
    """The CLI's sinks: cube's messages to stderr, the job's log bytes to stdout, and the job
    id remembered for the hint shown on Ctrl-C."""
    def output(chunk: bytes) -> None:
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()

    return Sinks(log=lambda m: typer.echo(f"cube: {m}", err=True), output=output,
                 job_started=lambda job_id: _CTRL_C.update(job=job_id))


_CTRL_C: dict[str, str] = {}


@remote_app.command("run")
def run_cmd(
    cube: Path = typer.Argument(..., help="Cube directory (holds mlcube.yaml)."),
    host: str = typer.Option(..., "--host", "-H", help="Inventory name or ~/.ssh/config host."),
    task: str = typer.Option(..., "--task", "-t", help="Task or comma-separated tasks, in order."),
    params: Optional[List[str]] = typer.Argument(None, help="Parameter overrides NAME=PATH."),
    config: Optional[List[str]] = typer.Option(None, "-P", help="Config override, e.g. docker.image=x."),
    workspace: Optional[Path] = typer.Option(None, "--workspace", help="Use this workspace."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="python, docker or podman."),
    name: Optional[str] = typer.Option(None, "--name", help="Idempotent job name (for cron): "
                                       "attach if a job of this name is running on the host."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Start and return the job id."),
    inventory: Optional[Path] = typer.Option(None, "--inventory", help="Inventory YAML file."),
    accept_new: bool = typer.Option(False, "--accept-new-host-key",
                                    help="Trust and store an unknown host key (never a changed one)."),
) -> None:
    """Sync the cube to HOST, provision its runtime, run the task(s), stream logs, pull outputs."""
    req = remote.RunRequest(
        cube_path=cube, host=host, tasks=task, overrides=parse_param_overrides(params or []),
        config_overrides=list(config or []), workspace=workspace, runtime=runtime, name=name,
        detach=detach, inventory=inventory, accept_new_host_key=accept_new)

    def start() -> int:
        result = remote.run(req, _sinks())
        if req.detach:
            typer.echo(result.job_id)
        return result.exit_code

    raise typer.Exit(_detachable(start))


def _detachable(follow: Callable[[], int]) -> int:
    """Ctrl-C while following detaches: the task keeps running on its host."""
    try:
        return follow()
    except KeyboardInterrupt:
        job = _CTRL_C.get("job")
        hint = f" Reattach with `cube remote attach {job}`." if job else ""
        typer.echo(f"\ncube: detached; the job keeps running.{hint}", err=True)
        return 130


@remote_app.command("attach")
def attach_cmd(job: str = typer.Argument(..., help="Job id, id prefix or name.")) -> None:
    """Follow a job to its end and pull its outputs (after a detach or a killed controller)."""
    raise typer.Exit(_detachable(lambda: remote.attach(job, _sinks()).exit_code))


@remote_app.command("logs")
def logs_cmd(job: str, follow: bool = typer.Option(False, "--follow", "-f")) -> None:
    """Print a job's log (-f: keep following until it ends)."""
    def show() -> int:
        remote.logs(job, follow, _sinks())
        return 0

    _detachable(show)


@remote_app.command("status")
def status_cmd(job: Optional[str] = typer.Argument(None),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Live state of a job from its host (no JOB: the ledger's recent jobs)."""
    if job is None:
        return list_cmd(host=None, as_json=as_json)
    state = remote.status(job)
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    for key in ("job", "host", "state", "exit_code", "task", "started_at", "ended_at"):
        if state.get(key) is not None:
            typer.echo(f"{key:10} {state[key]}")


@remote_app.command("list")
def list_cmd(host: Optional[str] = typer.Option(None, "--host", "-H"),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Jobs in the local ledger, newest first."""
    with Ledger() as ledger:
        jobs = ledger.list(host=host)
    if as_json:
        typer.echo(json.dumps([j.__dict__ for j in jobs], indent=2))
        return
    if not jobs:
        typer.echo("No jobs yet. Start one with `cube remote run CUBE --host H --task T`.")
    for j in jobs:
        code = "" if j.exit_code is None else f" exit={j.exit_code}"
        typer.echo(f"{j.id:36} {j.host:10} {','.join(j.tasks):18} {j.state}{code}")


@remote_app.command("cancel")
def cancel_cmd(job: str, grace: float = typer.Option(10.0, "--grace",
                                                    help="Seconds between SIGTERM and SIGKILL.")) -> None:
    """Stop a job: SIGTERM to its process group (its container), SIGKILL after the grace."""
    state = remote.cancel(job, grace, _sinks().log)
    typer.echo(f"{job}: {state.get('state')}")


@remote_app.command("fetch")
def fetch_cmd(job: str) -> None:
    """Pull a job's outputs into the local workspace (again)."""
    remote.fetch(job, _sinks().log)


@remote_app.command("shell")
def shell_cmd(job: str) -> None:
    """An interactive shell on the job's host, in its directory, with its environment active."""
    argv = remote.shell_argv(job)
    os.execvp(argv[0], argv)
