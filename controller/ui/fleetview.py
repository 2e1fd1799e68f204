"""The Hosts page's data: the last `controller.fleet` probe of every inventory host, refreshed
in a background thread when a reader finds it stale, so no page view waits on SSH."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from controller import fleet
from controller.errors import CubeError
from controller.fleet import HostReport
from controller.selectors import select_hosts

STALE_AFTER_S = 15.0
PROBE_TIMEOUT_S = 10.0


@dataclass
class FleetSnapshot:
    reports: list[HostReport] = field(default_factory=list)
    probed_at: float | None = None
    error: str | None = None
    refreshing: bool = False


class FleetView:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.snapshot = FleetSnapshot()

    def current(self) -> FleetSnapshot:
        """The last probe; starts a refresh in the background when it is missing or stale."""
        with self._lock:
            stale = (self.snapshot.probed_at is None
                     or time.time() - self.snapshot.probed_at > STALE_AFTER_S)
            if stale and not self.snapshot.refreshing:
                self.snapshot.refreshing = True
                threading.Thread(target=self._refresh, daemon=True,
                                 name="cube-ui-fleet").start()
            return self.snapshot

    def _refresh(self) -> None:
        try:
            reports = fleet.probe_hosts(select_hosts(None), timeout=PROBE_TIMEOUT_S)
            fresh = FleetSnapshot(reports=reports, probed_at=time.time())
        except CubeError as err:  # e.g. an empty inventory: say so on the page
            fresh = FleetSnapshot(probed_at=time.time(), error=str(err))
        with self._lock:
            self.snapshot = fresh

    def best_of(self, names: list[str]) -> str:
        """For a group: the reachable host with the most free slots in the last probe, else
        the group's first host."""
        by_name = {r.name: r for r in self.snapshot.reports if r.reachable}
        ranked = sorted((n for n in names if n in by_name),
                        key=lambda n: -(by_name[n].slots_free or 0))
        return ranked[0] if ranked else names[0]
