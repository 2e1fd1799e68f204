"""Slots, the queue and placement end to end on lab hosts: jobs submitted with `--host @lab
--detach` spread over the hosts, queue where every slot is taken and start by themselves with
no controller running; two accounts share one host's slot; cancelled and killed jobs.

Jobs run the napper test cube, which waits for a gate file (lab hosts share this machine's
files) so the test decides when they end, then records its own start and end."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from controller import lab as labmod
from controller.hosts import update_inventory
from tests.conftest import require
from tests.fixtures.lab import sshd_available
from tests.test_remote import copy_cube, cube

pytestmark = pytest.mark.integration
WAIT_S = 180.0


@pytest.fixture
def gate():
    """A gate file path every account can read (test temp folders are root's, 0700)."""
    folder = Path("/var/tmp") / f"cube-gate-{secrets.token_hex(4)}"
    folder.mkdir(mode=0o755)
    yield folder / "open"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def napper(tmp_path, gate):
    path = copy_cube("napper", tmp_path)
    (path / "workspace" / "plan.txt").write_text(f"gate={gate}\nseconds=0.5\n")
    return path


@pytest.fixture
def three_hosts(cube_home):
    """lab1..lab3 with one slot each, in the test's own CUBE_HOME, always torn down."""
    require(sshd_available(), "OpenSSH server (/usr/sbin/sshd) is not installed")
    hosts = labmod.lab_up(3, slots=1)
    try:
        yield {h.name: h for h in hosts}
    finally:
        labmod.lab_down()


def submit(napper, host, *extra) -> str:
    started = cube("remote", "run", str(napper), "--host", host, "--task", "nap", "--detach",
                   *extra)
    assert started.returncode == 0, started.stderr
    return started.stdout.strip()


def state(root: str, job_id: str) -> dict:
    """A job's state.json read straight from the host's root: no controller involved."""
    return json.loads((Path(root) / "jobs" / job_id / "state.json").read_text())


def wait_states(where: dict[str, str], wanted: set[str]) -> dict[str, dict]:
    """{job id: state} once every job (id -> host root) is in one of `wanted`."""
    deadline = time.monotonic() + WAIT_S
    while True:
        states = {j: state(root, j) for j, root in where.items()}
        if all(s["state"] in wanted for s in states.values()):
            return states
        assert time.monotonic() < deadline, {j: s["state"] for j, s in states.items()}
        time.sleep(0.2)


def ledger_hosts() -> dict[str, str]:
    listed = cube("remote", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {j["id"]: j["host"] for j in json.loads(listed.stdout)}


def hosts_json(selector: str) -> dict[str, dict]:
    out = cube("hosts", selector, "--json")
    assert out.returncode == 0, out.stderr
    return {r["name"]: r for r in json.loads(out.stdout)["hosts"]}


def test_five_jobs_on_three_one_slot_hosts_queue_and_start_without_a_controller(
        three_hosts, napper, gate):
    ids = [submit(napper, "@lab") for _ in range(5)]
    hosts = ledger_hosts()  # the ledger records the chosen host
    assert sorted(hosts[j] for j in ids[:3]) == ["lab1", "lab2", "lab3"]  # free ones first
    assert hosts[ids[3]] != hosts[ids[4]]  # then the shortest queue
    where = {j: three_hosts[hosts[j]].root for j in ids}
    first = wait_states(where, {"running", "queued"})
    assert sorted(s["state"] for s in first.values()) == ["queued"] * 2 + ["running"] * 3

    rows = hosts_json("@lab")
    assert sum(len(r["queued"]) for r in rows.values()) == 2
    assert all(r["slots_source"] == "agent" and r["slots_free"] == 0 for r in rows.values())
    status = cube("remote", "status", ids[3], "--json")
    assert json.loads(status.stdout)["state"] == "queued"

    # Bad input while every slot is taken: too big for any host, and --no-queue.
    too_big = cube("remote", "run", str(napper), "--host", "@lab", "--task", "nap", "--slots", "2")
    assert too_big.returncode == 2 and "largest is lab1 with 1" in too_big.stderr, too_big.stderr
    eager = cube("remote", "run", str(napper), "--host", "@lab", "--task", "nap", "--no-queue")
    assert eager.returncode == 2 and "busy" in eager.stderr, eager.stderr
    eager_one = cube("remote", "run", str(napper), "--host", "lab1", "--task", "nap",
                     "--no-queue")
    assert eager_one.returncode == 2 and "--no-queue" in eager_one.stderr, eager_one.stderr

    gate.write_text("open")  # no controller runs from here on: the agents start the queued jobs
    final = wait_states(where, {"succeeded", "failed", "cancelled", "lost"})
    assert all(s["state"] == "succeeded" for s in final.values()), final
    for name in ("lab1", "lab2", "lab3"):
        spans = sorted((s["started_at"], s["ended_at"]) for j, s in final.items()
                       if hosts[j] == name)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end < start, (name, spans)  # never two at once on a one-slot host


def test_placement_skips_an_unreachable_host(three_hosts, napper, gate):
    os.kill(three_hosts["lab1"].pid, signal.SIGKILL)  # sshd gone: connections are refused
    deadline = time.monotonic() + 10
    while labmod._reachable(three_hosts["lab1"].address, three_hosts["lab1"].port):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = cube("remote", "run", str(napper), "--host", "@lab", "--task", "nap", "--detach")
    assert started.returncode == 0, started.stderr
    assert "skipping lab1: unreachable" in started.stderr
    assert "placement: chose lab2" in started.stderr or "placement: chose lab3" in started.stderr
    gate.write_text("open")


def test_cancelled_queued_job_never_starts_and_a_killed_holder_frees_the_slot(
        lab, lab_home, napper, gate):
    root = lab.host("lab2").root
    holder = submit(napper, "lab2")
    queued = submit(napper, "lab2")
    later = submit(napper, "lab2")
    assert wait_states({queued: root, later: root}, {"queued"})
    cancelled = cube("remote", "cancel", queued, "--grace", "2")
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr
    assert state(root, later)["state"] == "queued"
    held = state(root, holder)
    os.kill(held["pid"], signal.SIGKILL)  # the holder's supervisor: its lease dies with it
    started = wait_states({later: root}, {"running", "succeeded"})
    assert started[later]["started_at"] is not None
    gate.write_text("open")
    final = wait_states({queued: root, later: root}, {"succeeded", "failed", "cancelled"})
    assert final[later]["state"] == "succeeded"
    lost = cube("remote", "status", holder, "--json")  # the agent judges a vanished supervisor
    assert json.loads(lost.stdout)["state"] == "lost", lost.stderr
    assert final[queued]["state"] == "cancelled" and final[queued]["started_at"] is None
    assert not (Path(root) / "jobs" / queued / "workspace" / "times.json").exists()
    assert (Path(root) / "jobs" / queued / "output.log").read_bytes() == b""
    for pid in _task_pids(held):
        os.kill(pid, signal.SIGKILL)


def _task_pids(state: dict) -> list[int]:
    pgid = state.get("task_pgid")
    if not pgid:
        return []
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


# ---- two accounts on one host ----------------------------------------------------------------

@pytest.fixture
def second_account(lab_home, cube_home):
    """`lab1-other`: lab1's sshd logged into as a second account (the podman fixtures' user
    `cube-rootless`, created here when missing) with a cube root in its home and lab1's lease
    folder: two people, two cube roots, one host."""
    from tests.fixtures.podman import ROOTLESS_USER  # noqa: PLC0415 (its fixtures need docker)

    require(os.geteuid() == 0, "a second account needs root")
    if subprocess.run(["id", ROOTLESS_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", ROOTLESS_USER],
                       check=True)
    home = Path(os.path.expanduser(f"~{ROOTLESS_USER}"))
    inventory = yaml.safe_load((cube_home / "hosts.yaml").read_text())
    lab1 = inventory["hosts"]["lab1"]
    identity = lab1["identity_file"]
    identity = identity[0] if isinstance(identity, list) else identity
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    line = Path(f"{identity}.pub").read_text().strip()
    if line not in (keys.read_text() if keys.exists() else ""):
        with keys.open("a") as f:
            f.write(line + "\n")
    root = home / f"q-{secrets.token_hex(4)}"
    root.mkdir()
    subprocess.run(["chown", "-R", f"{ROOTLESS_USER}:", str(ssh_dir), str(root)], check=True)
    update_inventory({"lab1-other": {**lab1, "user": ROOTLESS_USER, "root": str(root),
                                     "labels": ["other"], "groups": []}},
                     path=cube_home / "hosts.yaml")
    yield "lab1-other", str(root)
    shutil.rmtree(root, ignore_errors=True)


def test_two_accounts_share_one_hosts_slot(lab, second_account, napper, gate):
    other, other_root = second_account
    os.chmod(napper.parent, 0o755)
    mine = submit(napper, "lab1")
    theirs = submit(napper, other)
    assert wait_states({theirs: other_root}, {"queued"})
    row = hosts_json("lab1")["lab1"]
    assert [(j["job_id"], j["owner"]) for j in row["running"]] == [(mine, "root")]
    assert [(j["job_id"], j["owner"]) for j in row["queued"]] == [(theirs, "cube-rootless")]
    assert row["slots_free"] == 0
    gate.write_text("open")
    a = wait_states({mine: lab.host("lab1").root}, {"succeeded"})[mine]
    b = wait_states({theirs: other_root}, {"succeeded"})[theirs]
    assert a["ended_at"] < b["started_at"]
