"""The local task runner (controller/runner.py): output to terminal and log file, exit codes,
and stopping a whole process group on Ctrl-C / SIGTERM with real processes and signals."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from controller.runner import run_process, task_log_path
from tests.conftest import REPO

# A task that ignores SIGTERM (recording that it got one) and starts a grandchild in its group.
STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    state = sys.argv[1]
    def on_term(*_):
        open(os.path.join(state, "got-term"), "w").close()
    signal.signal(signal.SIGTERM, on_term)
    child = subprocess.Popen(["sleep", "300"])
    with open(os.path.join(state, "pids"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
""")

WRAPPER = textwrap.dedent("""
    import sys
    from controller.runner import run_process
    sys.exit(run_process([sys.executable, sys.argv[1], sys.argv[2]], cwd=".",
                         log_file=sys.argv[3], grace=float(sys.argv[4])))
""")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # an unreaped zombie is dead


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def test_output_goes_to_terminal_and_log_file(tmp_path):
    out, log = io.BytesIO(), tmp_path / "task.log"
    script = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(0)"
    code = run_process([sys.executable, "-u", "-c", script], cwd=tmp_path, log_file=log, out=out)
    assert code == 0
    for text in (out.getvalue().decode(), log.read_text()):
        assert "to stdout" in text and "to stderr" in text


def test_exit_code_and_signal_death_are_returned(tmp_path):
    log = tmp_path / "task.log"
    assert run_process(["sh", "-c", "exit 7"], cwd=tmp_path, log_file=log, out=io.BytesIO()) == 7
    killed = run_process(["sh", "-c", "kill -KILL $$"], cwd=tmp_path, log_file=log,
                         out=io.BytesIO())
    assert killed == 128 + signal.SIGKILL


def test_task_runs_in_its_own_process_group_and_cwd(tmp_path):
    out = io.BytesIO()
    script = "import os; print(os.getpgid(0) == os.getpid(), os.getcwd())"
    run_process([sys.executable, "-c", script], cwd=tmp_path, log_file=tmp_path / "l", out=out)
    assert out.getvalue().decode().split() == ["True", str(tmp_path)]


def test_leftover_background_process_is_stopped_when_the_task_exits(tmp_path):
    pidfile = tmp_path / "bg.pid"
    # The background sleep inherits stdout, which would keep the log open forever.
    command = f"sleep 300 & echo $! > {pidfile}; echo done"
    code = run_process(["sh", "-c", command], cwd=tmp_path, log_file=tmp_path / "l",
                       out=io.BytesIO(), grace=1)
    assert code == 0
    assert not alive(int(pidfile.read_text()))


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_the_whole_group_with_sigkill_after_the_grace(tmp_path, sig, expected):
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "task.log"
    wrapper = subprocess.Popen([sys.executable, "wrapper.py", "stubborn.py", str(state), str(log),
                                "0.5"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(state / "pids")
        task_pid, child_pid = map(int, (state / "pids").read_text().split())
        wrapper.send_signal(sig)
        assert wrapper.wait(timeout=60) == expected
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert (state / "got-term").exists()      # it was asked politely first
    assert not alive(task_pid) and not alive(child_pid)
    assert "ready" in log.read_text()


def params(cube, task, overrides=None):
    from controller.taskargs import apply_param_overrides

    return apply_param_overrides(cube, task, overrides or {})


def test_log_path_uses_the_tasks_log_dir_output(tmp_path):
    from controller.cube import load_cube

    cube = load_cube(REPO / "tests" / "cubes" / "legacy", workspace=tmp_path / "ws")
    path = task_log_path(cube, params(cube, "train"), "train")
    assert path.parent == tmp_path / "ws" / "logs" and path.name.startswith("cube-train-")
    moved = task_log_path(cube, params(cube, "train", {"log_dir": str(tmp_path / "elsewhere")}), "train")
    assert moved.parent == tmp_path / "elsewhere"
    path.touch()
    # same second: a new name, never appended
    assert task_log_path(cube, params(cube, "train"), "train") != path


def test_log_path_defaults_to_workspace_logs(tmp_path):
    from controller.cube import load_cube

    cube = load_cube(REPO / "cubes" / "hello", workspace=tmp_path / "ws")
    path = task_log_path(cube, params(cube, "greet"), "greet")
    assert path.parent == tmp_path / "ws" / "logs" and path.suffix == ".log"


def test_missing_command_is_a_cube_error(tmp_path):
    from controller.errors import CubeError

    with pytest.raises(CubeError) as err:
        run_process([str(tmp_path / "no-such-python"), "x.py"], cwd=tmp_path,
                    log_file=tmp_path / "l", out=io.BytesIO())
    assert "no-such-python" in str(err.value) and "No such file" in str(err.value)
