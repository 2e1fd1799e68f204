"""Slots, leases and the FIFO queue in the agent (agent/leases.py), with real local processes:
the agent zipapp launches jobs whose supervisors take slot locks in a shared lease folder."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from agent import leases
from tests import test_agent
from tests.test_agent import PY, call, launch, live_members, log_of, wait_final, wait_for
from tests.test_agent import root as root  # noqa: F401 (the fixture: leaves nothing running)

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia-smi"
# Runs until its gate file exists (the test opens it), or at once without one.
HOLD = ("import os, sys, time\n"
        "while len(sys.argv) > 1 and not os.path.exists(sys.argv[1]): time.sleep(0.05)")


def nap(root, job_id, lease_dir, gate=None, slots=1, total=1, **extra):
    """A job that takes `slots` of `total` and runs until `gate` exists; its state at launch."""
    tasks = [{"name": "nap", "argv": [PY, "-c", HOLD, *([str(gate)] if gate else [])]}]
    return launch(root, job_id, tasks=tasks, slots=slots, total_slots=total,
                  lease_dir=str(lease_dir), **extra)


def open_gate(gate):
    Path(gate).write_text("go")


def state_of(root, job_id):
    return call(root, "status", job_id)["state"]


def wait_state(root, job_id, wanted):
    wait_for(lambda: state_of(root, job_id) == wanted, f"{job_id} to be {wanted}")


@pytest.fixture
def lease_dir(tmp_path):
    return tmp_path / "leases"


@pytest.fixture
def gate(tmp_path):
    return tmp_path / "gate"


def test_second_job_queues_then_starts_when_the_slot_frees(root, lease_dir, gate):
    first = nap(root, "first", lease_dir, gate)
    assert first["state"] == "running" and first["lease"] == {"slots": [0], "gpus": []}
    second = nap(root, "second", lease_dir)
    assert second["state"] == "queued" and second["started_at"] is None
    view = call(root, "probe", "--lease-dir", str(lease_dir), "--slots", "1")
    assert view["slots"]["total"] == 1 and view["slots"]["free"] == 0
    assert [h["job_id"] for h in view["slots"]["holders"]] == ["first"]
    assert [(q["job_id"], q["slots"]) for q in view["slots"]["queued"]] == [("second", 1)]
    assert {j["job_id"]: j["state"] for j in view["jobs"]} == {"first": "running",
                                                                "second": "queued"}
    assert all(j["owner"] for j in view["jobs"])
    open_gate(gate)
    a, b = wait_final(root, "first"), wait_final(root, "second")
    assert a["state"] == b["state"] == "succeeded"
    assert a["ended_at"] < b["started_at"]  # never both at once
    assert os.stat(lease_dir).st_mode & 0o7777 == 0o1777  # every user's agent may use it
    assert os.listdir(lease_dir / "queue") == [] and os.listdir(lease_dir / "held") == []


def test_fifo_a_big_job_at_the_head_is_not_passed(root, lease_dir, gate):
    nap(root, "one", lease_dir, gate, total=2)
    assert nap(root, "two", lease_dir, slots=2, total=2)["state"] == "queued"
    # One slot is free, but the older two-slot job waits for both: the small one waits behind.
    assert nap(root, "small", lease_dir, total=2)["state"] == "queued"
    time.sleep(0.5)
    assert state_of(root, "small") == "queued"
    open_gate(gate)
    states = [wait_final(root, j) for j in ("one", "two", "small")]
    assert all(s["state"] == "succeeded" for s in states)
    assert states[0]["ended_at"] < states[1]["started_at"]
    assert states[1]["started_at"] <= states[2]["started_at"]
    assert states[1]["lease"]["slots"] == [0, 1]


def test_sigkilled_holder_frees_its_slot_for_the_next(root, lease_dir):
    holder = nap(root, "holder", lease_dir, "/nonexistent")
    assert nap(root, "next", lease_dir)["state"] == "queued"
    time.sleep(0.5)
    assert state_of(root, "next") == "queued"
    os.kill(holder["pid"], signal.SIGKILL)  # the supervisor: its locks die with it
    assert wait_final(root, "next")["state"] == "succeeded"
    assert state_of(root, "holder") == "lost"
    for pid in live_members(holder["task_pgid"]):
        os.kill(pid, signal.SIGKILL)


def test_a_killed_waiter_leaves_no_place_in_the_queue(root, lease_dir, gate):
    nap(root, "holder", lease_dir, gate)
    waiter = nap(root, "waiter", lease_dir, "/nonexistent")
    later = nap(root, "later", lease_dir)
    assert waiter["state"] == later["state"] == "queued"
    os.kill(waiter["pid"], signal.SIGKILL)  # its entry stays on disk, unlocked: stale
    open_gate(gate)
    assert wait_final(root, "later")["state"] == "succeeded"
    assert state_of(root, "waiter") == "lost"


def test_a_cancelled_queued_job_never_starts(root, lease_dir, gate):
    nap(root, "holder", lease_dir, gate)
    queued = launch(root, "never", tasks=[{"name": "t", "argv": [PY, "-c", "print('ran')"]}],
                    slots=1, total_slots=1, lease_dir=str(lease_dir))
    assert queued["state"] == "queued"
    cancelled = call(root, "cancel", "never", "--grace", "2")
    assert cancelled["state"] == "cancelled" and cancelled["started_at"] is None
    assert os.listdir(lease_dir / "queue") == []
    open_gate(gate)
    wait_final(root, "holder")
    time.sleep(0.5)
    assert state_of(root, "never") == "cancelled" and log_of(root, "never") == b""


def test_no_queue_is_refused_when_busy(root, lease_dir):
    nap(root, "holder", lease_dir, "/nonexistent")
    refused = nap(root, "eager", lease_dir, no_queue=True)
    assert refused["state"] == "failed" and refused["refused"] is True
    assert "--no-queue" in refused["error"]
    assert nap(root, "patient", lease_dir)["state"] == "queued"
    call(root, "cancel", "holder", "--grace", "1")
    assert wait_final(root, "patient")["state"] == "succeeded"


@pytest.fixture
def eight_gpus(tmp_path, monkeypatch):
    """An nvidia-smi on PATH for 8 H100s, GPU 3 busy with a process cube did not start."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
case "$1" in
  --query-gpu=*) cat {FIXTURES / 'h100x8-query-gpu.txt'} ;;
  --query-compute-apps=*) cat {FIXTURES / 'h100x8-query-compute-apps.txt'} ;;
  *) exit 2 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_granted_gpus_are_the_ones_the_task_sees(root, lease_dir, eight_gpus):
    show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['CUBE_GPU_DEVICES'])"
    gpus = list(range(8))
    first = launch(root, "four", tasks=[{"name": "t", "argv": [PY, "-c", show]}], slots=4,
                   total_slots=8, slot_gpus=gpus, lease_dir=str(lease_dir))
    assert first["lease"]["gpus"] == [0, 1, 2, 4]  # GPU 3 runs someone else's process
    wait_final(root, "four")
    assert log_of(root, "four") == b"0,1,2,4 0,1,2,4\n"
    view = call(root, "probe", "--lease-dir", str(lease_dir))
    assert (view["slots"]["total"], view["slots"]["free"]) == (8, 7)  # GPU 3 is taken
    # Eight can never be granted while GPU 3 is busy: the job waits.
    assert nap(root, "eight", lease_dir, slots=8, total=8, slot_gpus=gpus)["state"] == "queued"
    call(root, "cancel", "eight", "--grace", "1")


def test_container_gpu_flags_name_the_granted_gpus():
    docker = ["/bin/sh", "-c", "exec \"$@\"", "sh", "docker", "run", "--gpus", '"device=0,1"',
              "img", "task"]
    assert leases.container_gpu_argv(docker, [2, 5])[7] == '"device=2,5"'
    podman = ["podman", "run", "--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=1",
              "--device", "/dev/fuse", "img"]
    assert leases.container_gpu_argv(podman, [4, 6]) == [
        "podman", "run", "--device", "nvidia.com/gpu=4", "--device", "nvidia.com/gpu=6",
        "--device", "/dev/fuse", "img"]
    assert leases.container_gpu_argv(["python", "x.py"], [1]) == ["python", "x.py"]


@pytest.mark.parametrize("extra, words", [
    ({"slots": 3, "total_slots": 2}, "needs 3 slots but this host has 2"),
    ({"slots": 0}, "slots must be a whole number"),
    ({"slots": 1, "total_slots": 2, "slot_gpus": [0]}, "one GPU index per slot"),
])
def test_bad_lease_fields_are_refused(root, lease_dir, extra, words):
    spec = {"job_id": "bad", "argv": [PY, "-c", "pass"], "lease_dir": str(lease_dir), **extra}
    answer = json.loads(test_agent.agent(root, "launch", stdin=json.dumps(spec).encode(),
                                         check=False).stdout)
    assert answer["ok"] is False and words in answer["error"], answer
    assert not (Path(root) / "jobs" / "bad").exists()


def test_specs_without_a_demand_run_at_once_as_before(root, lease_dir):
    nap(root, "holder", lease_dir, "/nonexistent")
    free = launch(root, "free", tasks=[{"name": "t", "argv": [PY, "-c", "print(1)"]}])
    assert free["state"] == "running" and free.get("lease") is None
    call(root, "cancel", "holder", "--grace", "1")
