"""Multi-node runs: `cube remote run CUBE --task train --host @lab --nodes N`, one job on N hosts.

No daemon: the controller launches one agent job per rank (`<job>-r0`, `<job>-r1`, ...; the
ledger keeps one job whose host is the comma list of its hosts), each with a `gang` field
(agent/gang.py). In order:

1. hosts: the selection is probed in parallel; the N best hosts that fit (as placement ranks
   them) are chosen. Fewer than N is an error (exit 2) before anything is synced.
2. each rank's host is connected, synced and prepared side by side; then every rank is
   launched. Its supervisor takes its slots through the host's queue and waits, holding them,
   in state "reserved", reporting a free port of its host.
3. gang start: once every rank is reserved (within CUBE_GANG_TIMEOUT, default 600 s), the
   controller writes each rank's go file with its environment (`rank_env`); a rank that
   cannot reserve in time, or that ends, cancels them all. No rank runs before all hold their
   slots, and ranks left without a go give their slots back (`go_timeout`).
4. following (controller.rankfollow): every rank's log, lines prefixed `[i]`; the first rank to
   fail, or to be lost, has the others cancelled, and the job ends failed naming it.
5. rank 0's outputs are pulled; the ledger and the run record are finished.

Multi-node runs are followed: `--detach` is refused, and Ctrl-C cancels every rank (a rank on
its own cannot see that a peer died on another host).
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from controller import fleet, paths, placement, records, remote, sync
from controller import jobs as ledger_mod
from controller.cube import load_cube
from controller.errors import CubeError
from controller.hosts import HostSpec
from controller.jobs import Job, Ledger
from controller.plan import HostLayout, JobPlan, plan_job
from controller.rankfollow import Followers, RankLog
from controller.runtimes import get_runtime
from controller.runtimes.base import LaunchSpec, ProbedFacts
from controller.selectors import select_hosts
from controller.sinks import Sinks
from controller.transport import HostTarget, connect

Log = Callable[[str], None]
GANG_TIMEOUT_S = float(os.environ.get("CUBE_GANG_TIMEOUT", 600))
GO_MARGIN_S = 120.0   # a rank waits this much longer for its go than we wait for the gang
CANCEL_GRACE_S = 10.0


@dataclass
class Rank:
    index: int
    spec: HostSpec
    job_id: str
    target: HostTarget | None = None
    probe: dict = field(default_factory=dict)
    launch: LaunchSpec | None = None
    layout: HostLayout | None = None

    @property
    def where(self) -> str:
        return f"rank {self.index} ({self.spec.name})"


# ---- 1. hosts ----------------------------------------------------------------------------------

def choose_hosts(selector: str, labels: list[str], inventory: Path | None, nodes: int,
                 demand: placement.Demand, runtime: str, python: str | None, log: Log,
                 probe: Callable[..., list[fleet.HostReport]] = fleet.probe_hosts
                 ) -> list[HostSpec]:
    """The `nodes` best hosts of the selection, best first (rank 0 on the first)."""
    specs = select_hosts(selector, labels, inventory)
    what = selector + "".join(f" --label {label}" for label in labels)
    if len(specs) < nodes:
        raise CubeError(f"--nodes {nodes} needs {nodes} hosts, but {what} selects "
                        f"{len(specs)}: {', '.join(s.name for s in specs)}.",
                        "Select more hosts (a comma list or @group) or ask for fewer --nodes.")
    slurm_hosts = [s.name for s in specs if s.slurm is not None]
    if slurm_hosts:
        raise CubeError(f"Multi-node runs go to agent hosts; {', '.join(slurm_hosts)} "
                        "schedule(s) with Slurm.", "Select hosts without `scheduler: slurm`.")
    by_name = {s.name: s for s in specs}
    reports = probe(specs)
    fit: list[fleet.HostReport] = []
    unfit: list[str] = []
    for r in reports:
        why = _unusable(r, demand, runtime, python)
        if why:
            unfit.append(f"{r.name}: {why}")
        else:
            fit.append(r)
    if len(fit) < nodes:
        raise CubeError(f"--nodes {nodes} needs {nodes} hosts that can run the job; {what} has "
                        f"{len(fit)}" + (f" ({'; '.join(unfit)})" if unfit else "")
                        + ".", "Free or add hosts, or ask for fewer --nodes.")
    best = sorted(fit, key=lambda r: _rank_key(r, demand))[:nodes]
    log(f"nodes: {', '.join(f'rank {i} on {r.name}' for i, r in enumerate(best))}"
        + (f"; not usable: {'; '.join(unfit)}" if unfit else ""))
    return [by_name[r.name] for r in best]


def _unusable(r: fleet.HostReport, demand: placement.Demand, runtime: str,
              python: str | None) -> str | None:
    if not r.reachable:
        return f"unreachable: {r.error}"
    if (r.slots_total or 0) < demand.slots:
        return f"{r.slots_total} slot(s), needs {demand.slots}"
    return placement.runtime_missing(r, runtime, python)


def _rank_key(r: fleet.HostReport, demand: placement.Demand) -> tuple:
    """As placement ranks hosts: free now and no queue, then the shortest queue, then load."""
    free = (r.slots_free or 0) >= demand.slots and not r.queued
    return (not free, len(r.queued), r.load_per_core if r.load_per_core is not None else 1e9)


# ---- 2. prepare and launch ---------------------------------------------------------------------

def rank_log(log: Log, rank: Rank) -> Log:
    return lambda message: log(f"[{rank.index}] {message}")


def prepare_rank(rank: Rank, plan: JobPlan, inputs: list[str], accept_new: bool,
                 log: Log) -> None:
    """Connect, probe, sync and prepare the runtime on the rank's host (runs in a thread)."""
    rank.target = connect(rank.spec, accept_new_host_key=accept_new)
    rank.probe = rank.target.agent("probe", *fleet.probe_args(rank.spec))
    rank.layout = HostLayout.for_plan(rank.target.root, plan, rank.job_id)
    remote._sync_up(rank.target, plan.cube, rank.layout, inputs, log)
    rank.launch = get_runtime(plan.runtime).prepare(plan, rank.target, rank.layout,
                                                    ProbedFacts(rank.probe), log)


def launch_rank(rank: Rank, world: int, demand: placement.Demand, no_queue: bool,
                name: str | None) -> dict:
    assert rank.target is not None and rank.launch is not None
    spec = rank.launch.agent_spec(rank.job_id, name)
    spec["env_key"] = rank.launch.env_key
    spec.update(placement.slot_request(rank.spec, rank.probe, demand, no_queue).spec_fields())
    spec["gang"] = {"rank": rank.index, "world_size": world,
                    "go_timeout": GANG_TIMEOUT_S + GO_MARGIN_S}
    return rank.target.agent("launch", input=json.dumps(spec).encode())


def in_parallel(ranks: list[Rank], fn: Callable[[Rank], object]) -> list:
    """fn(rank) for every rank side by side; the first error (in rank order) is raised."""
    with ThreadPoolExecutor(max_workers=len(ranks)) as pool:
        futures = [pool.submit(fn, r) for r in ranks]
    for rank, future in zip(ranks, futures, strict=True):
        error = future.exception()
        if error is not None:
            if isinstance(error, CubeError):
                error.message = f"{rank.where}: {error.message}"
            raise error
    return [f.result() for f in futures]


# ---- 3. gang start -----------------------------------------------------------------------------

def gather(ranks: list[Rank], timeout: float, log: Log) -> list[dict]:
    """Every rank's state once all are reserved; CubeError when one ended or the time ran out."""
    deadline = time.monotonic() + timeout
    said: set[int] = set()
    while True:
        states = [r.target.agent("status", r.job_id) for r in ranks if r.target]
        for rank, state in zip(ranks, states, strict=True):
            if state["state"] in ("succeeded", "failed", "cancelled", "lost"):
                raise CubeError(f"{rank.where} ended before the gang started: {state['state']}"
                                + (f" ({state.get('error')})" if state.get("error") else "") + ".",
                                "The other ranks were cancelled; no rank ran.")
            if state["state"] == "queued" and rank.index not in said:
                said.add(rank.index)
                log(f"{rank.where} waits in its host's queue; the gang starts once every rank "
                    "holds its slots")
        if all(s["state"] == "reserved" for s in states):
            return states
        if time.monotonic() > deadline:
            waiting = [f"{r.where}: {s['state']}" for r, s in zip(ranks, states, strict=True)
                       if s["state"] != "reserved"]
            raise CubeError(f"Not every rank got its slots within {timeout:g} s "
                            f"({'; '.join(waiting)}).",
                            "Every rank was cancelled; try again when the hosts are free "
                            "(`cube hosts`), or raise CUBE_GANG_TIMEOUT.", exit_code=1)
        time.sleep(0.5)


def rank_env(index: int, addresses: list[str], ports: list[int]) -> dict[str, str]:
    """What each rank's tasks see: cube's names, PyTorch's and TensorFlow's TF_CONFIG. Rank 0's
    port is the master port; every worker of TF_CONFIG listens on its own host's port."""
    world = len(addresses)
    tf_config = {"cluster": {"worker": [f"{a}:{p}" for a, p in zip(addresses, ports, strict=True)]},
                 "task": {"type": "worker", "index": index}}
    common = {"RANK": str(index), "WORLD_SIZE": str(world), "MASTER_ADDR": addresses[0],
              "MASTER_PORT": str(ports[0])}
    return {**{f"CUBE_{k}": v for k, v in common.items()}, **common,
            "TF_CONFIG": json.dumps(tf_config)}


def send_go(ranks: list[Rank], states: list[dict], log: Log) -> None:
    addresses = [r.spec.hostname for r in ranks]
    ports = [int(s["gang"]["port"]) for s in states]
    for rank in ranks:
        write_go(rank, {"env": rank_env(rank.index, addresses, ports)})
    log(f"gang start: {len(ranks)} ranks hold their slots; master {addresses[0]}:{ports[0]}")


def write_go(rank: Rank, go: dict) -> None:
    assert rank.target is not None
    path = posixpath.join(rank.target.root, "jobs", rank.job_id, "go.json")
    rank.target.put(json.dumps(go).encode(), path)


def cancel_all(ranks: list[Rank], why: str, log: Log, skip: int | None = None,
               grace: float = CANCEL_GRACE_S) -> None:
    """Stop every rank (but `skip`) side by side: an abort for one still waiting for its go,
    then the agent's cancel. Errors are logged: one unreachable host stops no other cancel."""
    def stop(rank: Rank) -> None:
        if rank.target is None or rank.index == skip:
            return
        try:
            write_go(rank, {"abort": why})
            rank.target.agent("cancel", rank.job_id, "--grace", str(grace), timeout=grace + 60)
        except Exception as err:  # each host's failure is its own
            log(f"{rank.where}: cancel failed ({err}); `cube remote cancel` it on the host")

    with ThreadPoolExecutor(max_workers=len(ranks)) as pool:
        list(pool.map(stop, ranks))


# ---- the whole run -----------------------------------------------------------------------------

def run(req: remote.RunRequest, nodes: int, sinks: Sinks) -> remote.RunResult:
    """`cube remote run --nodes N` (N >= 2): see the module's docstring."""
    _refuse(req, nodes)
    overrides = [*req.config_overrides, *placement.gpu_overrides(req.gpus)]
    cube = load_cube(req.cube_path, workspace=req.workspace, config_overrides=overrides,
                     requested_runtime=req.runtime)
    for warning in cube.warnings:
        sinks.log(f"warning: {warning}")
    plan = plan_job(cube, req.tasks, req.overrides)
    inputs = plan.inputs_to_push()
    demand = placement.demand_for(cube, req.gpus, req.slots)
    specs = choose_hosts(req.host, req.labels, req.inventory, nodes, demand, plan.runtime,
                         cube.env.python_version, sinks.log)
    job_id = ledger_mod.new_job_id(cube.name)
    ranks = [Rank(i, spec, f"{job_id}-r{i}") for i, spec in enumerate(specs)]
    with Ledger() as ledger, ExitStack() as closing:
        closing.callback(_close_all, ranks)
        job = _new_job(job_id, plan, req, ranks)
        sinks.job_started(job.id)
        sinks.log(f"job {job.id}: {', '.join(plan.task_names)} on {nodes} nodes "
                  f"({job.host}; {plan.runtime}: {plan.runtime_reason})")
        in_parallel(ranks, lambda r: prepare_rank(r, plan, inputs, req.accept_new_host_key,
                                                  rank_log(sinks.log, r)))
        _save_start(ledger, job, plan, ranks[0], overrides)
        try:
            in_parallel(ranks, lambda r: launch_rank(r, nodes, demand, req.no_queue, req.name))
            send_go(ranks, gather(ranks, GANG_TIMEOUT_S, sinks.log), sinks.log)
        except BaseException as err:
            cancel_all(ranks, f"the gang did not start: {err}", sinks.log)
            interrupted = isinstance(err, KeyboardInterrupt)
            _end(ledger, job, "cancelled" if interrupted else "failed", None,
                 "interrupted" if interrupted else str(err))
            raise
        job.state, job.started_at = "running", time.time()
        ledger.save(job)
        return follow(ledger, job, ranks, sinks)


def _close_all(ranks: list[Rank]) -> None:
    for rank in ranks:
        if rank.target is not None:
            rank.target.close()


def _refuse(req: remote.RunRequest, nodes: int) -> None:
    if nodes < 2:
        raise CubeError(f"--nodes must be at least 2 for a multi-node run, not {nodes}.")
    if req.detach:
        raise CubeError("--detach cannot be used with --nodes: a multi-node run is followed to "
                        "its end, since only the controller sees every rank and cancels the "
                        "others when one fails.", "Leave out --detach (Ctrl-C cancels the run).")
    if req.name:
        raise CubeError("--name cannot be used with --nodes.", "Leave out --name.")
    if req.after:
        raise CubeError("A multi-node run cannot wait for other jobs (after).")


def _new_job(job_id: str, plan: JobPlan, req: remote.RunRequest, ranks: list[Rank]) -> Job:
    cube = plan.cube
    job = Job(id=job_id, cube=cube.name, host=",".join(r.spec.name for r in ranks),
              tasks=plan.task_names, name=req.name, cube_path=str(cube.root),
              params=dict(req.overrides), runtime=plan.runtime,
              workspace=str(cube.workspace), outputs=plan.outputs_to_pull,
              inventory=str(req.inventory or ""), launcher="gang")
    job.log_path = str(job_dir(job_id) / "output.log")
    return job


def job_dir(job_id: str) -> Path:
    return paths.cube_home() / "jobs" / job_id


def _save_start(ledger: Ledger, job: Job, plan: JobPlan, rank0: Rank,
                overrides: list[str]) -> None:
    """The ledger and the run record take rank 0's host root, env and runtime."""
    assert rank0.target is not None and rank0.launch is not None and rank0.layout is not None
    job.remote_dir = rank0.target.root
    job.env_hash = rank0.launch.env_key
    ledger.save(job)
    record = records.start_record(plan, job, rank0.launch,
                                  records.host_from_probe(rank0.spec.name, rank0.probe),
                                  overrides, rank0.target, rank0.layout.envs_dir)
    ledger.save_record(job.id, record)


def follow(ledger: Ledger, job: Job, ranks: list[Rank], sinks: Sinks,
            interrupt_cancels: bool = True) -> remote.RunResult:
    """Follow every rank to its end (the first to fail has the others cancelled), then end the
    job and pull rank 0's outputs. Ctrl-C cancels every rank, or with `interrupt_cancels`
    False (`cube remote attach`) only stops following."""
    logs = [RankLog(r.index, r.spec.name, r.job_id, r.target, job_dir(job.id) / f"rank-{r.index}.log")
            for r in ranks if r.target is not None]
    followers = Followers(logs, Path(job.log_path), sinks)
    followers.start()
    try:
        bad = followers.wait_first_failure()
    except KeyboardInterrupt:
        if not interrupt_cancels:
            raise
        sinks.log("interrupted: cancelling every rank (a multi-node run cannot be detached)")
        cancel_all(ranks, "the controller was interrupted", sinks.log)
        followers.join(CANCEL_GRACE_S + 30)
        _end(ledger, job, "cancelled", None, "interrupted")
        _pull(ledger, job, ranks[0], sinks.log)
        return remote.RunResult(job.id, job.state, 130)
    if bad is not None:
        why = _failure(bad)
        sinks.log(f"{why}: cancelling the other ranks")
        cancel_all(ranks, why, sinks.log, skip=bad.index)
        followers.join(CANCEL_GRACE_S + 30)
        _end(ledger, job, "failed", (bad.final or {}).get("exit_code"), why)
    else:
        _end(ledger, job, "succeeded", 0, None)
    _pull(ledger, job, ranks[0], sinks.log)
    sinks.log(f"job {job.id} {job.state}" + (f": {job.reason}" if job.reason else ""))
    if bad is not None:
        raise CubeError(f"Job {job.id} failed: {why}; the other ranks were cancelled.",
                        f"Each rank's log: {job_dir(job.id)}/rank-<i>.log.",
                        exit_code=job.exit_code or 1)
    return remote.RunResult(job.id, job.state, 0)


def _failure(bad: RankLog) -> str:
    where = f"rank {bad.index} ({bad.host})"
    if bad.error is not None:
        return f"{where} could not be followed ({type(bad.error).__name__}: {bad.error})"
    state = bad.final or {}
    code = f" with exit code {state['exit_code']}" if state.get("exit_code") is not None else ""
    error = f" ({state['error']})" if state.get("error") else ""
    return f"{where} {state.get('state')}{code}{error}"


def _end(ledger: Ledger, job: Job, state: str, code: int | None, reason: str | None) -> None:
    job.state, job.exit_code, job.reason, job.ended_at = state, code, reason, time.time()
    ledger.save(job)


def _pull(ledger: Ledger, job: Job, rank0: Rank, log: Log) -> None:
    """Rank 0's outputs (the chief writes the model), into the local workspace."""
    assert rank0.target is not None
    outputs_dir = HostLayout(rank0.target.root, job.cube, rank0.job_id).outputs_dir
    try:
        report = sync.pull(rank0.target, outputs_dir, Path(job.workspace), paths=job.outputs)
    except CubeError as err:
        log(f"could not pull rank 0's outputs: {err}")
        return
    log(f"pulled rank 0's outputs into {job.workspace}: {remote.describe_sync(report)}")
    job.outputs_pulled = True
    ledger.save(job)
    record = ledger.record(job.id)
    if record is not None:
        outputs = records.output_digests(Path(job.workspace), job.outputs)
        ledger.save_record(job.id, records.finish_record(
            record, job, {"state": job.state, "exit_code": job.exit_code}, outputs))

