"""`cube remote ...`: run cubes on hosts over SSH and manage the jobs they become."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from controller import multinode, remote
from controller import prune as prune_mod
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
    host: str = typer.Option(..., "--host", "-H", help="Inventory name or ~/.ssh/config host; "
                             "a comma list or @group picks the host where the job starts soonest."),
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
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs the job uses (default: "
                                       "mlcube.yaml's platform.accelerator_count)."),
    slots: Optional[int] = typer.Option(None, "--slots", help="Slots the job holds on its host "
                                        "(default: its GPUs, at least 1)."),
    no_queue: bool = typer.Option(False, "--no-queue",
                                  help="Fail (exit 2) instead of queueing when the host is busy."),
    label: Optional[List[str]] = typer.Option(None, "--label", "-l",
                                              help="Place only on hosts with this label (repeatable)."),
    partition: Optional[str] = typer.Option(None, "--partition",
                                            help="Slurm hosts: the partition for this run."),
    time_limit: Optional[str] = typer.Option(None, "--time", help="Slurm hosts: the time limit "
                                             "for this run (minutes, or HH:MM:SS)."),
    nodes: int = typer.Option(1, "--nodes", help="Run one job across N hosts of the selection "
                              "(gang start; rank env and TF_CONFIG; followed, no --detach)."),
) -> None:
    """Sync the cube to HOST, provision its runtime, run the task(s), stream logs, pull outputs."""
    req = remote.RunRequest(
        cube_path=cube, host=host, tasks=task, overrides=parse_param_overrides(params or []),
        config_overrides=list(config or []), workspace=workspace, runtime=runtime, name=name,
        detach=detach, inventory=inventory, accept_new_host_key=accept_new, gpus=gpus,
        slots=slots, no_queue=no_queue, labels=list(label or []), partition=partition,
        time=time_limit)

    if nodes != 1:  # controller/multinode.py: one job across several hosts, never detached
        raise typer.Exit(_multinode(req, nodes))

    def start() -> int:
        result = remote.run(req, _sinks())
        if req.detach:
            typer.echo(result.job_id)
        return result.exit_code

    raise typer.Exit(_detachable(start))


def _multinode(req: remote.RunRequest, nodes: int) -> int:
    """Ctrl-C stops a multi-node run: its ranks are cancelled (nothing else would watch them)."""
    try:
        return multinode.run(req, nodes, _sinks()).exit_code
    except KeyboardInterrupt:
        typer.echo("\ncube: interrupted; the ranks that had started were cancelled.", err=True)
        return 130


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
    for key in ("job", "host", "state", "reason", "exit_code", "task", "started_at", "ended_at",
                "error", "slurm_job_id", "slurm_state", "requeues"):
        if state.get(key) is not None:
            typer.echo(f"{key:10} {state[key]}")
    for rank in state.get("ranks", []):  # a multi-node job: each rank's own state
        code = "" if rank["exit_code"] is None else f" exit={rank['exit_code']}"
        error = f"  ({rank['error']})" if rank.get("error") else ""
        typer.echo(f"rank {rank['rank']:<5} {rank['host']:10} {rank['state']}{code}{error}")


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


@remote_app.command("prune")
def prune_cmd(
    host: Optional[str] = typer.Option(None, "--host", "-H", help="Host, comma list or @group "
                                       "(default: every inventory host)."),
    label: Optional[List[str]] = typer.Option(None, "--label", "-l",
                                              help="Only hosts with this label (repeatable)."),
    older_than: str = typer.Option(prune_mod.DEFAULT_OLDER_THAN, "--older-than",
                                   help="Keep what was used or finished more recently (90s, 12h, 14d)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; remove nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    inventory: Optional[Path] = typer.Option(None, "--inventory", help="Inventory YAML file."),
) -> None:
    """Remove finished jobs, unused environments, images and cube copies from hosts."""
    results = prune_mod.prune(host, list(label or []), inventory,
                              prune_mod.parse_age(older_than), dry_run)
    if as_json:
        typer.echo(json.dumps({"dry_run": dry_run, "hosts": [r.to_dict() for r in results]},
                              indent=1))
        return
    verb = "would free" if dry_run else "freed"
    for r in results:
        if not r.reachable:
            typer.echo(f"{r.host}: unreachable: {r.error}", err=True)
            continue
        for item in r.removed:
            failed = f"  (failed: {item['error']})" if item.get("error") else ""
            typer.echo(f"{r.host}: {item['kind']:5} {_mib(item['bytes']):>10}  "
                       f"{prune_mod.item_name(item)}{failed}")
        typer.echo(f"{r.host}: {verb} {_mib(r.bytes)} ({len(r.removed)} item(s))")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
