"""`cube remote ...` end to end against the lab's real sshd hosts, including the faults a
nightly run must survive: cut sessions, a cut link, a killed controller, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, require

pytestmark = pytest.mark.integration

SLOW_LINES = [f"line {i}" for i in range(40)]


def cube_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli", *args]


def cube(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cube_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


class Background:
    """A `cube` process whose stdout lines are collected as they arrive."""

    def __init__(self, *args: str, env: dict | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cube_cmd(*args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.lines:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"never saw {text!r}; got {self.lines[-5:]}; "
                                     "stderr: " + (self.proc.stderr.read()
                                                   if self.proc.poll() is not None else ""))
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code, self.proc.stderr.read()


def copy_cube(name: str, dest: Path) -> Path:
    src = REPO / "cubes" / name if (REPO / "cubes" / name).exists() else REPO / "tests" / "cubes" / name
    target = dest / name
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture
def hello(tmp_path):
    return copy_cube("hello", tmp_path)


@pytest.fixture
def faulty(tmp_path):
    return copy_cube("faulty", tmp_path)


@pytest.fixture
def quick_follow(monkeypatch):
    """Short follow windows so a dead link is noticed in seconds, not half a minute."""
    monkeypatch.setenv("CUBE_FOLLOW_WINDOW", "2")


def ledger_jobs() -> list[dict]:
    result = cube("remote", "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_remote_run_brings_outputs_back(lab_home, hello):
    result = cube("remote", "run", str(hello), "--host", "lab1", "--task", "greet,summarize")
    assert result.returncode == 0, result.stderr
    summary = hello / "workspace" / "report" / "summary.txt"
    names = yaml.safe_load((hello / "workspace" / "names.yaml").read_text())
    assert summary.exists(), result.stderr
    greetings = sorted(p.name for p in (hello / "workspace" / "greetings").iterdir())
    assert len(greetings) == len(names["names"] if isinstance(names, dict) else names)
    [job] = ledger_jobs()
    assert job["state"] == "succeeded" and job["exit_code"] == 0
    assert job["host"] == "lab1" and job["tasks"] == ["greet", "summarize"]


def test_warm_second_run_skips_provisioning_and_sends_no_code(lab_home, hello):
    first = cube("remote", "run", str(hello), "--host", "lab1", "--task", "greet")
    assert first.returncode == 0, first.stderr
    second = cube("remote", "run", str(hello), "--host", "lab1", "--task", "greet")
    assert second.returncode == 0, second.stderr
    assert "sync code: 0 files" in second.stderr, second.stderr
    # the env's marker is read in one command; no playbook step runs (same message as locally)
    assert "reusing env " in second.stderr and "building env" not in second.stderr, second.stderr
    assert "cube: python: " not in second.stderr, second.stderr  # playbook step lines


def test_failed_task_returns_its_exit_code_and_its_logs_come_back(lab_home, faulty):
    result = cube("remote", "run", str(faulty), "--host", "lab1", "--task", "fail")
    assert result.returncode == 7, result.stderr
    assert "about to fail" in result.stdout
    assert (faulty / "workspace" / "logs" / "fail.log").read_text() == "started fail\n"
    assert ledger_jobs()[0]["state"] == "failed"


def test_unknown_parameter_is_an_error_before_connecting(lab_home, hello):
    result = cube("remote", "run", str(hello), "--host", "lab1", "--task", "greet", "nmes=x")
    assert result.returncode == 2
    assert "nmes" in result.stderr and "names" in result.stderr


def test_unreachable_host_exits_3_with_a_clear_error(lab_home, tmp_path, hello):
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(yaml.safe_dump(
        {"hosts": {"dead": {"hostname": "127.0.0.1", "port": 1, "user": "root"}}}))
    start = time.monotonic()
    result = cube("remote", "run", str(hello), "--host", "dead", "--task", "greet",
                  "--inventory", str(inventory), timeout=120)
    assert result.returncode == 3, result.stderr
    assert "dead" in result.stderr and "127.0.0.1" in result.stderr
    assert time.monotonic() - start < 90  # bounded by the connect budget, not a TCP timeout


def test_killed_ssh_sessions_do_not_lose_or_double_a_log_line(lab, lab_home, faulty,
                                                                  quick_follow):
    run = Background("remote", "run", str(faulty), "--host", "lab1", "--task", "slow")
    run.wait_for_line("line 8")
    assert lab.kill_ssh_sessions("lab1") >= 1
    code, stderr = run.finish()
    assert code == 0, stderr
    assert "reconnect" in stderr
    assert [line for line in run.lines if line.startswith("line ")] == SLOW_LINES
    assert (faulty / "workspace" / "out" / "result.txt").read_text() == "done 40 lines\n"


def test_cut_link_mid_run_is_survived(lab, lab_home, faulty, quick_follow):
    require(lab.netns, "cutting a link needs the lab in network namespaces (root)")
    run = Background("remote", "run", str(faulty), "--host", "lab1", "--task", "slow")
    run.wait_for_line("line 5")
    lab.cut_link("lab1")
    try:
        time.sleep(4)
    finally:
        lab.restore_link("lab1")
    code, stderr = run.finish()
    assert code == 0, stderr
    assert [line for line in run.lines if line.startswith("line ")] == SLOW_LINES
    assert (faulty / "workspace" / "out" / "result.txt").exists()


def test_killed_controller_then_attach_finishes_the_pull(lab_home, faulty):
    run = Background("remote", "run", str(faulty), "--host", "lab1", "--task", "slow")
    run.wait_for_line("line 3")
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    [job] = ledger_jobs()
    assert not (faulty / "workspace" / "out" / "result.txt").exists()
    attached = cube("remote", "attach", job["id"])
    assert attached.returncode == 0, attached.stderr
    assert (faulty / "workspace" / "out" / "result.txt").read_text() == "done 40 lines\n"
    log_lines = Path(job["log_path"]).read_text().splitlines()
    assert [line for line in log_lines if line.startswith("line ")] == SLOW_LINES


def test_ctrl_c_detaches_and_the_task_keeps_running(lab_home, faulty):
    run = Background("remote", "run", str(faulty), "--host", "lab1", "--task", "slow")
    run.wait_for_line("line 2")
    run.proc.send_signal(signal.SIGINT)
    code, stderr = run.finish()
    assert code == 130
    assert "cube remote attach" in stderr
    [job] = ledger_jobs()
    assert cube("remote", "attach", job["id"]).returncode == 0
    assert (faulty / "workspace" / "out" / "result.txt").exists()


def test_named_run_attaches_to_the_running_job_instead_of_starting_another(lab_home, faulty):
    first = cube("remote", "run", str(faulty), "--host", "lab1", "--task", "slow",
                 "--name", "nightly", "--detach")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip()
    second = cube("remote", "run", str(faulty), "--host", "lab1", "--task", "slow",
                  "--name", "nightly")
    assert second.returncode == 0, second.stderr
    assert f"already running on lab1 as {job_id}" in second.stderr
    assert [j["id"] for j in ledger_jobs()] == [job_id]
    third = cube("remote", "run", str(faulty), "--host", "lab1", "--task", "fail",
                 "--name", "nightly")
    assert third.returncode == 7  # the named job had finished: a new one started
    assert len(ledger_jobs()) == 2


def test_cancel_stops_the_job(lab_home, faulty):
    started = cube("remote", "run", str(faulty), "--host", "lab1", "--task", "slow", "--detach")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    cancelled = cube("remote", "cancel", job_id, "--grace", "2")
    assert cancelled.returncode == 0, cancelled.stderr
    status = cube("remote", "status", job_id, "--json")
    assert json.loads(status.stdout)["state"] == "cancelled"


def test_two_jobs_on_one_host_keep_separate_outputs(lab, lab_home, faulty):
    ids = []
    for _ in range(2):
        started = cube("remote", "run", str(faulty), "--host", "lab1", "--task", "slow",
                       "--detach")
        assert started.returncode == 0, started.stderr
        ids.append(started.stdout.strip())
    for job_id in ids:
        assert cube("remote", "attach", job_id).returncode == 0
    root = Path(lab.host("lab1").root)
    for job_id in ids:
        assert (root / "jobs" / job_id / "workspace" / "out" / "result.txt").exists()


def test_full_disk_during_sync_is_a_clear_error_and_keeps_the_old_files(lab, lab_home, faulty,
                                                                           tmp_path):
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    small_root = tmp_path / "small-root"
    small_root.mkdir()
    # Mount where the host's sshd sees it: a lab host in a network namespace has its own mounts.
    in_host = ["nsenter", f"--mount=/proc/{lab.host('lab1').pid}/ns/mnt", "--"]
    subprocess.run([*in_host, "mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs",
                    str(small_root)], check=True)
    try:
        inventory = yaml.safe_load(lab.inventory.read_text())
        entry = dict(inventory["hosts"]["lab1"], root=str(small_root))
        small_inv = tmp_path / "small.yaml"
        small_inv.write_text(yaml.safe_dump({"hosts": {"small": entry}}))
        args = ("remote", "run", str(faulty), "--host", "small", "--task", "fail",
                "--inventory", str(small_inv))
        assert cube(*args).returncode == 7  # fits: the job runs and fails as designed
        settings = small_root / "cubes" / "faulty" / "workspace" / "settings.yaml"
        read_settings = [*in_host, "cat", str(settings)]
        before = subprocess.run(read_settings, capture_output=True, check=True).stdout
        assert b"lines: 40" in before
        with open(faulty / "workspace" / "settings.yaml", "ab") as f:
            f.write(b"# " + os.urandom(32 * 1024 * 1024).hex().encode() + b"\n")
        result = cube(*args)
        assert result.returncode == 2, result.stderr
        assert "space" in result.stderr.lower(), result.stderr
        assert subprocess.run(read_settings, capture_output=True, check=True).stdout == before
    finally:
        subprocess.run([*in_host, "umount", "-l", str(small_root)], check=False)


def test_shell_opens_in_the_job_folder_with_its_environment(lab, lab_home, hello):
    started = cube("remote", "run", str(hello), "--host", "lab1", "--task", "greet")
    assert started.returncode == 0, started.stderr
    [job] = ledger_jobs()
    shell = subprocess.run(cube_cmd("remote", "shell", job["id"]), input="pwd; which python\n",
                           capture_output=True, text=True, timeout=60)
    root = lab.host("lab1").root
    assert f"{root}/jobs/{job['id']}" in shell.stdout, shell.stderr
    assert f"{root}/envs/{job['env_hash']}/bin/python" in shell.stdout, shell.stderr
