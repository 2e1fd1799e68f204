"""`cube hosts`: nvidia-smi parsing (agent/gpus.py), rows from probes, the parallel prober's
deadline, and the real thing against lab hosts with one cut off."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import gpus as agent_gpus
from controller import fleet
from controller.hosts import HostSpec

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia-smi"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# ---- nvidia-smi -------------------------------------------------------------------------------

def test_two_idle_a100s():
    gpus = agent_gpus.join_apps(agent_gpus.parse_gpus(fixture("a100x2-query-gpu.txt")),
                                agent_gpus.parse_compute_apps(fixture("a100x2-query-compute-apps.txt")))
    assert gpus == [
        {"index": 0, "name": "NVIDIA A100-SXM4-40GB",
         "uuid": "GPU-8a2f1c9e-3b7d-4e2a-9c1f-6d5e4b3a2c10", "memory_used_mib": 4,
         "memory_total_mib": 40960, "utilization_pct": 0, "driver_version": "535.154.05",
         "busy_pids": []},
        {"index": 1, "name": "NVIDIA A100-SXM4-40GB",
         "uuid": "GPU-1d7e5c3b-9a4f-4b6e-8d2c-0f3a1b5c7e92", "memory_used_mib": 4,
         "memory_total_mib": 40960, "utilization_pct": 0, "driver_version": "535.154.05",
         "busy_pids": []}]


def test_eight_h100s_one_busy():
    apps = agent_gpus.parse_compute_apps(fixture("h100x8-query-compute-apps.txt"))
    assert apps == [{"gpu_uuid": "GPU-e84d0f6b-2c7a-9153-d8b2-3a6e9c1f5d07", "pid": 2145873,
                     "used_memory_mib": 40312}]
    gpus = agent_gpus.join_apps(agent_gpus.parse_gpus(fixture("h100x8-query-gpu.txt")), apps)
    assert [g["index"] for g in gpus] == list(range(8))
    assert {g["name"] for g in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert [g["index"] for g in gpus if g["busy_pids"]] == [3]
    assert (gpus[3]["memory_used_mib"], gpus[3]["memory_total_mib"],
            gpus[3]["utilization_pct"], gpus[3]["busy_pids"]) == (40321, 81559, 97, [2145873])


def test_placeholders_become_none():
    gpus = agent_gpus.parse_gpus(fixture("a100-mig-query-gpu.txt"))
    assert gpus[0]["utilization_pct"] is None and gpus[0]["memory_used_mib"] == 13
    assert (gpus[2]["memory_used_mib"], gpus[2]["memory_total_mib"],
            gpus[2]["utilization_pct"]) == (None, None, None)
    assert gpus[2]["driver_version"] == "535.104.05"
    assert agent_gpus.parse_gpus("\n  \n0, short row\n") == []
    assert agent_gpus.parse_compute_apps("[N/A], [N/A], [N/A]\n") == []


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An nvidia-smi on PATH that prints the fixture for the query it is asked."""
    def install(gpus: str, apps: str, code: int = 0, apps_code: int = 0):
        script = tmp_path / "nvidia-smi"
        script.write_text(f"""#!/bin/sh
case "$1" in
  --query-gpu=*) cat {FIXTURES / gpus}; exit {code} ;;
  --query-compute-apps=*) cat {FIXTURES / apps}; exit {apps_code} ;;
esac
exit 2
""")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return install


def test_query_runs_both_commands(fake_nvidia_smi):
    fake_nvidia_smi("h100x8-query-gpu.txt", "h100x8-query-compute-apps.txt")
    result = agent_gpus.query()
    assert result["gpu_error"] is None and len(result["gpus"]) == 8
    assert result["gpus"][3]["busy_pids"] == [2145873]


def test_query_failures(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi("h100x8-query-gpu.txt", "README.md", apps_code=9)
    result = agent_gpus.query()  # the GPUs still show; who uses them is unknown
    assert len(result["gpus"]) == 8 and "query-compute-apps failed" in result["gpu_error"]
    fake_nvidia_smi("README.md", "README.md", code=9)
    result = agent_gpus.query()
    assert result["gpus"] == [] and result["gpu_error"].startswith("nvidia-smi failed:")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert agent_gpus.query() == {"gpus": [], "gpu_error": None}  # no nvidia-smi: no GPUs


# ---- rows from probes -------------------------------------------------------------------------

PROBE = {
    "hostname": "gpu01", "os": {"system": "Linux", "release": "6.1", "pretty_name": "Debian 12"},
    "root": "/home/me/.cube", "disk_free_bytes": 5 << 30, "load": [3.0, 2.0, 1.0],
    "cpu_count": 12, "mem_total_bytes": 64 << 30, "mem_available_bytes": 40 << 30,
    "running_jobs": [{"job_id": "j1", "name": "train", "state": "running"}],
    "python": [{"path": "/usr/bin/python3", "version": "3.9.2"},
               {"path": "/opt/py/bin/python3.11", "version": "3.11.7"},
               {"path": "/usr/bin/python3.9", "version": "3.9.2"}],
    "docker": {"cli": True, "reachable": True, "server_version": "24.0.7", "error": None},
    "podman": None, "gpu_error": None,
}


def spec(name="gpu01", slots=None) -> HostSpec:
    return HostSpec(name=name, hostname=f"{name}.example", user="me", slots=slots)


def test_report_from_probe_without_gpus():
    r = fleet.report_from_probe(spec(slots=3), PROBE, 0.25)
    assert (r.reachable, r.os, r.cpu_count, r.load_per_core) == (True, "Debian 12", 12, 0.25)
    assert (r.mem_free_bytes, r.disk_free_bytes) == (40 << 30, 5 << 30)
    assert r.pythons == ["3.11.7", "3.9.2"]
    assert r.engines == {"docker": {"version": "24.0.7", "ok": True, "error": None}}
    assert (r.slots_total, r.slots_free, r.slots_source) == (3, 2, "estimate")
    assert r.running == [{"job_id": "j1", "name": "train", "owner": "me", "state": "running"}]
    assert fleet.report_from_probe(spec(), PROBE).slots_total == 1  # inventory default
    assert json.loads(json.dumps(r.to_dict()))["slots_total"] == 3


def test_gpu_slots_and_agent_slots():
    gpus = agent_gpus.join_apps(agent_gpus.parse_gpus(fixture("h100x8-query-gpu.txt")),
                                agent_gpus.parse_compute_apps(fixture("h100x8-query-compute-apps.txt")))
    probe = {**PROBE, "gpus": gpus}
    r = fleet.report_from_probe(spec(slots=2), probe)
    # One slot per GPU (inventory slots are for GPU-less hosts). Without leases nothing says
    # whether the running job is GPU 3's process, so the estimate does not count both.
    assert (r.slots_total, r.slots_free) == (8, 7)
    busier = fleet.report_from_probe(spec(), {**probe, "running_jobs": PROBE["running_jobs"] * 3})
    assert busier.slots_free == 5
    assert r.gpus[3] == {"index": 3, "name": "NVIDIA H100 80GB HBM3", "memory_used_mib": 40321,
                         "memory_total_mib": 81559, "utilization_pct": 97,
                         "busy_pids": [2145873]}
    leased = {**probe, "slots": {"total": 8, "free": 5},
              "jobs": [{"job_id": "a", "state": "running", "owner": "alice"},
                       {"job_id": "b", "state": "queued", "owner": "bob"},
                       {"job_id": "c", "state": "succeeded", "owner": "bob"}]}
    r = fleet.report_from_probe(spec(), leased)
    assert (r.slots_total, r.slots_free, r.slots_source) == (8, 5, "agent")
    assert [j["owner"] for j in r.running] == ["alice"]
    assert [j["job_id"] for j in r.queued] == ["b"]


# ---- the parallel prober ----------------------------------------------------------------------

def test_hung_host_is_reported_at_the_deadline_and_others_are_not_held():
    release = threading.Event()

    def probe_one(s, timeout):
        if s.name == "hung":
            release.wait(60)  # never answers in time
        elif s.name == "broken":
            raise RuntimeError("boom")
        return fleet.report_from_probe(s, PROBE)

    specs = [spec("a"), spec("hung"), spec("b"), spec("broken")]
    start = time.monotonic()
    reports = fleet.probe_hosts(specs, timeout=1.0, probe_one=probe_one)
    took = time.monotonic() - start
    release.set()
    assert [r.name for r in reports] == ["a", "hung", "b", "broken"]
    assert [r.reachable for r in reports] == [True, False, True, False]
    assert "no answer within 1 s" in reports[1].error and 0.9 < took < 1.8
    assert "RuntimeError: boom" in reports[3].error


def test_pool_is_bounded_and_a_timed_out_probe_frees_its_place():
    running, most, lock = [0], [0], threading.Lock()

    def probe_one(s, timeout):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2 if s.name != "h0" else 5)
        with lock:
            running[0] -= 1
        return fleet.report_from_probe(s, PROBE)

    specs = [spec(f"h{i}") for i in range(9)]
    start = time.monotonic()
    reports = fleet.probe_hosts(specs, timeout=1.0, workers=3, probe_one=probe_one)
    assert most[0] <= 3 and [r.reachable for r in reports] == [False] + [True] * 8
    assert time.monotonic() - start < 2.5


def test_hung_probe_does_not_block_exit(tmp_path):
    """A worker stuck forever must not keep the process alive once the command is done."""
    code = ("import threading, time\n"
            "from controller import fleet\n"
            "from controller.hosts import HostSpec\n"
            "def stuck(s, t):\n    threading.Event().wait()\n"
            "r = fleet.probe_hosts([HostSpec(name='x', hostname='x')], timeout=0.5,"
            " probe_one=stuck)\n"
            "print(r[0].reachable)\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False", out.stderr
    assert time.monotonic() - start < 10


# ---- against real lab hosts -------------------------------------------------------------------

@pytest.fixture
def three_hosts(cube_home):
    """lab1..lab3 in the test's own CUBE_HOME (the session lab has two), always torn down."""
    from controller import lab
    from tests.conftest import require
    from tests.fixtures.lab import sshd_available

    require(sshd_available(), "OpenSSH server (/usr/sbin/sshd) is not installed")
    hosts = lab.lab_up(3, slots=2)
    require(all(h.netns for h in hosts), "cutting a link needs root and network namespaces")
    try:
        yield hosts
    finally:
        for h in hosts:
            try:
                lab.restore_link(h.name)
            except Exception:
                pass
        lab.lab_down()


def cube_json(*args: str, timeout: float = 60) -> tuple[dict, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "controller.cli", "hosts", "--json", *args],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=timeout,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), time.monotonic() - start


@pytest.mark.integration
def test_cut_and_stopped_hosts_are_reported_within_the_timeout(three_hosts):
    from controller import lab

    warm, _ = cube_json("@lab", "--timeout", "60")  # uploads the agents: not what is timed
    assert all(r["reachable"] for r in warm["hosts"]), warm
    lab.cut_link("lab2")  # packets to it vanish: connect hangs until our deadline
    data, took = cube_json("@lab", "--timeout", "5")
    rows = {r["name"]: r for r in data["hosts"]}
    assert [r["name"] for r in data["hosts"]] == ["lab1", "lab2", "lab3"]
    assert not rows["lab2"]["reachable"] and rows["lab2"]["error"]
    assert rows["lab2"]["seconds"] <= 5.5 and data["seconds"] < 6.5, data
    for name in ("lab1", "lab3"):
        r = rows[name]
        assert r["reachable"] and r["error"] is None, r
        assert r["cpu_count"] >= 1 and r["load_per_core"] is not None and r["os"]
        assert r["mem_free_bytes"] > 0 and r["mem_total_bytes"] >= r["mem_free_bytes"]
        assert r["disk_free_bytes"] > 0 and r["root"].endswith(f"{name}/root")
        assert r["pythons"] and all(v.startswith("3.") for v in r["pythons"])
        assert (r["slots_total"], r["slots_free"], r["running"]) == (2, 2, [])
        assert "docker" in r["engines"] or r["engines"] == {}
    assert took < 13  # interpreter start-up and imports on top of the 5 s budget

    lab.restore_link("lab2")
    three = next(h for h in three_hosts if h.name == "lab3")
    os.kill(three.pid, 9)  # sshd gone: connections are refused until the budget is spent
    deadline = time.monotonic() + 10
    while lab._reachable(three.address, three.port) and time.monotonic() < deadline:
        time.sleep(0.1)
    data, _ = cube_json("lab2,lab3", "--timeout", "5")
    rows = {r["name"]: r for r in data["hosts"]}
    assert rows["lab2"]["reachable"]
    assert not rows["lab3"]["reachable"] and "refused" in rows["lab3"]["error"].lower(), rows
    assert rows["lab3"]["seconds"] <= 5.5


@pytest.mark.integration
def test_table_for_people(three_hosts):
    out = subprocess.run([sys.executable, "-m", "controller.cli", "hosts", "lab1", "--label",
                          "lab"], capture_output=True, text=True, env=os.environ.copy(),
                         timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert "lab1" in out.stdout and "yes" in out.stdout and "2/2" in out.stdout
    none = subprocess.run([sys.executable, "-m", "controller.cli", "hosts", "@lab", "--label",
                           "a100"], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert none.returncode == 2 and "No host matched" in none.stderr and "@lab (3)" in none.stderr
