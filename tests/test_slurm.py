"""Jobs handed to a real Slurm (tests/fixtures/slurm.py: lab1 is a one-node, one-CPU cluster).

Never skipped under CI=true. Slurm's shortest time limit is one minute, so the TIMEOUT test
takes about that long; the rest take seconds each.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from controller import lab_slurm, remote, sweeps
from controller.errors import ConfigError, CubeError
from controller.hosts import load_inventory
from controller.jobs import Ledger
from controller.sinks import Sinks
from tests.conftest import REPO
from tests.test_remote import cube as cube_cli

HELLO = REPO / "cubes" / "hello"
SLEEPER = REPO / "tests" / "cubes" / "sleeper"
CHECKPOINTER = REPO / "tests" / "cubes" / "checkpointer"
TUNER = REPO / "tests" / "cubes" / "tuner"


class Events:
    """Sinks that keep messages and log bytes in one ordered list."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def sinks(self) -> Sinks:
        return Sinks(log=lambda m: self.items.append(("log", m)),
                     output=lambda b: self.items.append(("out", b.decode(errors="replace"))),
                     job_started=lambda _id: None)

    def index(self, kind: str, text: str) -> int:
        return next(i for i, (k, v) in enumerate(self.items) if k == kind and text in v)

    def text(self, kind: str) -> str:
        return "".join(v + ("\n" if kind == "log" else "") for k, v in self.items if k == kind)


def copy_cube(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def start(cube: Path, task: str, host: str = "lab1", **options) -> str:
    req = remote.RunRequest(cube_path=cube, host=host, tasks=task, detach=True, **options)
    return remote.run(req, Events().sinks()).job_id


def wait_for(what, predicate, timeout: float = 60.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def state_is(job: str, *states: str):
    return lambda: (lambda s: s if s.get("state") in states else None)(remote.status(job))


def host_log(slurm_lab, job: str) -> str:
    return (slurm_lab.host("lab1").dir / "root" / "jobs" / job / "output.log").read_text()


def scontrol(slurm_lab, *args: str) -> str:
    host = slurm_lab.host("lab1")
    proc = lab_slurm.scontrol(host.dir, host.netns, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def set_host(cube_home: Path, name: str, **keys) -> None:
    """Edit one inventory entry of the test's CUBE_HOME (None removes a key)."""
    path = cube_home / "hosts.yaml"
    data = yaml.safe_load(path.read_text())
    entry = data["hosts"][name]
    for key, value in keys.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    path.write_text(yaml.safe_dump(data))


def test_hello_runs_through_sbatch_queued_then_running_then_succeeded(slurm_home, tmp_path):
    blocker = start(copy_cube(SLEEPER, tmp_path), "wait")
    wait_for("the blocker to run", state_is(blocker, "running"))
    hello = copy_cube(HELLO, tmp_path)
    events, result = Events(), {}
    req = remote.RunRequest(cube_path=hello, host="lab1", tasks="greet,summarize")
    follower = threading.Thread(target=lambda: result.update(r=remote.run(req, events.sinks())))
    follower.start()
    try:
        job = wait_for("hello's job id", lambda: next(
            (j.id for j in Ledger().list() if j.cube == "hello"), None))
        # A fresh job's reason is None until the scheduler has looked at it.
        queued = wait_for("hello to queue behind the blocker", lambda: (
            lambda s: s if s.get("state") == "queued" and s.get("reason") else None)(
                remote.status(job)))
        assert queued["slurm_state"] == "PENDING" and queued["reason"] in ("Resources", "Priority")
    finally:
        # Cancel of a running job: Slurm's scancel, recorded as cancelled.
        cancelled = remote.cancel(blocker, 5, lambda m: None)
        follower.join(120)
    assert cancelled["state"] == "cancelled"
    assert result["r"].state == "succeeded" and result["r"].exit_code == 0
    pending = events.index("log", "PENDING")
    running = events.index("log", ": RUNNING")
    completed = events.index("log", ": COMPLETED")
    assert pending < running < completed
    assert events.index("out", "Hello, Ada!") < completed   # the log came while it ran
    assert "3 greetings" in events.text("out")
    assert (hello / "workspace" / "report" / "summary.txt").read_text().startswith("3 greetings")
    with Ledger() as ledger:
        recorded = ledger.get(job)
        assert recorded.launcher == "slurm" and recorded.slurm_job_id == queued["slurm_job_id"]
        assert ledger.get(blocker).state == "cancelled"
    assert remote.status(blocker)["slurm_state"] == "CANCELLED"


def test_cancel_of_a_pending_job_removes_it_from_the_queue(slurm_home, tmp_path):
    sleeper = copy_cube(SLEEPER, tmp_path)
    blocker = start(sleeper, "wait")
    try:
        waiting = start(sleeper, "wait")
        wait_for("the second job to queue", state_is(waiting, "queued"))
        state = remote.cancel(waiting, 5, lambda m: None)
        assert state["state"] == "cancelled" and state["slurm_state"] == "CANCELLED"
        assert "tick" not in host_log(slurm_home, waiting)   # it never ran
        assert remote.status(blocker)["state"] == "running"
    finally:
        remote.cancel(blocker, 5, lambda m: None)


def test_a_job_killed_at_its_time_limit_fails_naming_timeout(slurm_home, tmp_path):
    job = start(copy_cube(SLEEPER, tmp_path), "wait", time="1")
    state = wait_for("the time limit", state_is(job, "failed", "succeeded", "cancelled"),
                     timeout=150, every=2)
    assert state["state"] == "failed" and state["slurm_state"] == "TIMEOUT"
    assert "TIMEOUT" in state["error"]
    with Ledger() as ledger:
        assert "TIMEOUT" in (ledger.get(job).reason or "")
    assert "tick 1" in host_log(slurm_home, job)


def test_a_requeued_job_resumes_from_its_checkpoint(slurm_home, tmp_path):
    cube = copy_cube(CHECKPOINTER, tmp_path)
    job = start(cube, "count")
    slurm_id = wait_for("step 3", lambda: "step 3" in host_log(slurm_home, job)
                        and remote.status(job)["slurm_job_id"])
    scontrol(slurm_home, "requeue", slurm_id)
    # A requeued job waits (BeginTime) about two minutes before it may start again.
    wait_for("the requeue", lambda: "JobState=PENDING" in scontrol(slurm_home, "show", "job",
                                                                    slurm_id))
    scontrol(slurm_home, "update", f"jobid={slurm_id}", "StartTime=now")
    result = remote.attach(job, Events().sinks())
    assert result.state == "succeeded"
    status = remote.status(job)
    assert status["requeues"] == 1
    log = host_log(slurm_home, job)
    first, marker, second = log.partition("==== cube: Slurm requeued job")
    assert marker and "step 3" in first and "(restart 1)" in second
    resumed = int(second.split("resumed from step ")[1].split()[0])
    assert resumed >= 3 and f"step {resumed + 1}" in second
    assert (cube / "workspace" / "result.txt").read_text() == f"steps=8 resumed_from={resumed}\n"


def test_a_sweep_of_3_variants_runs_as_one_job_array_throttled_by_max_parallel(slurm_home,
                                                                              tmp_path):
    tuner = copy_cube(TUNER, tmp_path)
    events = Events()
    req = sweeps.SweepRequest(cube_path=tuner, host="lab1", tasks="tune",
                              vary=["config:steps=1,2,3"], max_parallel=1)
    spec = sweeps.start(req, events.sinks())
    assert sweeps.follow(spec["id"], events.sinks(), poll_s=1.0) == 0, events.text("log")
    with Ledger() as ledger:
        jobs = ledger.sweep_jobs(spec["id"])
    names = [v["name"] for v in spec["variants"]]
    assert sorted(str(j.variant) for j in jobs) == names
    assert all(j.state == "succeeded" and j.launcher == "slurm" for j in jobs)
    # ONE array: each variant's own cube job is the array's task <array>_<i>.
    array_ids = {str(j.slurm_job_id).split("_")[0] for j in jobs}
    assert len(array_ids) == 1, [j.slurm_job_id for j in jobs]
    array = array_ids.pop()
    assert sorted(j.slurm_job_id for j in jobs) == [f"{array}_{i}" for i in range(3)]
    assert f"as job array {array} (0-2%1)" in events.text("log")
    status = json.loads(cube_cli("sweep", "status", spec["id"], "--json").stdout)
    assert {r["slurm_job"] for r in status["variants_detail"]} == {j.slurm_job_id for j in jobs}
    root = slurm_home.host("lab1").dir / "root" / "jobs"
    spans = []
    for job in jobs:
        marker = json.loads((root / job.id / "slurm.json").read_text())
        assert "--array=0-2%1" in marker["sbatch"] and marker["array_job_id"] == array
        state = remote.status(job.id)   # the agent's verdict, from Slurm's record of the task
        assert state["slurm_array_job_id"] == array
        assert state["slurm_job_id"] == f"{array}_{state['slurm_array_task_id']}"
        task = scontrol(slurm_home, "show", "job", "-o", job.slurm_job_id)
        assert f"ArrayJobId={array}" in task and f"ArrayTaskId={marker['array_task_id']}" in task
        spans.append((state["started_at"], state["ended_at"]))
        assert "tuning with" in host_log(slurm_home, job.id)
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # %1
    for i, name in enumerate(names, 1):   # each variant's outputs came back to its own folder
        metrics = json.loads((tuner / "workspace" / "sweeps" / spec["id"] / name / "result" /
                              "metrics.json").read_text())
        assert metrics["score"] == float(i)


# ---- bad input ----------------------------------------------------------------------------------

def test_a_plain_host_marked_slurm_is_a_config_error_naming_scheduler(slurm_home, tmp_path,
                                                                      cube_home):
    set_host(cube_home, "lab2", scheduler="slurm")
    with pytest.raises(ConfigError) as err:
        start(copy_cube(HELLO, tmp_path), "greet", host="lab2")
    assert "hosts.lab2.scheduler" in str(err.value) and err.value.exit_code == 2
    assert "sinfo" in str(err.value) or "sbatch" in str(err.value)


def test_an_unknown_partition_shows_sbatchs_error_and_names_the_field(slurm_home, tmp_path,
                                                                      cube_home):
    set_host(cube_home, "lab1", partition="nosuch")
    hello = copy_cube(HELLO, tmp_path)
    with pytest.raises(ConfigError) as err:
        start(hello, "greet")
    message = str(err.value)
    assert "hosts.lab1.partition" in message and "invalid partition" in message.lower()
    with pytest.raises(ConfigError) as err:   # the per-run override names the option
        start(hello, "greet", partition="other")
    assert "--partition" in str(err.value)


def test_a_missing_shared_root_is_an_error_and_is_not_created(slurm_home, tmp_path, cube_home):
    missing = tmp_path / "no" / "such" / "root"
    set_host(cube_home, "lab1", shared_root=str(missing))
    with pytest.raises(ConfigError) as err:
        start(copy_cube(HELLO, tmp_path), "greet")
    assert "hosts.lab1.shared_root" in str(err.value) and not missing.exists()


def test_inventory_slurm_keys_are_checked_when_loaded(tmp_path):
    inventory = tmp_path / "hosts.yaml"
    cases = [({"scheduler": "pbs"}, "hosts.c.scheduler"),
             ({"scheduler": "slurm", "time": "soon"}, "hosts.c.time"),
             ({"scheduler": "slurm", "cpus_per_task": 0}, "hosts.c.cpus_per_task"),
             ({"scheduler": "slurm", "sbatch_args": "--qos=x"}, "hosts.c.sbatch_args"),
             ({"partition": "gpu"}, "hosts.c.partition")]
    for entry, field in cases:
        inventory.write_text(yaml.safe_dump({"hosts": {"c": entry}}))
        with pytest.raises(ConfigError) as err:
            load_inventory(inventory)
        assert field in str(err.value) and str(inventory) in str(err.value)
    inventory.write_text(yaml.safe_dump({"hosts": {"c": {
        "scheduler": "slurm", "partition": "gpu", "time": 90, "mem": "16G", "cpus_per_task": 4,
        "sbatch_args": ["--qos=low"], "shared_root": "/shared/cube"}}}))
    spec = load_inventory(inventory)["c"]
    assert spec.root == "/shared/cube" and spec.slurm is not None
    spec.slurm.gpus = 2
    assert spec.slurm.sbatch() == ["--partition=gpu", "--time=90", "--mem=16G",
                                   "--cpus-per-task=4", "--gres=gpu:2", "--qos=low"]


def test_partition_and_time_need_a_slurm_host(slurm_home, tmp_path):
    with pytest.raises(CubeError, match="only to Slurm hosts"):
        start(copy_cube(HELLO, tmp_path), "greet", host="lab2", time="5")
