"""`cube remote prune`: free disk on hosts (the agent's `prune` verb, agent/pruning.py).

Each selected host is asked in its own thread; an unreachable one is reported and the others
go on. What goes: finished jobs' folders (ended before the cutoff), environments and images no
job used since the cutoff, cube copies no kept job uses. Never a pending, queued or running
job or what it uses. `dry_run` asks for the same list and removes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from controller.errors import CubeError
from controller.hosts import HostSpec
from controller.selectors import select_hosts

DEFAULT_OLDER_THAN = "14d"
PRUNE_TIMEOUT_S = 900.0   # removing a few large environments and images takes a while
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class HostPrune:
    host: str
    reachable: bool = True
    error: str | None = None
    removed: list[dict] = field(default_factory=list)  # {kind, path | id, bytes, error?}
    bytes: int = 0                                     # freed (planned, with dry_run)
    in_use: list[str] = field(default_factory=list)    # kind:key that kept jobs use

    def to_dict(self) -> dict:
        return asdict(self)


def parse_age(text: str) -> float:
    """"14d", "12h", "30m", "90s", "2w" or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not match:
        raise CubeError(f"--older-than {text!r} is not an age.",
                        "Write a number with a unit: 90s, 30m, 12h, 14d or 2w (0 = everything "
                        "finished).")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


def prune_host(spec: HostSpec, older_than: float, dry_run: bool) -> HostPrune:
    # paramiko loads only when hosts are contacted, not on every CLI start.
    from controller.transport import connect  # noqa: PLC0415

    args = ["--older-than", str(older_than)] + (["--dry-run"] if dry_run else [])
    try:
        with connect(spec) as target:
            answer = target.agent("prune", *args, timeout=PRUNE_TIMEOUT_S)
    except CubeError as err:
        return HostPrune(spec.name, reachable=False, error=str(err))
    return HostPrune(spec.name, removed=answer.get("removed") or [],
                     bytes=int(answer.get("bytes") or 0), in_use=answer.get("in_use") or [])


def prune(selector: str | None, labels: list[str], inventory: Path | None, older_than: float,
          dry_run: bool, *, prune_one: Callable[[HostSpec, float, bool], HostPrune] = prune_host
          ) -> list[HostPrune]:
    """One HostPrune per selected host, in selection order."""
    specs = select_hosts(selector, labels, inventory)
    with ThreadPoolExecutor(max_workers=min(16, len(specs))) as pool:
        return list(pool.map(lambda s: prune_one(s, older_than, dry_run), specs))


def item_name(item: dict) -> str:
    return item.get("path") or f"{item.get('engine')} image {item.get('id')}"
