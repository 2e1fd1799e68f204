"""`cube run` end to end (controller/cli/local.py): the real CLI in a subprocess, real venvs
under the test's CUBE_HOME, real task processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

CLI = [sys.executable, "-c", "from controller.cli import main; main()"]


def cube(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def copy_workspace(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("logs", "greetings", "report",
                                                             "data", "model"))
    return dest


def logs_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("cube-*.log"))


def test_hello_greet_runs_and_second_run_reuses_the_env(tmp_path, cube_home):
    ws = copy_workspace(REPO / "cubes" / "hello" / "workspace", tmp_path / "ws")
    first = cube("run", REPO / "cubes" / "hello", "--task", "greet", "--workspace", ws)
    assert first.returncode == 0, first.stderr
    assert "Hello, Ada!" in first.stdout
    assert "building env" in first.stderr
    assert (ws / "greetings" / "Ada.txt").read_text() == "Hello, Ada!\n"
    (log,) = logs_in(ws / "logs")
    assert "Hello, Ada!" in log.read_text()
    second = cube("run", REPO / "cubes" / "hello", "--task", "greet", "--workspace", ws)
    assert second.returncode == 0, second.stderr
    assert "reusing env" in second.stderr and "building env" not in second.stderr
    assert len(list((cube_home / "envs").iterdir())) == 1


def test_hello_two_tasks_run_in_order(tmp_path):
    ws = copy_workspace(REPO / "cubes" / "hello" / "workspace", tmp_path / "ws")
    done = cube("run", REPO / "cubes" / "hello", "--task", "greet,summarize", "--workspace", ws)
    assert done.returncode == 0, done.stderr
    assert (ws / "report" / "summary.txt").read_text().startswith("3 greetings")
    assert done.stdout.index("Hello, Ada!") < done.stdout.index("3 greetings")


def test_legacy_cube_without_metadata_runs(tmp_path):
    ws = copy_workspace(REPO / "tests" / "cubes" / "legacy" / "workspace", tmp_path / "ws")
    done = cube("run", REPO / "tests" / "cubes" / "legacy", "--task", "download,train",
                "--workspace", ws)
    assert done.returncode == 0, done.stderr
    assert any((ws / "model").iterdir())
    # legacy declares a log_dir output: the task logs land there
    assert [p.name.split("-")[1] for p in logs_in(ws / "logs")] == ["download", "train"]


def failing_cube(tmp_path: Path) -> Path:
    root = tmp_path / "failing"
    root.mkdir()
    (root / "mlcube.yaml").write_text(textwrap.dedent("""
        name: failing
        tasks:
          fail: {parameters: {outputs: {out_dir: out/}}}
          after: {parameters: {outputs: {out_dir: out/}}}
          wait: {parameters: {outputs: {out_dir: out/}}}
    """))
    (root / "metadata.yaml").write_text("name: failing\nframework: {runtime: python3}\n"
                                        "entry_point: main.py\n")
    (root / "main.py").write_text(textwrap.dedent("""
        import sys, time
        from pathlib import Path
        task, out = sys.argv[1], Path(sys.argv[2].split("=", 1)[1])
        (out / f"{task}.started").touch()
        if task == "fail":
            print("about to fail", flush=True)
            sys.exit(7)
        if task == "wait":
            time.sleep(300)
    """))
    return root


def test_first_failure_stops_the_run_with_its_exit_code(tmp_path):
    root = failing_cube(tmp_path)
    done = cube("run", root, "--task", "fail,after")
    assert done.returncode == 7
    assert "Task 'fail' failed with exit code 7" in done.stderr
    assert "Not run: after" in done.stderr
    assert "about to fail" in done.stdout
    out = root / "workspace" / "out"
    assert (out / "fail.started").exists() and not (out / "after.started").exists()


def test_ctrl_c_stops_the_task_and_exits_130(tmp_path):
    root = failing_cube(tmp_path)
    proc = subprocess.Popen([*CLI, "run", str(root), "--task", "wait", "--grace", "1"],
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = root / "workspace" / "out" / "wait.started"
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "task never started"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert "stopped by SIGINT" in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    leftover = subprocess.run(["pgrep", "-f", f"{root}/main.py"], capture_output=True)
    assert leftover.stdout == b""


def test_unknown_parameter_override_is_refused(tmp_path):
    ws = copy_workspace(REPO / "cubes" / "hello" / "workspace", tmp_path / "ws")
    done = cube("run", REPO / "cubes" / "hello", "--task", "greet", "--workspace", ws,
                "nmaes=x.yaml")
    assert done.returncode == 2
    assert "no parameter 'nmaes'" in done.stderr and "names" in done.stderr


def test_parameter_override_moves_an_output(tmp_path):
    ws = copy_workspace(REPO / "cubes" / "hello" / "workspace", tmp_path / "ws")
    target = tmp_path / "elsewhere"
    done = cube("run", REPO / "cubes" / "hello", "--task", "greet", "--workspace", ws,
                f"greetings_dir={target}")
    assert done.returncode == 0, done.stderr
    assert (target / "Ada.txt").exists() and not (ws / "greetings").exists()


def test_missing_input_is_reported_before_anything_runs(tmp_path, cube_home):
    done = cube("run", REPO / "cubes" / "hello", "--task", "summarize",
                "--workspace", tmp_path / "empty")
    assert done.returncode == 2
    assert "Input 'greetings_dir'" in done.stderr and "greet" in done.stderr
    assert not (cube_home / "envs").exists()


def test_unknown_task_lists_the_valid_ones():
    done = cube("run", REPO / "cubes" / "hello", "--task", "greet,nope")
    assert done.returncode == 2
    assert "no task 'nope'" in done.stderr and "greet" in done.stderr


def test_plan_prints_commands_without_building(tmp_path, cube_home):
    ws = copy_workspace(REPO / "cubes" / "hello" / "workspace", tmp_path / "ws")
    done = cube("run", REPO / "cubes" / "hello", "--task", "greet", "--workspace", ws, "--plan")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("greet: ") and "hello.py greet --names=" in done.stdout
    assert not (cube_home / "envs").exists() or not any((cube_home / "envs").iterdir())
    assert not (ws / "greetings").exists()


@pytest.mark.parametrize("runtime", ["nosuch"])
def test_unknown_runtime_is_refused(runtime):
    done = cube("run", REPO / "cubes" / "hello", "--task", "greet", "--runtime", runtime)
    assert done.returncode == 2 and f"Unknown runtime '{runtime}'" in done.stderr


CALLS: list[tuple[str, dict]] = []


class RecordingRuntime:
    """A runtime that records what the plan gave each task and runs `exit 5` for summarize."""

    name = "recording"

    def prepare(self, plan, target, layout, facts, log, *, dry_run=False):
        from controller.runtimes.base import LaunchSpec, TaskLaunch

        tasks = []
        for task in plan.tasks:
            CALLS.append((task.name, task.overrides))
            code = 5 if task.name == "summarize" else 0
            tasks.append(TaskLaunch(task.name, ["sh", "-c", f"exit {code}"], layout.cube_dir))
        return LaunchSpec(self.name, tasks)


def test_runtime_registry_dispatches_by_name_with_per_task_overrides(tmp_path, monkeypatch):
    from controller import local
    from controller.errors import CubeError, TaskFailed
    from controller.runtimes import RUNTIMES, get_runtime

    monkeypatch.setitem(RUNTIMES, "recording", f"{__name__}:RecordingRuntime")
    ws = copy_workspace(REPO / "cubes" / "hello" / "workspace", tmp_path / "ws")
    (ws / "greetings").mkdir()
    CALLS.clear()
    req = local.LocalRequest(REPO / "cubes" / "hello", "greet,summarize",
                             {"names": str(ws / "names.yaml")}, runtime="recording",
                             workspace=ws)
    with pytest.raises(TaskFailed) as err:
        local.run(req, lambda _m: None)
    assert err.value.code == 5 and err.value.exit_code == 5
    assert CALLS == [("greet", {"names": str(ws / "names.yaml")}), ("summarize", {})]
    with pytest.raises(CubeError) as unknown:
        get_runtime("nosuch")
    assert "Valid runtimes: python, docker, podman" in str(unknown.value)
