"""`cube show | diff | rerun` and their `cube remote` twins: the record of every run.

`show` and `diff` read any job of the ledger (local or remote); `cube rerun` runs a job again
here, `cube remote rerun` on its host (or `--host`)."""

from __future__ import annotations

import json
import shlex
import time
from typing import Optional

import typer

from controller import local, records, remote, rerun
from controller.cli import app
from controller.cli.remote import _detachable, _sinks, remote_app
from controller.errors import CubeError
from controller.jobs import Ledger
from controller.recorddiff import diff_records


def _load(ref: str) -> tuple:
    with Ledger() as ledger:
        return records.load(ledger, ref)


def show_cmd(job: str = typer.Argument(..., help="Job id, id prefix or name."),
             as_json: bool = typer.Option(False, "--json", help="The whole record as JSON.")
             ) -> None:
    """What a run used: cube digest, parameters, argv, environment, host, times, outputs."""
    found, record = _load(job)
    if as_json:
        typer.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    for line in describe(found, record):
        typer.echo(line)


def describe(job, record: dict) -> list[str]:
    host, runtime, times = record["host"], record["runtime"], record["times"]
    frozen = record.get("frozen")
    lines = [f"job        {job.id}  ({record['state']}, exit {record.get('exit_code')})",
             f"cube       {record['cube']['name']} at {record['cube']['path']}",
             f"           digest {record['cube']['digest'][:16]} over {record['cube']['files']} "
             "files",
             f"runtime    {runtime['name']} {runtime.get('env_key') or ''}"
             + (f" ({len(frozen.splitlines())} frozen packages)" if frozen else ""),
             f"host       {host['name']} ({host.get('hostname')}, {host.get('os')}, "
             f"{host.get('cpus')} CPUs" + (f", GPUs {', '.join(host['gpus'])}" if host.get(
                 "gpus") else "") + ")",
             f"started    {_when(times.get('started'))}   ended {_when(times.get('ended'))}"]
    lines += [f"params     {k}={v}" for k, v in record["params"]["overrides"].items()]
    lines += [f"input      {name}  {entry['sha256'][:16]}"
              for name, entry in record["inputs"].items()]
    lines += [f"task       {t['name']} (exit {t['exit_code']}): {shlex.join(t['argv'])}"
              for t in record["tasks"]]
    lines.append(f"outputs    {len(record.get('outputs_files') or {})} files")
    return lines


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def diff_cmd(job_a: str = typer.Argument(..., help="The first job."),
             job_b: str = typer.Argument(..., help="The second job."),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """What differs between two runs; exits 0 when they match, 1 when they differ (as diff)."""
    differences = diff_records(_load(job_a)[1], _load(job_b)[1])
    if as_json:
        typer.echo(json.dumps([d.__dict__ for d in differences], indent=2, default=str))
    else:
        for difference in differences:
            typer.echo(str(difference))
        if not differences:
            typer.echo(f"{job_a} and {job_b} match.")
    raise typer.Exit(1 if differences else 0)


def _confirm_changes(job, record: dict, yes: bool) -> None:
    changes = rerun.changes_since(job, record)
    if not changes:
        return
    typer.echo(f"The cube changed since {job.id} ran:", err=True)
    for change in changes:
        typer.echo(f"  {change}", err=True)
    if not yes and not typer.confirm("Run it anyway?", err=True):
        raise CubeError("Rerun cancelled: the cube changed since the recorded run.",
                        "Pass --yes to run the current cube with the recorded parameters.")


def rerun_cmd(job: str = typer.Argument(..., help="Job id, id prefix or name."),
              yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask when the cube "
                                       "changed since the recorded run.")) -> None:
    """Run a job's tasks again here, with the same parameters."""
    found, record = _load(job)
    _confirm_changes(found, record, yes)
    new_id = local.run(rerun.local_request(found, record), _sinks().log)
    typer.echo(f"cube: rerun of {found.id} is {new_id}", err=True)


def remote_rerun_cmd(
        job: str = typer.Argument(..., help="Job id, id prefix or name."),
        host: Optional[str] = typer.Option(None, "--host", "-H", help="Another host."),
        yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask when the cube changed "
                                 "since the recorded run."),
        detach: bool = typer.Option(False, "--detach", "-d")) -> None:
    """Run a job again on its host (or --host), with the same tasks and parameters."""
    found, record = _load(job)
    _confirm_changes(found, record, yes)
    req = rerun.remote_request(found, record, host, detach)

    def start() -> int:
        result = remote.run(req, _sinks())
        if detach:
            typer.echo(result.job_id)
        return result.exit_code

    raise typer.Exit(_detachable(start))


for _app in (app, remote_app):
    _app.command("show")(show_cmd)
    _app.command("diff")(diff_cmd)
app.command("rerun")(rerun_cmd)
remote_app.command("rerun")(remote_rerun_cmd)
