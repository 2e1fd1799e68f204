"""`cube remote sweep` (start a sweep) and `cube sweep list|status|results|retry` (see
controller/sweeps.py). Rendering only: rich tables for people, --json / --csv for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from controller import sweepresults, sweeps
from controller.cli import app
from controller.cli.remote import remote_app
from controller.jobs import Job
from controller.sinks import Sinks
from controller.taskargs import parse_param_overrides

sweep_app = typer.Typer(help="Sweeps started with `cube remote sweep`: list, status, results, "
                        "retry.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")


def _sinks() -> Sinks:
    return Sinks(log=lambda m: typer.echo(f"cube: {m}", err=True))


@remote_app.command("sweep")
def sweep_cmd(
    cube: Path = typer.Argument(..., help="Cube directory (holds mlcube.yaml)."),
    host: str = typer.Option(..., "--host", "-H", help="Host, comma list or @group: each "
                             "variant is placed where it starts soonest."),
    task: str = typer.Option(..., "--task", "-t", help="Task or comma-separated tasks, in order."),
    params: Optional[List[str]] = typer.Argument(None, help="Parameter overrides NAME=PATH "
                                                 "(e.g. the base file of a varied parameter)."),
    vary: Optional[List[str]] = typer.Option(None, "--vary", help="PARAM:KEY.PATH=V1,V2,... "
                                             "(repeatable: the grid of all combinations)."),
    sweep_file: Optional[Path] = typer.Option(None, "--sweep", help="YAML file listing the "
                                              "variants: variants: [{PARAM: {KEY.PATH: V}}, ...]."),
    max_parallel: Optional[int] = typer.Option(None, "--max-parallel", help="Run at most N "
                                               "variants at once (N chains; no daemon needed)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Wait for every variant, pull "
                                "its outputs as it ends, then print the results."),
    config: Optional[List[str]] = typer.Option(None, "-P", help="Config override, e.g. docker.image=x."),
    workspace: Optional[Path] = typer.Option(None, "--workspace", help="Use this workspace."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="python, docker or podman."),
    inventory: Optional[Path] = typer.Option(None, "--inventory", help="Inventory YAML file."),
    accept_new: bool = typer.Option(False, "--accept-new-host-key",
                                    help="Trust and store an unknown host key (never a changed one)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs each variant uses."),
    slots: Optional[int] = typer.Option(None, "--slots", help="Slots each variant holds."),
    label: Optional[List[str]] = typer.Option(None, "--label", "-l",
                                              help="Place only on hosts with this label (repeatable)."),
) -> None:
    """Run the task(s) once per variant of the cube's YAML inputs; print the sweep id."""
    req = sweeps.SweepRequest(
        cube_path=cube, host=host, tasks=task, vary=list(vary or []), sweep_file=sweep_file,
        overrides=parse_param_overrides(params or []), config_overrides=list(config or []),
        workspace=workspace, runtime=runtime, inventory=inventory, accept_new_host_key=accept_new,
        gpus=gpus, slots=slots, labels=list(label or []), max_parallel=max_parallel)
    spec = sweeps.start(req, _sinks())
    typer.echo(spec["id"])
    if follow:
        raise typer.Exit(_follow(spec["id"]))


def _follow(sweep_id: str) -> int:
    try:
        code = sweeps.follow(sweep_id, _sinks())
    except KeyboardInterrupt:
        typer.echo(f"\ncube: stopped waiting; the variants keep running. `cube sweep status "
                   f"{sweep_id}` shows them.", err=True)
        return 130
    spec, latest = sweeps.look(sweep_id, _sinks().log, pull=False)
    _print_results(spec, sweepresults.rows(spec, latest), err=True)
    return code


@sweep_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Recent sweeps from the ledger, newest first (no host is asked)."""
    found = sweeps.listing()
    if as_json:
        typer.echo(json.dumps([{**_summary(spec, latest), "keys": spec["keys"]}
                               for spec, latest in found], indent=1))
        return
    if not found:
        typer.echo("No sweeps yet. Start one with `cube remote sweep CUBE --host @lab --task T "
                   "--vary PARAM:KEY=V1,V2`.")
        return
    table = _table("sweep", "cube", "created", "host", "variants", "states")
    for spec, latest in found:
        s = _summary(spec, latest)
        table.add_row(s["id"], s["cube"], s["created"], s["host"], str(s["variants"]),
                      ", ".join(f"{n} {state}" for state, n in s["states"].items()))
    _console().print(table)


def _summary(spec: dict, latest: dict[str, Job]) -> dict[str, Any]:
    states = Counter(latest[v["name"]].state if v["name"] in latest else "not started"
                     for v in spec["variants"])
    return {"id": spec["id"], "cube": spec["cube"], "host": spec["host"],
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(spec["created_at"])),
            "variants": len(spec["variants"]), "states": dict(states)}


@sweep_app.command("status")
def status_cmd(sweep: str = typer.Argument(..., help="Sweep id or id prefix."),
               as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Each variant's job and state, asked of the hosts."""
    spec, latest = sweeps.look(sweep, _sinks().log, pull=False)
    table = sweepresults.rows(spec, latest)
    if as_json:
        typer.echo(json.dumps({**_summary(spec, latest), "variants_detail": [
            {k: r[k] for k in ("variant", "job", "host", "state", "exit_code", "values", "error",
                                   "slurm_job")}
            for r in table]}, indent=1, default=str))
        return
    out = _table("variant", "job", "host", "state", *spec["keys"])
    for r in table:
        state = r["state"] + (f" (exit {r['exit_code']})" if r["exit_code"] else "")
        out.add_row(r["variant"], r["job"] or "-", r["host"] or "-", state,
                    *[_cell(r["values"].get(k)) for k in spec["keys"]])
    _console().print(out)
    for r in table:
        if r["error"]:
            typer.echo(f"{r['variant']}: did not start: {r['error']}", err=True)


@sweep_app.command("results")
def results_cmd(
    sweep: str = typer.Argument(..., help="Sweep id or id prefix."),
    sort: Optional[str] = typer.Option(None, "--sort", help="Sort by this metric or varied key, "
                                       "highest first."),
    ascending: bool = typer.Option(False, "--ascending", help="With --sort: lowest first."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """The varied values beside each variant's metrics (pulls finished variants' outputs first)."""
    spec, latest = sweeps.look(sweep, _sinks().log, pull=True)
    table = sweepresults.rows(spec, latest)
    if sort:
        table = sweepresults.sort_rows(table, sort, ascending)
    if as_json:
        typer.echo(json.dumps({"sweep": spec["id"], "keys": spec["keys"], "rows": table},
                              indent=1, default=str))
    elif as_csv:
        typer.echo(sweepresults.to_csv(table, spec["keys"]), nl=False)
    else:
        _print_results(spec, table)


@sweep_app.command("retry")
def retry_cmd(sweep: str = typer.Argument(..., help="Sweep id or id prefix."),
              follow: bool = typer.Option(False, "--follow", "-f",
                                          help="Wait for the retried variants too.")) -> None:
    """Run again the variants that failed, were lost or never started: same values, same
    folders."""
    names = sweeps.retry(sweep, _sinks())
    typer.echo(" ".join(names) if names else "nothing to retry")
    if follow and names:
        raise typer.Exit(_follow(sweep))


def _print_results(spec: dict, table: list[dict], err: bool = False) -> None:
    header, cells = sweepresults.flat(table, spec["keys"])
    skip = header.index("exit_code")  # the state column says it for people
    out = _table(*[h for i, h in enumerate(header) if i != skip])
    for row in cells:
        out.add_row(*[_cell(c) for i, c in enumerate(row) if i != skip])
    _console(err).print(out)


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _console(err: bool = False) -> Console:
    stream = sys.stderr if err else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 240)
