"""`cube hosts [SELECTOR]`: one row per host (see controller.fleet), a table or JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from controller import fleet
from controller.cli import app
from controller.selectors import select_hosts


@app.command("hosts")
def hosts_cmd(
    selector: Optional[str] = typer.Argument(
        None, help="Host name, comma list (a,b) or @group; default: every inventory host."),
    label: Optional[List[str]] = typer.Option(None, "--label", "-l",
                                              help="Only hosts with this label (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds per host for connect + probe."),
    inventory: Optional[Path] = typer.Option(None, "--inventory", help="Inventory YAML file."),
) -> None:
    """Probe the selected hosts in parallel: resources, GPUs, slots and jobs."""
    specs = select_hosts(selector, list(label or []), inventory)
    start = time.monotonic()
    reports = fleet.probe_hosts(specs, timeout=timeout)
    if as_json:
        typer.echo(json.dumps({"hosts": [r.to_dict() for r in reports], "timeout": timeout,
                               "seconds": round(time.monotonic() - start, 3)}, indent=1))
        return
    _print_table(reports)


def _print_table(reports) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("HOST", "UP", "OS", "CPU load/core", "MEM free", "DISK free", "PYTHON",
                   "ENGINES", "GPUS", "SLOTS free/total", "JOBS"):
        table.add_column(column)
    for r in reports:
        if not r.reachable:
            table.add_row(r.name, "[red]no[/red]", *[""] * 9)
            continue
        table.add_row(
            r.name, "[green]yes[/green]", r.os or "?",
            f"{r.cpu_count or '?'} x {_num(r.load_per_core)}",
            f"{_size(r.mem_free_bytes)} / {_size(r.mem_total_bytes)}", _size(r.disk_free_bytes),
            _pythons(r.pythons), _engines(r.engines), _gpus(r), _slots(r), _jobs(r))
    # Piped output is not cut to 80 columns: a row per host stays whole for grep.
    console = Console(width=None if sys.stdout.isatty() else 240)
    console.print(table)
    for r in reports:
        if not r.reachable:
            console.print(f"[red]{r.name}[/red] ({r.address}): {r.error}", highlight=False)


def _num(value) -> str:
    return "?" if value is None else f"{value:.2f}"


def _size(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


def _pythons(versions: list[str]) -> str:
    """Major.minor only (JSON has the full versions): the table stays narrow."""
    short = []
    for v in versions:
        mm = ".".join(v.split(".")[:2])
        if mm not in short:
            short.append(mm)
    return " ".join(short) or "-"


def _engines(engines: dict) -> str:
    return ", ".join(f"{name} {e['version'] or ''}".strip() + ("" if e["ok"] else " (down)")
                     for name, e in engines.items()) or "-"


def _gpus(r) -> str:
    if r.gpu_error and not r.gpus:
        return f"error: {r.gpu_error}"
    lines = [f"{g['index']} {g['name'] or '?'} {g['memory_used_mib'] or 0}/"
             f"{g['memory_total_mib'] or '?'} MiB {_pct(g['utilization_pct'])}"
             + (" busy" if g["busy_pids"] else "") for g in r.gpus]
    return "\n".join(lines) or "-"


def _pct(value) -> str:
    return "?%" if value is None else f"{value}%"


def _slots(r) -> str:
    text = f"{r.slots_free}/{r.slots_total}"
    return text if r.slots_source == "agent" else text + " (est.)"


def _jobs(r) -> str:
    def owners(jobs) -> str:
        names = sorted({j["owner"] for j in jobs if j["owner"]})
        return f" ({', '.join(names)})" if names else ""

    parts = []
    if r.running:
        parts.append(f"{len(r.running)} running{owners(r.running)}")
    if r.queued:
        parts.append(f"{len(r.queued)} queued{owners(r.queued)}")
    return ", ".join(parts) or "-"
