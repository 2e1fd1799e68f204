"""Where a sweep's jobs stand: asked of their hosts (one connection per host, kept across polls),
recorded in the ledger, and with `pull`, each final job finished as `cube remote attach` would:
its end recorded, its outputs pulled into its variant's folder, its run record completed.
An unreachable host is reported once and its jobs keep their ledger state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from controller import remote
from controller.errors import CubeError
from controller.jobs import Job, Ledger
from controller.transport import HostTarget

Log = Callable[[str], None]


class HostPool:
    """Open connections by (host, inventory); a host that failed is not retried this round."""

    def __init__(self, log: Log):
        self.log = log
        self.targets: dict[tuple[str, str], HostTarget] = {}
        self.down: set[tuple[str, str]] = set()

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for target in self.targets.values():
            target.close()
        self.targets.clear()

    def get(self, job: Job) -> HostTarget | None:
        key = (job.host, job.inventory)
        if key in self.down:
            return None
        if key not in self.targets:
            try:
                self.targets[key] = remote.connect_for(job, lambda _m: None)
            except CubeError as err:
                self.log(f"{job.host} is unreachable: {err.message}")
                self.down.add(key)
                return None
        return self.targets[key]

    def drop(self, job: Job) -> None:
        target = self.targets.pop((job.host, job.inventory), None)
        if target is not None:
            target.close()

    def next_round(self) -> None:
        self.down.clear()


@dataclass
class View:
    latest: dict[str, Job] = field(default_factory=dict)   # variant -> its newest job
    settled: bool = True                                    # every job final and pulled


def latest_jobs(ledger: Ledger, sweep_id: str) -> dict[str, Job]:
    latest: dict[str, Job] = {}
    for job in ledger.sweep_jobs(sweep_id):  # oldest first: a retry's job replaces the first
        latest[str(job.variant)] = job
    return latest


def refresh(sweep_id: str, pool: HostPool, log: Log, *, pull: bool) -> View:
    """Ask the hosts about every unsettled job of the sweep and record what they say."""
    pool.next_round()
    view = View()
    with Ledger() as ledger:
        view.latest = latest_jobs(ledger, sweep_id)
        for job in view.latest.values():
            if job.finished and (job.outputs_pulled or not pull):
                continue
            _look(ledger, pool, job, log, pull)
            view.settled &= job.finished and (job.outputs_pulled or not pull)
    return view


def _look(ledger: Ledger, pool: HostPool, job: Job, log: Log, pull: bool) -> bool:
    """Update one job from its host; True when it is final now."""
    target = pool.get(job)
    if target is None:
        return False
    try:
        state = target.agent("status", job.id)
        if state.get("state") not in ("succeeded", "failed", "cancelled", "lost"):
            if state.get("state") != job.state:
                job.state = state.get("state", job.state)
                ledger.save(job)
            return False
        if pull:  # `cube sweep results|retry` and --follow: say it ended, then pull
            code = f" (exit {state.get('exit_code')})" if state.get("exit_code") else ""
            log(f"{job.variant}: job {job.id} {state['state']} on {job.host}{code}")
            remote.finish(ledger, target, job, state, lambda m: log(f"{job.variant}: {m}"))
        else:
            job.state, job.exit_code = state["state"], state.get("exit_code")
            job.reason = state.get("error") or state.get("reason")
            ledger.save(job)
        return True
    except remote.CONNECTION_ERRORS as err:
        pool.drop(job)
        log(f"{job.variant}: connection to {job.host} lost ({err}); will look again")
    except CubeError as err:
        log(f"{job.variant}: job {job.id} on {job.host}: {err.message}")
    return False
