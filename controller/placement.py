"""Placement: which host of a selection a job can start on soonest, and what it asks there.

`cube remote run --host @lab` (any selector: a comma list, @group, --label) probes the
selection in parallel (controller.fleet) and keeps the hosts that fit: enough slots in total
and the runtime's interpreter or engine present. Among those it prefers enough free slots,
then the shortest queue, then the lowest load per core. A single host name is not placed (and
not probed here): it behaves as before. When every fitting host is busy the job queues on the
best one (the host's agent grants it later), unless --no-queue.

Demand: `--slots N`, else `--gpus N`, else `platform.accelerator_count`, at least 1 (a job
without GPUs still takes a slot, so two jobs share a box only when the inventory says so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.leases import DEFAULT_LEASE_DIR
from controller import fleet
from controller.cube import Cube
from controller.errors import CubeError, HostUnreachable
from controller.hosts import HostSpec
from controller.launchers import SlotRequest
from controller.selectors import select_hosts

Log = Callable[[str], None]
MIN_PYTHON = (3, 8)


@dataclass
class Demand:
    slots: int       # slots the job holds while it runs
    gpus: int        # GPUs it asked for (each GPU is a slot on a GPU host)
    why: str         # where the number came from, for messages


def demand_for(cube: Cube, gpus: int | None = None, slots: int | None = None) -> Demand:
    for name, value in (("--gpus", gpus), ("--slots", slots)):
        if value is not None and value < (0 if name == "--gpus" else 1):
            raise CubeError(f"{name} must be at least {0 if name == '--gpus' else 1}, not {value}.",
                            f"e.g. {name} 1")
    want = int(cube.platform.get("accelerator_count") or 0) if gpus is None else gpus
    if slots is not None:
        return Demand(slots, want, "--slots")
    why = "--gpus" if gpus is not None else "platform.accelerator_count"
    return Demand(max(1, want), want, why if want else "one slot per job")


def gpu_overrides(gpus: int | None) -> list[str]:
    """`--gpus N` is the cube's accelerator count for this run, so runtimes (container GPU
    flags) see it as they see mlcube.yaml's."""
    return [] if gpus is None else [f"platform.accelerator_count={gpus}"]


def is_selection(host: str, labels: list[str] | None = None) -> bool:
    """A comma list, an @group or any --label asks for placement; a single name does not."""
    return bool(labels) or "," in host or host.strip().startswith("@")


# ---- fit and rank -----------------------------------------------------------------------------

def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".") if x.isdigit())


def runtime_missing(report: fleet.HostReport, runtime: str, python: str | None) -> str | None:
    """Why the host cannot run the runtime (None when it can): no matching interpreter, or
    the container engine absent or down."""
    if runtime == "python":
        want = _version(python or "")
        ok = [v for v in report.pythons
              if _version(v)[:2] >= MIN_PYTHON and _version(v)[:len(want)] == want]
        return None if ok else f"no Python {python or '3'} (has {', '.join(report.pythons) or 'none'})"
    engine = report.engines.get(runtime)
    if not engine:
        return f"no {runtime}"
    return None if engine.get("ok") else f"{runtime} is down ({engine.get('error') or '?'})"


def describe(r: fleet.HostReport) -> str:
    load = "?" if r.load_per_core is None else f"{r.load_per_core:.2f}"
    return f"{r.slots_free}/{r.slots_total} slots free, {len(r.queued)} queued, load {load}/core"


def _rank(r: fleet.HostReport, demand: Demand) -> tuple:
    can_start = (r.slots_free or 0) >= demand.slots and not r.queued
    load = r.load_per_core if r.load_per_core is not None else float("inf")
    return (not can_start, len(r.queued), load)


def choose(reports: list[fleet.HostReport], demand: Demand, runtime: str,
           python: str | None, *, selector: str, no_queue: bool = False
           ) -> tuple[fleet.HostReport, str]:
    """The best host for the job and why; CubeError when none fits (exit 2), or none is free
    with no_queue; HostUnreachable when no host answered."""
    up = [r for r in reports if r.reachable]
    if not up:
        raise HostUnreachable(
            f"No host in {selector} answered: "
            + "; ".join(f"{r.name}: {r.error}" for r in reports) + ".",
            "Check the hosts with `cube hosts " + selector + "`.")
    big = [r for r in up if (r.slots_total or 0) >= demand.slots]
    if not big:
        largest = max(up, key=lambda r: r.slots_total or 0)
        raise CubeError(
            f"No host in {selector} can ever hold this job: it needs {demand.slots} slot(s) "
            f"({demand.why}); the largest is {largest.name} with {largest.slots_total}.",
            "Ask for fewer (--slots / --gpus, platform.accelerator_count) or select a bigger host.")
    fit = [r for r in big if runtime_missing(r, runtime, python) is None]
    if not fit:
        raise CubeError(
            f"No host in {selector} can run the {runtime} runtime: "
            + "; ".join(f"{r.name}: {runtime_missing(r, runtime, python)}" for r in big) + ".",
            "Install it there, or choose another runtime with --runtime.")
    best = min(fit, key=lambda r: _rank(r, demand))
    free = _rank(best, demand)[0] is False
    if not free and no_queue:
        raise CubeError(
            f"Every host in {selector} that fits is busy: "
            + "; ".join(f"{r.name} ({describe(r)})" for r in fit) + ".",
            "Drop --no-queue to wait in the queue of the best one, or try again later.")
    others = [f"{r.name}: {describe(r)}" if r.reachable else f"{r.name}: unreachable ({r.error})"
              for r in reports if r is not best]
    why = (f"{'free' if free else 'all busy, queueing'}: {describe(best)}"
           + (f"; others: {'; '.join(others)}" if others else ""))
    return best, why


def place(selector: str, labels: list[str], inventory: Path | None, demand: Demand,
          runtime: str, python: str | None, *, no_queue: bool, log: Log,
          timeout: float = fleet.DEFAULT_TIMEOUT_S,
          probe: Callable[..., list[fleet.HostReport]] = fleet.probe_hosts) -> str:
    """Probe the selection and return the chosen host's name, saying which and why."""
    specs = select_hosts(selector, labels, inventory)
    reports = probe(specs, timeout=timeout)
    for r in reports:
        if not r.reachable:
            log(f"placement: skipping {r.name}: unreachable ({r.error})")
    best, why = choose(reports, demand, runtime, python, selector=_label(selector, labels),
                       no_queue=no_queue)
    log(f"placement: chose {best.name} for {demand.slots} slot(s) ({why})")
    return best.name


def _label(selector: str, labels: list[str]) -> str:
    return selector + "".join(f" --label {label}" for label in labels)


# ---- what the launch asks of the chosen host -------------------------------------------------

def slot_request(spec: HostSpec, probe: dict, demand: Demand, no_queue: bool = False) -> SlotRequest:
    """The host's slots from its probe: one per GPU, else the inventory's `slots:` (default 1)."""
    gpus = [int(g["index"]) for g in probe.get("gpus") or [] if g.get("index") is not None]
    total = len(gpus) or spec.slots or 1
    if demand.slots > total:
        raise CubeError(f"Host {spec.name} has {total} slot(s); the job needs {demand.slots} "
                        f"({demand.why}).",
                        "Ask for fewer (--slots / --gpus) or choose a bigger host.")
    return SlotRequest(slots=demand.slots, total_slots=total,
                       lease_dir=spec.lease_dir or DEFAULT_LEASE_DIR, slot_gpus=gpus,
                       no_queue=no_queue)
