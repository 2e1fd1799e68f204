"""`cube remote status|cancel|attach|logs|fetch` for a multi-node job (controller/multinode.py).

Such a job is one ledger job whose host is the comma list of its hosts (launcher `gang`), and
one agent job per rank on its host (`<job>-r0`, `<job>-r1`, ...). controller.remote hands it
here, so each command talks to every rank's host instead of one:

- status: each rank's state (host, state, exit code) and the job's overall state;
- cancel: every rank (an abort for one still waiting for its go, then the agent's cancel);
- attach: every rank followed as the run's controller does (prefixed lines, the first rank to
  fail has the others cancelled, rank 0's outputs pulled); Ctrl-C detaches;
- logs: the combined local log, then what the ranks' hosts have beyond it (-f: until every
  rank ends);
- fetch: rank 0's outputs (the chief writes the model).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from controller import multinode, remote, sync
from controller.errors import CubeError
from controller.hosts import resolve_host
from controller.jobs import FINAL_STATES, Job, Ledger
from controller.plan import HostLayout
from controller.rankfollow import Followers, RankLog
from controller.sinks import Sinks
from controller.transport import connect

Log = Callable[[str], None]
ACTIVE = ("pending", "queued", "reserved", "running")


def ranks_of(job: Job) -> list[multinode.Rank]:
    inventory = Path(job.inventory) if job.inventory else None
    return [multinode.Rank(i, resolve_host(host, inventory), f"{job.id}-r{i}")
            for i, host in enumerate(job.host.split(","))]


@contextmanager
def connected(job: Job, log: Log, *, all_needed: bool) -> Iterator[tuple[list[multinode.Rank],
                                                                          dict[int, str]]]:
    """Every rank's host connected side by side; (ranks, {index: why} for those that failed).
    With all_needed, the first failure (in rank order) is raised instead."""
    ranks = ranks_of(job)
    errors: dict[int, str] = {}

    def open_one(rank: multinode.Rank) -> None:
        try:
            rank.target = connect(rank.spec)
        except Exception as err:  # each host's failure is its own
            if all_needed:
                raise
            errors[rank.index] = f"{type(err).__name__}: {err}"
            log(f"{rank.where}: {err}")

    try:
        multinode.in_parallel(ranks, open_one)
        yield ranks, errors
    finally:
        for rank in ranks:
            if rank.target is not None:
                rank.target.close()


def _rank_state(rank: multinode.Rank, errors: dict[int, str]) -> dict:
    row = {"rank": rank.index, "job": rank.job_id, "host": rank.spec.name}
    if rank.target is None:
        return {**row, "state": "unknown", "exit_code": None, "error": errors.get(rank.index)}
    try:
        state = rank.target.agent("status", rank.job_id)
    except (CubeError, *remote.CONNECTION_ERRORS) as err:
        return {**row, "state": "unknown", "exit_code": None, "error": str(err)}
    return {**row, "state": state.get("state"), "exit_code": state.get("exit_code"),
            "error": state.get("error") or state.get("reason")}


def overall(rows: list[dict]) -> dict:
    """The job's state from its ranks': running while any runs (else the first active rank's
    state); once all are final, succeeded only if all did, else failed (a rank failed or was
    lost) or cancelled, naming the first such rank; unknown when a rank could not be asked."""
    states = [r["state"] for r in rows]
    if all(s in FINAL_STATES for s in states):
        if all(s == "succeeded" for s in states):
            return {"state": "succeeded", "exit_code": 0, "reason": None}
        failed = [r for r in rows if r["state"] in ("failed", "lost")]
        bad = (failed or [r for r in rows if r["state"] == "cancelled"])[0]
        code = f" with exit code {bad['exit_code']}" if bad["exit_code"] is not None else ""
        return {"state": "failed" if failed else "cancelled", "exit_code": bad["exit_code"],
                "reason": f"rank {bad['rank']} ({bad['host']}) {bad['state']}{code}"}
    active = [s for s in states if s in ACTIVE]
    state = "running" if "running" in active else active[0] if active else "unknown"
    return {"state": state, "exit_code": None, "reason": None}


def _record(ledger: Ledger, job: Job, rows: list[dict]) -> dict:
    """The overall state, saved in the ledger unless the job already ended there (the run's
    controller named the rank that failed it): then the ledger's is reported."""
    now = overall(rows)
    if job.finished:
        now = {"state": job.state, "exit_code": job.exit_code, "reason": job.reason}
    elif now["state"] != job.state and now["state"] != "unknown":
        job.state, job.exit_code, job.reason = now["state"], now["exit_code"], now["reason"]
        if job.finished:
            job.ended_at = time.time()
        ledger.save(job)
    return {"job": job.id, "host": job.host, "launcher": "gang", **now, "ranks": rows}


def status(ledger: Ledger, job: Job) -> dict:
    with connected(job, lambda _m: None, all_needed=False) as (ranks, errors):
        rows = [_rank_state(r, errors) for r in ranks]
    return _record(ledger, job, rows)


def cancel(ledger: Ledger, job: Job, grace: float, log: Log) -> dict:
    with connected(job, log, all_needed=False) as (ranks, errors):
        multinode.cancel_all(ranks, "cancelled (cube remote cancel)", log, grace=grace)
        rows = [_rank_state(r, errors) for r in ranks]
    return _record(ledger, job, rows)


def attach(ledger: Ledger, job: Job, sinks: Sinks) -> remote.RunResult:
    with connected(job, sinks.log, all_needed=True) as (ranks, _errors):
        return multinode.follow(ledger, job, ranks, sinks, interrupt_cancels=False)


def logs(job: Job, follow: bool, sinks: Sinks) -> None:
    """What remote.logs does, for every rank: lines prefixed `[i]`, as the run showed them."""
    path = Path(job.log_path)
    if path.exists():
        sinks.output(path.read_bytes())
    if job.finished and not follow and job.outputs_pulled:
        return
    with connected(job, sinks.log, all_needed=True) as (ranks, _errors):
        followers = Followers([RankLog(r.index, r.spec.name, r.job_id, r.target,  # type: ignore[arg-type]
                                       multinode.job_dir(job.id) / f"rank-{r.index}.log")
                               for r in ranks], path, sinks)
        if not follow:
            followers.catch_up()
            return
        followers.start()
        followers.wait_all()
    lost = [f"rank {r.index} ({r.host}): {r.error}" for r in followers.ranks if r.error]
    if lost:
        raise CubeError(f"Could not follow every rank of {job.id}: {'; '.join(lost)}.",
                        f"Try again: `cube remote logs -f {job.id}`.", exit_code=3)


def fetch(ledger: Ledger, job: Job, log: Log) -> None:
    """Rank 0's outputs into the local workspace (again)."""
    rank0 = ranks_of(job)[0]
    with connect(rank0.spec) as target:
        outputs_dir = HostLayout(job.remote_dir, job.cube, rank0.job_id).outputs_dir
        report = sync.pull(target, outputs_dir, Path(job.workspace), paths=job.outputs)
    log(f"pulled rank 0's outputs into {job.workspace}: {remote.describe_sync(report)}")
    job.outputs_pulled = True
    ledger.save(job)

