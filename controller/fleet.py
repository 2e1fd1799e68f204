"""`cube hosts`: probe many hosts at once and describe each in one row.

Every selected host is probed in its own daemon thread, at most `workers` at a time, and each
has `timeout` seconds for connect + probe, counted from when its probe starts. A host that does
not answer in time is reported unreachable and its thread abandoned: daemon threads never hold
up the command's exit, and an abandoned thread closes its own connection if it ever finishes.

Slots and queues: read from the probe's `slots` / `jobs` when the agent reports them; until
then slots total comes from the host's GPUs (one per GPU), else the inventory's `slots:`
(default 1), and jobs from the probe's `running_jobs`, so free slots are an estimate.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from agent.leases import DEFAULT_LEASE_DIR
from controller.errors import CubeError
from controller.hosts import HostSpec

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_WORKERS = 16
CONNECT_SHARE = 0.6  # of a host's timeout, for connect's retries (and the agent's greeting)
# One shell round trip for what the probe does not report yet (free memory, podman).
EXTRAS_SCRIPT = ("awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null || echo; "
                 "if command -v podman >/dev/null 2>&1; then "
                 "timeout 5 podman version --format '{{.Client.Version}}' 2>&1 | tail -n 1; fi")


@dataclass
class HostReport:
    """One row of `cube hosts`; `to_dict()` is its JSON form."""
    name: str
    address: str
    reachable: bool = False
    error: str | None = None
    hint: str | None = None
    seconds: float = 0.0
    hostname: str | None = None
    os: str | None = None
    cpu_count: int | None = None
    load_1m: float | None = None
    load_per_core: float | None = None
    mem_free_bytes: int | None = None
    mem_total_bytes: int | None = None
    disk_free_bytes: int | None = None
    root: str | None = None
    pythons: list[str] = field(default_factory=list)
    engines: dict[str, dict] = field(default_factory=dict)  # docker/podman -> {version, ok, error}
    gpus: list[dict] = field(default_factory=list)
    gpu_error: str | None = None
    slots_total: int | None = None
    slots_free: int | None = None
    slots_source: str | None = None  # "agent" (leases) or "estimate"
    running: list[dict] = field(default_factory=list)  # {job_id, name, owner, state}
    queued: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- one host ---------------------------------------------------------------------------------

def probe_host(spec: HostSpec, timeout: float = DEFAULT_TIMEOUT_S) -> HostReport:
    """Connect, probe, describe; any failure becomes an unreachable report, never an exception."""
    # paramiko loads only when a host is probed, not on every CLI start.
    from controller.transport import connect  # noqa: PLC0415

    start = time.monotonic()
    left = lambda: max(1.0, timeout - (time.monotonic() - start))  # noqa: E731
    conn = None
    try:
        # transport retries network errors until its budget is spent, plus at most one backoff
        # wait of <= 2 s: leave room for that, so a refused or silent host reports its own
        # reason before the caller's deadline calls it a timeout. The same budget is how long
        # the agent may take to greet, so it must not shrink to nothing either.
        conn = connect(spec, connect_timeout=max(1.0, timeout * CONNECT_SHARE))
        probe = conn.agent("probe", *probe_args(spec), timeout=left())
        if "mem_available_bytes" not in probe or "podman" not in probe:
            probe = {**_extras(conn, left()), **probe}
    except CubeError as err:
        return unreachable(spec, err.message, err.hint, time.monotonic() - start)
    except Exception as err:  # paramiko and socket errors that transport did not wrap
        why = f"{type(err).__name__}: {str(err) or 'no answer in time'}"
        return unreachable(spec, why, None, time.monotonic() - start)
    finally:
        if conn is not None:
            conn.close()
    return report_from_probe(spec, probe, time.monotonic() - start)


def probe_args(spec: HostSpec) -> list[str]:
    """The probe's arguments for a host: its lease folder and slots, so the agent reports
    who holds and waits for them (every user's jobs)."""
    return ["--lease-dir", spec.lease_dir or DEFAULT_LEASE_DIR, "--slots", str(spec.slots or 1)]


def _extras(conn, timeout: float) -> dict:
    """Free memory and podman's version by one `sh`; missing answers stay unknown."""
    try:
        result = conn.sh(EXTRAS_SCRIPT, timeout=timeout)
    except CubeError:
        return {}
    lines = result.stdout.splitlines()
    extras: dict = {"podman": None}
    if lines and lines[0].strip().isdigit():
        extras["mem_available_bytes"] = int(lines[0]) * 1024  # /proc/meminfo counts KiB
    if len(lines) > 1 and lines[1].strip():
        extras["podman"] = {"cli": True, "version": lines[1].strip()}
    return extras


def unreachable(spec: HostSpec, why: str, hint: str | None = None,
                seconds: float = 0.0) -> HostReport:
    return HostReport(name=spec.name, address=spec.address, reachable=False, error=why,
                      hint=hint, seconds=round(seconds, 3))


def report_from_probe(spec: HostSpec, probe: dict, seconds: float = 0.0) -> HostReport:
    """A probe answer (docs/INTERNALS.md "Probe:", plus optional slots/jobs) -> one row."""
    cpus = probe.get("cpu_count")
    load = (probe.get("load") or [None])[0]
    os_info = probe.get("os") or {}
    running, queued = _jobs(spec, probe)
    gpus = [_gpu(g) for g in probe.get("gpus") or []]
    total, free, source = _slots(spec, probe, gpus, running)
    return HostReport(
        name=spec.name, address=spec.address, reachable=True, seconds=round(seconds, 3),
        hostname=probe.get("hostname"),
        os=os_info.get("pretty_name") or " ".join(
            filter(None, (os_info.get("system"), os_info.get("release")))) or None,
        cpu_count=cpus, load_1m=load,
        load_per_core=round(load / cpus, 2) if load is not None and cpus else None,
        mem_free_bytes=probe.get("mem_available_bytes"),
        mem_total_bytes=probe.get("mem_total_bytes"),
        disk_free_bytes=probe.get("disk_free_bytes"), root=probe.get("root"),
        pythons=_python_versions(probe.get("python") or []),
        engines=_engines(probe), gpus=gpus, gpu_error=probe.get("gpu_error"),
        slots_total=total, slots_free=free, slots_source=source,
        running=running, queued=queued)


def _python_versions(pythons: list[dict]) -> list[str]:
    versions = {str(p["version"]) for p in pythons if p.get("version")}

    def key(v: str):
        return [int(x) if x.isdigit() else 0 for x in v.split(".")]

    return sorted(versions, key=key, reverse=True)


def _engines(probe: dict) -> dict[str, dict]:
    engines = {}
    docker = probe.get("docker") or {}
    if docker.get("cli"):
        engines["docker"] = {"version": docker.get("server_version"),
                             "ok": bool(docker.get("reachable")), "error": docker.get("error")}
    podman = probe.get("podman") or {}
    if podman.get("cli"):
        engines["podman"] = {"version": podman.get("version"), "ok": True,
                             "error": podman.get("error")}
    return engines


def _gpu(raw: dict) -> dict:
    keys = ("index", "name", "memory_used_mib", "memory_total_mib", "utilization_pct")
    gpu = {k: raw.get(k) for k in keys}
    gpu["busy_pids"] = list(raw.get("busy_pids") or [])
    return gpu


def _job(spec: HostSpec, state: dict) -> dict:
    # Jobs under this SSH user's cube root are theirs unless the agent says otherwise.
    return {"job_id": state.get("job_id"), "name": state.get("name"),
            "owner": state.get("owner") or state.get("user") or spec.user,
            "state": state.get("state")}


def _jobs(spec: HostSpec, probe: dict) -> tuple[list[dict], list[dict]]:
    if isinstance(probe.get("jobs"), list):  # the agent's slot/queue view (every user's jobs)
        jobs = [_job(spec, s) for s in probe["jobs"]]
        return ([j for j in jobs if j["state"] in ("running", "pending")],
                [j for j in jobs if j["state"] == "queued"])
    return [_job(spec, s) for s in probe.get("running_jobs") or []], []


def _slots(spec: HostSpec, probe: dict, gpus: list[dict],
           running: list[dict]) -> tuple[int, int, str]:
    slots = probe.get("slots")
    if isinstance(slots, dict) and isinstance(slots.get("total"), int):
        return slots["total"], slots.get("free", 0), "agent"
    if gpus:  # one slot per GPU; a GPU busy with anyone's process is not free
        idle = sum(1 for g in gpus if not g["busy_pids"])
        return len(gpus), max(0, min(idle, len(gpus) - len(running))), "estimate"
    total = spec.slots or 1
    return total, max(0, total - len(running)), "estimate"


# ---- many hosts -------------------------------------------------------------------------------

def probe_hosts(specs: list[HostSpec], *, timeout: float = DEFAULT_TIMEOUT_S,
                workers: int = DEFAULT_WORKERS,
                probe_one: Callable[[HostSpec, float], HostReport] | None = None
                ) -> list[HostReport]:
    """Reports in the order of `specs`. At most `workers` probes run at once; a probe that
    has not answered `timeout` s after it started is reported unreachable and abandoned, which
    also frees its place for the next host."""
    probe_one = probe_one or probe_host
    answers: queue.Queue = queue.Queue()
    waiting = list(enumerate(specs))
    active: dict[int, float] = {}  # index -> when its probe started
    reports: dict[int, HostReport] = {}
    while waiting or active:
        while waiting and len(active) < max(1, workers):
            index, spec = waiting.pop(0)
            active[index] = time.monotonic()
            threading.Thread(target=_work, args=(index, spec, timeout, probe_one, answers),
                             name=f"cube-probe-{spec.name}", daemon=True).start()
        try:
            index, report = answers.get(timeout=max(0.0, min(active.values()) + timeout
                                                    - time.monotonic()))
            if index in active:  # a late answer from an abandoned probe is dropped
                del active[index]
                reports[index] = report
        except queue.Empty:
            pass
        now = time.monotonic()
        for late in [i for i, t in active.items() if now - t >= timeout]:
            reports[late] = unreachable(
                specs[late], f"no answer within {timeout:g} s (connect + probe)",
                "Check that the host is up and reachable (network, VPN, ProxyJump), or raise "
                "--timeout.", now - active.pop(late))
    return [reports[i] for i in range(len(specs))]


def _work(index: int, spec: HostSpec, timeout: float, probe_one, answers: queue.Queue) -> None:
    try:
        report = probe_one(spec, timeout)
    except BaseException as err:  # a report is owed even when the probe function itself fails
        report = unreachable(spec, f"{type(err).__name__}: {err}")
    answers.put((index, report))
