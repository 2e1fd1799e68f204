"""Multi-node runs (controller/multinode.py, controller/rankfollow.py, agent/gang.py): the rank
environment, host choice and bad input, the gang start with real agents (no rank runs while a
host's slot is held; ranks left without a go give their slots back), and real runs on two lab
hosts in separate network namespaces: the ranker test cube (rank env, TCP between the hosts,
prefixed logs, a killed rank cancels the other) and the mnist cube with real TensorFlow."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent import leases
from controller import gangjobs, multinode
from controller.errors import CubeError
from controller.fleet import HostReport
from controller.hosts import HostSpec
from controller.placement import Demand
from controller.target import LocalTarget
from tests.test_agent import PY, call, launch, wait_final, wait_for
from tests.test_agent import root as root  # noqa: F401 (the fixture: leaves nothing running)
from tests.test_remote import copy_cube, cube, cube_cmd

FINAL = {"succeeded", "failed", "cancelled", "lost"}


# ---- the environment of each rank -------------------------------------------------------------

def test_each_rank_gets_cube_pytorch_and_tensorflow_variables():
    env = multinode.rank_env(1, ["10.203.1.2", "10.203.2.2"], [41000, 42000])
    assert env["CUBE_RANK"] == env["RANK"] == "1"
    assert env["CUBE_WORLD_SIZE"] == env["WORLD_SIZE"] == "2"
    assert env["CUBE_MASTER_ADDR"] == env["MASTER_ADDR"] == "10.203.1.2"
    assert env["CUBE_MASTER_PORT"] == env["MASTER_PORT"] == "41000"
    assert json.loads(env["TF_CONFIG"]) == {
        "cluster": {"worker": ["10.203.1.2:41000", "10.203.2.2:42000"]},
        "task": {"type": "worker", "index": 1}}


# ---- choosing the hosts -----------------------------------------------------------------------

def report(name: str, *, free: int = 1, total: int = 1, load: float = 0.1,
           reachable: bool = True) -> HostReport:
    return HostReport(name=name, address=name, reachable=reachable, error=None if reachable
                      else "no route", slots_total=total, slots_free=free, load_per_core=load,
                      pythons=["3.11"])


def inventory(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "hosts.yaml"
    path.write_text("hosts:\n" + "".join(f"  {n}: {{hostname: {n}.example, groups: [lab]}}\n"
                                         for n in names))
    return path


def test_nodes_are_the_best_hosts_and_too_many_is_exit_2(tmp_path):
    inv = inventory(tmp_path, ["a", "b", "c"])
    reports = {"a": report("a", free=0), "b": report("b", load=0.5), "c": report("c")}

    def probe(specs, **_kw):
        return [reports[s.name] for s in specs]

    chosen = multinode.choose_hosts("@lab", [], inv, 2, Demand(1, 0, "x"), "python", "3",
                                    lambda _m: None, probe=probe)
    assert [s.name for s in chosen] == ["c", "b"]  # free and least loaded first; a is busy
    with pytest.raises(CubeError) as err:
        multinode.choose_hosts("a,b", [], inv, 3, Demand(1, 0, "x"), "python", "3",
                               lambda _m: None, probe=probe)
    assert err.value.exit_code == 2 and "--nodes 3" in str(err.value) and "selects 2" in str(err.value)
    reports["c"] = report("c", reachable=False)
    with pytest.raises(CubeError) as err:
        multinode.choose_hosts("@lab", [], inv, 3, Demand(1, 0, "x"), "python", "3",
                               lambda _m: None, probe=probe)
    assert err.value.exit_code == 2 and "c: unreachable" in str(err.value)


# ---- gang start with real agents --------------------------------------------------------------

RUN = ("import os, pathlib, sys; pathlib.Path(sys.argv[1]).write_text(os.environ['CUBE_RANK'] + "
       "' ' + os.environ['TF_CONFIG'])")


def gang_rank(root_dir: Path, lease_dir: Path, index: int, marker: Path,
              go_timeout: float = 60.0) -> multinode.Rank:
    """Rank `index` of a two-rank gang on its own 'host' (a root and a lease folder)."""
    job_id = f"gang-r{index}"
    launch(root_dir, job_id, tasks=[{"name": "run", "argv": [PY, "-c", RUN, str(marker)]}],
           slots=1, total_slots=1, lease_dir=str(lease_dir),
           gang={"rank": index, "world_size": 2, "go_timeout": go_timeout})
    rank = multinode.Rank(index, HostSpec(name=f"h{index}", hostname=f"10.0.0.{index + 1}"),
                          job_id)
    rank.target = LocalTarget(root_dir)  # type: ignore[assignment]  # agent, put and root
    return rank


def test_no_rank_starts_while_one_hosts_slot_is_held(root, tmp_path):
    held = leases.try_lock_file(str(_mkdir(tmp_path / "leases1") / "slot-0.lock"))
    try:
        ranks = [gang_rank(root / f"h{i}", tmp_path / f"leases{i}", i, tmp_path / f"ran{i}")
                 for i in (0, 1)]
        wait_for(lambda: call(root / "h0", "status", "gang-r0")["state"] == "reserved",
                 "rank 0 to reserve its slot")
        assert call(root / "h1", "status", "gang-r1")["state"] == "queued"
        with pytest.raises(CubeError, match=r"rank 1 \(h1\): queued"):
            multinode.gather(ranks, 2.0, lambda _m: None)
        multinode.cancel_all(ranks, "test", lambda _m: None)
        for i in (0, 1):
            final = wait_final(root / f"h{i}", f"gang-r{i}")
            assert final["state"] == "cancelled" and final["started_at"] is None
            assert not (tmp_path / f"ran{i}").exists()  # no rank ever ran
        assert not leases.is_held(str(tmp_path / "leases0" / "slot-0.lock"))  # given back
    finally:
        os.close(held)


def test_the_go_starts_every_rank_with_its_environment(root, tmp_path):
    ranks = [gang_rank(root / f"h{i}", tmp_path / f"leases{i}", i, tmp_path / f"ran{i}")
             for i in (0, 1)]
    states = multinode.gather(ranks, 30.0, lambda _m: None)
    assert all(s["state"] == "reserved" and s["gang"]["port"] > 0 for s in states)
    multinode.send_go(ranks, states, lambda _m: None)
    for i in (0, 1):
        assert wait_final(root / f"h{i}", f"gang-r{i}")["state"] == "succeeded"
        rank, tf_config = (tmp_path / f"ran{i}").read_text().split(" ", 1)
        assert rank == str(i)
        workers = json.loads(tf_config)["cluster"]["worker"]
        assert workers == [f"10.0.0.1:{states[0]['gang']['port']}",
                           f"10.0.0.2:{states[1]['gang']['port']}"]


def test_a_rank_without_a_go_gives_its_slot_back(root, tmp_path):
    gang_rank(root / "h0", tmp_path / "leases0", 0, tmp_path / "ran0", go_timeout=1.0)
    final = wait_final(root / "h0", "gang-r0")
    assert final["state"] == "failed" and "no go" in final["error"]
    assert not (tmp_path / "ran0").exists()
    assert not leases.is_held(str(tmp_path / "leases0" / "slot-0.lock"))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- on two lab hosts (separate network namespaces) -------------------------------------------

@pytest.fixture
def ranker(tmp_path):
    return copy_cube("ranker", tmp_path)


def rank_lines(stdout: str, index: int) -> list[str]:
    return [line[len(f"[{index}] "):] for line in stdout.splitlines()
            if line.startswith(f"[{index}] ")]


@pytest.mark.integration
def test_nodes_beyond_the_selection_exit_2_before_any_sync(lab_home, ranker):
    result = cube("remote", "run", str(ranker), "--host", "@lab", "--task", "rank",
                  "--nodes", "3")
    assert result.returncode == 2, result.stderr
    assert "--nodes 3 needs 3 hosts" in result.stderr and "selects 2" in result.stderr
    for host in lab_home.hosts:
        assert not (Path(host.root) / "cubes" / "ranker").exists()  # nothing synced
    detached = cube("remote", "run", str(ranker), "--host", "@lab", "--task", "rank",
                    "--nodes", "2", "--detach")
    assert detached.returncode == 2 and "--detach" in detached.stderr, detached.stderr


@pytest.mark.integration
def test_two_ranks_talk_across_hosts_and_their_logs_come_back_prefixed(lab_home, ranker,
                                                                      cube_home):
    assert lab_home.netns, "lab hosts must be in separate network namespaces"
    result = cube("remote", "run", str(ranker), "--host", "@lab", "--task", "rank",
                  "--nodes", "2", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2" in "".join(rank_lines(result.stdout, 0))
    assert rank_lines(result.stdout, 0)[-1] == "rank 0 done"
    assert "heard: hello from rank 1" in rank_lines(result.stdout, 0)
    assert "rank 1 of 2" in "".join(rank_lines(result.stdout, 1))
    addresses = {h.name: h.address for h in lab_home.hosts}
    report = json.loads((ranker / "workspace" / "report.json").read_text())  # rank 0's
    env = report["env"]
    assert env["CUBE_RANK"] == env["RANK"] == "0" and env["WORLD_SIZE"] == "2"
    assert env["CUBE_MASTER_ADDR"] in addresses.values()
    workers = json.loads(env["TF_CONFIG"])["cluster"]["worker"]
    assert [w.split(":")[0] for w in workers] == [env["MASTER_ADDR"]] + [
        a for a in addresses.values() if a != env["MASTER_ADDR"]]
    job = json.loads(cube("remote", "list", "--json").stdout)[0]
    assert job["state"] == "succeeded" and sorted(job["host"].split(",")) == ["lab1", "lab2"]
    logs = cube_home / "jobs" / job["id"]
    assert b"rank 1 done" in (logs / "rank-1.log").read_bytes()  # each rank's full log
    assert b"[1] rank 1 done" in (logs / "output.log").read_bytes()


@pytest.mark.integration
def test_killing_one_ranks_task_cancels_the_other_and_fails_the_job(lab_home, ranker):
    (ranker / "workspace" / "plan.txt").write_text("seconds=300\n")
    proc = _background(ranker)
    try:
        rank1 = _wait_rank_task(lab_home, 1, proc)
        os.kill(rank1["task_pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert re.search(r"rank 1 \(lab\d\) failed with exit code 137", err), err[-3000:]
    job = json.loads(cube("remote", "list", "--json").stdout)[0]
    assert job["state"] == "failed" and "rank 1" in job["reason"]
    rank0 = _rank_state(lab_home, job["id"], 0)
    assert rank0["state"] == "cancelled"


@pytest.mark.integration
def test_status_logs_and_cancel_reach_every_rank_of_a_running_job(lab_home, ranker):
    (ranker / "workspace" / "plan.txt").write_text("seconds=300\n")
    proc = _background(ranker)
    try:
        _wait_rank_task(lab_home, 0, proc)
        _wait_rank_task(lab_home, 1, proc)
        job = json.loads(cube("remote", "list", "--json").stdout)[0]["id"]
        status = cube("remote", "status", job, "--json")
        assert status.returncode == 0, status.stderr[-3000:]
        state = json.loads(status.stdout)
        assert state["state"] == "running" and state["launcher"] == "gang"
        assert [r["rank"] for r in state["ranks"]] == [0, 1]
        assert sorted(r["host"] for r in state["ranks"]) == ["lab1", "lab2"]
        assert [r["job"] for r in state["ranks"]] == [f"{job}-r0", f"{job}-r1"]
        assert all(r["state"] == "running" for r in state["ranks"])
        text = cube("remote", "status", job).stdout
        assert re.search(r"^rank 0 +lab\d +running$", text, re.M), text
        assert re.search(r"^rank 1 +lab\d +running$", text, re.M), text
        logs = cube("remote", "logs", job)
        assert logs.returncode == 0, logs.stderr[-3000:]
        assert "tick" in "".join(rank_lines(logs.stdout, 0))
        assert "tick" in "".join(rank_lines(logs.stdout, 1))
        cancelled = cube("remote", "cancel", job, "--grace", "2")
        assert cancelled.returncode == 0, cancelled.stderr[-3000:]
        assert cancelled.stdout.strip() == f"{job}: cancelled"
        for index in (0, 1):
            assert _rank_state(lab_home, job, index)["state"] == "cancelled"
        proc.communicate(timeout=120)  # the run's controller sees its ranks end
        after = json.loads(cube("remote", "status", job, "--json").stdout)
        assert [r["state"] for r in after["ranks"]] == ["cancelled", "cancelled"]
        assert after["state"] in ("cancelled", "failed")  # the controller may end it first
        full = cube("remote", "logs", job).stdout
        assert rank_lines(full, 0) and rank_lines(full, 1)
        assert all(line.startswith(("[0] ", "[1] ")) for line in full.splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_overall_state_of_a_multi_node_job_comes_from_its_ranks():
    def rows(*states, codes=(None, None)):
        return [{"rank": i, "host": f"lab{i + 1}", "state": s, "exit_code": c}
                for i, (s, c) in enumerate(zip(states, codes, strict=True))]

    assert gangjobs.overall(rows("running", "reserved"))["state"] == "running"
    assert gangjobs.overall(rows("reserved", "queued"))["state"] == "reserved"
    assert gangjobs.overall(rows("succeeded", "succeeded"))["state"] == "succeeded"
    failed = gangjobs.overall(rows("cancelled", "failed", codes=(None, 137)))
    assert failed == {"state": "failed", "exit_code": 137,
                      "reason": "rank 1 (lab2) failed with exit code 137"}
    assert gangjobs.overall(rows("cancelled", "cancelled"))["state"] == "cancelled"
    assert gangjobs.overall(rows("unknown", "succeeded"))["state"] == "unknown"


def _background(ranker: Path) -> subprocess.Popen:
    return subprocess.Popen(cube_cmd("remote", "run", str(ranker), "--host", "@lab", "--task",
                                     "rank", "--nodes", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rank_state(lab, job_id: str, index: int) -> dict:
    for host in lab.hosts:
        path = Path(host.root) / "jobs" / f"{job_id}-r{index}" / "state.json"
        if path.exists():
            return json.loads(path.read_text())
    raise AssertionError(f"no rank {index} of {job_id} on any lab host")


def _wait_rank_task(lab, index: int, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """The state of rank `index` of the newest job once its task ticks (lab hosts share files).
    A run that ends first, or never gets there, fails with its own output and every rank's
    state, so that the cause is in the report rather than behind a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for host in lab.hosts:
            for state_file in Path(host.root).glob(f"jobs/*-r{index}/state.json"):
                state = json.loads(state_file.read_text())
                log = state_file.parent / "output.log"
                if state["state"] == "running" and state.get("task_pid") and \
                        b"tick" in log.read_bytes():
                    return state
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=60)
    states = {str(p.relative_to(lab.home)): p.read_text()
              for host in lab.hosts for p in Path(host.root).glob("jobs/*/state.json")}
    raise AssertionError(f"rank {index} never started ticking; the run exited "
                         f"{proc.returncode}\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}\n"
                         f"states: {json.dumps(states, indent=1)[-6000:]}")


@pytest.mark.integration
@pytest.mark.slow
def test_mnist_on_two_nodes_ends_with_the_same_weights_on_both(lab_home, tmp_path):
    mnist = copy_cube("mnist", tmp_path)
    result = cube("remote", "run", str(mnist), "--host", "@lab", "--task", "download,train",
                  "--nodes", "2", "train_config=train-smoke.yaml", timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {}
    for index in (0, 1):
        found = [re.search(r"final weights sha256 ([0-9a-f]{64})", line)
                 for line in rank_lines(result.stdout, index)]
        digests[index] = [m.group(1) for m in found if m]
    assert len(digests[0]) == 1 and digests[0] == digests[1], digests
    metrics = json.loads((mnist / "workspace" / "model" / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["weights_sha256"] == digests[0][0]
    assert (mnist / "workspace" / "model" / "model.keras").stat().st_size > 10_000
    assert 0.3 < metrics["test_accuracy"] <= 1.0
