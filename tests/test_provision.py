"""Playbook runner (controller/provision.py), the python venv playbook and the python runtime's
interpreter choice and env reuse (controller/runtimes/python.py). Real shells, real venvs, real
pip against the configured index: nothing here is mocked."""

from __future__ import annotations

import json
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from controller.errors import ConfigError, CubeError
from controller.plan import plan_job
from controller.provision import LocalExecutor, StepFailed, load_playbook, render, run_playbook
from controller.runtimes.python import (
    ensure_local_env,
    find_interpreter,
    local_env_dir,
    python_task_argv,
    version_matches,
)

NO_SUCH_PACKAGE = "cube-no-such-package-xyz==1.0"


def write_book(tmp_path: Path, body: str, name: str = "book.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def collect():
    lines: list[str] = []
    return lines, lines.append


# ---- rendering --------------------------------------------------------------------------------

def test_render_quotes_hostile_values_as_single_words():
    hostile = ["x; rm -rf /", "a b", "$(touch /tmp/pwned)", "it's"]
    out = render("pip install {{ reqs }} --log {{ log }}", {"reqs": hostile, "log": "/p q/l"},
                 where=(Path("t.yaml"), "s"))
    assert shlex.split(out) == ["pip", "install", *hostile, "--log", "/p q/l"]


def test_render_raw_filter_opts_out_of_quoting():
    out = render("echo {{ glob | raw }} {{ glob }}", {"glob": "*.txt"}, where=(Path("t"), "s"))
    assert out == "echo *.txt '*.txt'"


def test_render_missing_variable_names_file_step_and_variable():
    with pytest.raises(ConfigError) as err:
        render("echo {{ nope }}", {}, where=(Path("/x/book.yaml"), "say"))
    text = str(err.value)
    assert "/x/book.yaml" in text and "say" in text and "nope" in text


def test_hostile_requirement_never_reaches_the_shell(tmp_path):
    marker = tmp_path / "pwned"
    book = write_book(tmp_path, """
        name: t
        steps:
          - name: print
            run: printf '%s\\n' {{ items }} > {{ out }}
    """)
    items = [f"x; touch {marker}", f"$(touch {marker})"]
    run_playbook(book, {"items": items, "out": str(tmp_path / "out")}, LocalExecutor())
    assert not marker.exists()
    assert (tmp_path / "out").read_text().splitlines() == items


# ---- running ----------------------------------------------------------------------------------

def test_step_whose_check_passes_is_skipped_with_its_reason(tmp_path):
    done = tmp_path / "done"
    done.touch()
    book = write_book(tmp_path, """
        name: t
        steps:
          - name: make
            check: test -f {{ done }}
            run: echo ran > {{ done }}
    """)
    lines, log = collect()
    results = run_playbook(book, {"done": str(done)}, LocalExecutor(), log)
    assert [(r.name, r.status) for r in results] == [("make", "skipped")]
    assert "test -f" in results[0].reason
    assert done.read_text() == ""
    assert any("skip 'make'" in line for line in lines)


def test_step_runs_when_its_check_fails(tmp_path):
    done = tmp_path / "done"
    book = write_book(tmp_path, """
        name: t
        steps:
          - {name: make, check: "test -f {{ done }}", run: "echo ran > {{ done }}"}
    """)
    results = run_playbook(book, {"done": str(done)}, LocalExecutor())
    assert results[0].status == "ran" and done.read_text() == "ran\n"


def test_failing_step_reports_step_command_code_and_last_output(tmp_path):
    book = write_book(tmp_path, """
        name: t
        steps:
          - name: noisy failure
            run: |
              for i in $(seq 1 50); do echo "line $i"; done
              echo "the real problem" >&2
              exit 3
    """)
    with pytest.raises(StepFailed) as err:
        run_playbook(book, {}, LocalExecutor())
    text = str(err.value)
    assert "'noisy failure'" in text and "exit code 3" in text
    assert "the real problem" in text and "line 50" in text
    assert "line 1\n" not in text  # only the tail
    assert err.value.result.code == 3


def test_on_failure_cleanup_runs_after_a_failed_step(tmp_path):
    scratch = tmp_path / "scratch"
    book = write_book(tmp_path, """
        name: t
        on_failure: rm -rf {{ scratch }}
        steps:
          - {name: make, run: "mkdir {{ scratch }}"}
          - {name: fail, run: "exit 1"}
    """)
    with pytest.raises(StepFailed):
        run_playbook(book, {"scratch": str(scratch)}, LocalExecutor())
    assert not scratch.exists()


def test_dry_run_reports_what_would_run_and_changes_nothing(tmp_path):
    made, present = tmp_path / "made", tmp_path / "present"
    present.touch()
    book = write_book(tmp_path, """
        name: t
        steps:
          - {name: a, check: "test -f {{ present }}", run: "rm {{ present }}"}
          - {name: b, run: "touch {{ made }}"}
          - {name: c, when: "False", run: "touch {{ made }}"}
    """)
    results = run_playbook(book, {"made": str(made), "present": str(present)},
                           LocalExecutor(), dry_run=True)
    assert [r.status for r in results] == ["skipped", "would-run", "not-applicable"]
    assert "touch" in results[1].command
    assert present.exists() and not made.exists()


def test_var_defaults_are_templates_over_the_callers_values(tmp_path):
    book = write_book(tmp_path, """
        name: t
        vars: {log: "{{ base }}.log", count: 2}
        steps:
          - {name: a, run: "echo {{ log }} {{ count }} > {{ base }}"}
    """)
    base = tmp_path / "out file"
    run_playbook(book, {"base": str(base)}, LocalExecutor())
    assert base.read_text() == f"{base}.log 2\n"


@pytest.mark.parametrize("body, expect", [
    ("name: t\nsteps:\n  - {name: a, run: x, bogus: 1}\n", ["steps[0].bogus", ":3"]),
    ("name: t\nsteps:\n  - {name: a}\n", ["steps[0].run"]),
    ("name: t\nsteps: []\n", ["steps", "non-empty"]),
    ("name: t\nstep:\n  - {name: a, run: x}\n", ["step", "unknown key"]),
    ("name: t\nsteps:\n  - {name: a, run: x, timeout: soon}\n", ["steps[0].timeout"]),
    ("name: t\nsteps: [\n", ["not valid YAML"]),
])
def test_bad_playbook_is_a_config_error_naming_file_and_field(tmp_path, body, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_playbook(path)
    text = str(err.value)
    assert str(path) in text
    for piece in expect:
        assert piece in text


def test_unknown_builtin_playbook_lists_the_known_ones():
    with pytest.raises(CubeError) as err:
        load_playbook("no-such-book")
    assert "no-such-book" in str(err.value) and "python" in str(err.value)


def test_user_playbook_path_is_relative_to_the_cube(tmp_path):
    (tmp_path / "setup").mkdir()
    write_book(tmp_path / "setup", "name: mine\nsteps:\n  - {name: a, run: 'true'}\n", "mine.yaml")
    assert load_playbook("setup/mine.yaml", base=tmp_path).name == "mine"


# ---- the python playbook --------------------------------------------------------------------

def python_vars(env_dir: Path, requirements: list[str]) -> dict:
    return {"python": sys.executable, "env_dir": str(env_dir), "env_hash": env_dir.name,
            "requirements": requirements}


def test_python_playbook_builds_env_without_requirements_and_skips_when_present(tmp_path):
    env_dir = tmp_path / "envs" / "h1"
    first = run_playbook("python", python_vars(env_dir, []), LocalExecutor())
    assert [r.status for r in first if r.name == "install requirements"] == ["not-applicable"]
    marker = json.loads((env_dir / "cube-env.json").read_text())
    assert marker["env_hash"] == "h1" and marker["requirements"] == []
    assert (env_dir / "cube-freeze.txt").exists() and (env_dir / "bin" / "python").exists()
    assert sorted(p.name for p in env_dir.parent.iterdir()) == ["h1"]  # no temp dir left
    again = run_playbook("python", python_vars(env_dir, []), LocalExecutor())
    assert {r.status for r in again} == {"skipped"}


def test_python_playbook_needs_only_posix_sh(tmp_path):
    env_dir = tmp_path / "envs" / "posix"
    run_playbook("python", python_vars(env_dir, []), LocalExecutor(shell="/bin/sh"))
    assert json.loads((env_dir / "cube-env.json").read_text())["env_hash"] == "posix"


def test_python_playbook_installs_requirements_and_records_freeze(tmp_path):
    env_dir = tmp_path / "envs" / "h2"
    run_playbook("python", python_vars(env_dir, ["six"]), LocalExecutor())
    assert "six==" in (env_dir / "cube-freeze.txt").read_text()
    assert "six" in Path(f"{env_dir}.pip.log").read_text()
    # pip's scripts were written in the temp dir; their shebangs must name the final one
    shebang = (env_dir / "bin" / "pip").read_text().splitlines()[0]
    assert shebang.startswith(f"#!{env_dir}/bin/python"), shebang


def test_failed_pip_install_leaves_no_env_and_no_temp_dir(tmp_path):
    envs = tmp_path / "envs"
    env_dir = envs / "h3"
    with pytest.raises(StepFailed) as err:
        run_playbook("python", python_vars(env_dir, ["six", NO_SUCH_PACKAGE]), LocalExecutor())
    text = str(err.value)
    assert "'install requirements'" in text
    assert "cube-no-such-package-xyz" in text and "No matching distribution" in text
    assert sorted(p.name for p in envs.iterdir()) == ["h3.pip.log"]


# ---- the python runtime ---------------------------------------------------------------------

@pytest.mark.parametrize("version, req, ok", [
    ("3.11.7", None, True), ("3.7.9", None, False), ("3.11.7", "3.11", True),
    ("3.11.7", "3.1", False), ("3.11.7", "3", True), ("3.10.2", "3.11", False),
    ("3.12.0", ">=3.9", True), ("3.8.1", ">=3.9", False), ("3.11.7", "python3.11", True),
    ("3.11.7", "3.11.7", True), ("3.11.7", "<3.11", False), ("3.6.15", "3", False),
])
def test_version_matches(version, req, ok):
    assert version_matches(version, req) is ok


def test_find_interpreter_takes_the_first_match_from_probe_dicts():
    probe = [{"path": "/opt/py38/bin/python3.8", "version": "3.8.18"},
             {"path": "/usr/bin/python3.11", "version": "3.11.2"},
             {"path": "/usr/local/bin/python3.11", "version": "3.11.9"}]
    assert find_interpreter("3.11", probe) == "/usr/bin/python3.11"
    assert find_interpreter(None, probe) == "/opt/py38/bin/python3.8"


def test_find_interpreter_error_lists_what_the_host_has():
    probe = [{"path": "/usr/bin/python3", "version": "3.11.2"},
             {"path": "/usr/bin/python3.8", "version": "3.8.10"}]
    with pytest.raises(CubeError) as err:
        find_interpreter("3.12", probe)
    text = str(err.value)
    assert "Python 3.12" in text
    assert "/usr/bin/python3 (3.11.2)" in text and "/usr/bin/python3.8 (3.8.10)" in text


def make_cube(tmp_path: Path, requirements: list[str]) -> Path:
    root = tmp_path / "cube"
    root.mkdir(exist_ok=True)
    (root / "mlcube.yaml").write_text(textwrap.dedent("""
        name: tiny
        tasks:
          echo:
            parameters:
              outputs: {out_dir: out/}
    """))
    reqs = ", ".join(requirements)
    (root / "metadata.yaml").write_text(textwrap.dedent(f"""
        name: tiny
        framework: {{name: python, runtime: {{name: python3, requirement: [{reqs}]}}}}
        entry_point: tiny.py
    """))
    (root / "tiny.py").write_text("import sys; print(sys.argv[1:])\n")
    return root


def test_second_ensure_reuses_env_without_running_the_playbook(tmp_path, cube_home):
    from controller.cube import load_cube

    cube = load_cube(make_cube(tmp_path, []))
    lines, log = collect()
    env_dir = ensure_local_env(cube, log)
    # keyed on the interpreter a local run finds, as on hosts (python.env_hash_for)
    assert env_dir == cube_home / "envs" / local_env_dir(cube).name
    assert any("building env" in line for line in lines)
    lines.clear()
    assert ensure_local_env(cube, log) == env_dir
    assert len(lines) == 1 and lines[0].startswith(f"reusing env {env_dir.name}")


def test_changed_requirement_means_a_new_env_dir(tmp_path, cube_home):
    from controller.cube import load_cube

    root = make_cube(tmp_path, [])
    first = ensure_local_env(load_cube(root), lambda _m: None)
    changed = load_cube(make_cube(tmp_path, ["six"]))
    lines, log = collect()
    # The real pip install is covered above; here only the keying matters, so plan it.
    second = ensure_local_env(changed, log, plan=True)
    assert second != first and second.parent == first.parent
    assert any(line.startswith(f"building env {second.name}") for line in lines)
    assert any("would run 'install requirements'" in line for line in lines)
    assert not any("reusing" in line for line in lines)


def test_plan_reports_without_building(tmp_path, cube_home):
    from controller.cube import load_cube

    cube = load_cube(make_cube(tmp_path, []))
    lines, log = collect()
    ensure_local_env(cube, log, plan=True)
    assert not local_env_dir(cube).exists()
    assert any("would run 'create venv'" in line for line in lines)


def test_python_task_argv_uses_the_venv_interpreter(tmp_path):
    from controller.cube import load_cube

    cube = load_cube(make_cube(tmp_path, []))
    task = plan_job(cube, "echo").task("echo")
    argv = python_task_argv(cube, task, "/envs/abc", lambda p: str(p.path))
    assert argv[:3] == ["/envs/abc/bin/python", "tiny.py", "echo"]
    assert argv[-1] == f"--out_dir={cube.workspace / 'out'}"


def test_env_whose_base_interpreter_vanished_is_rebuilt(tmp_path, cube_home):
    from controller.cube import load_cube

    cube = load_cube(make_cube(tmp_path, []))
    env_dir = ensure_local_env(cube, lambda _m: None)
    link = env_dir / "bin" / "python"
    link.unlink()
    link.symlink_to(tmp_path / "gone" / "python3")  # what uninstalling the base Python leaves
    lines, log = collect()
    assert ensure_local_env(cube, log) == env_dir
    assert any("rebuilding" in line for line in lines)
    assert (env_dir / "bin" / "python").exists()
    assert sorted(p.name for p in env_dir.parent.iterdir()) == [env_dir.name]


def test_ctrl_c_during_a_step_still_runs_the_cleanup(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import REPO

    scratch, book = tmp_path / "scratch", write_book(tmp_path, """
        name: t
        on_failure: rm -rf {{ scratch }}
        steps:
          - {name: make, run: "mkdir {{ scratch }}"}
          - {name: slow, run: "sleep 120"}
    """)
    script = ("import sys; from controller.provision import LocalExecutor, run_playbook; "
              "run_playbook(sys.argv[1], {'scratch': sys.argv[2]}, LocalExecutor())")
    proc = subprocess.Popen([sys.executable, "-c", script, str(book), str(scratch)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not scratch.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into the slow step
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"KeyboardInterrupt" in proc.stderr.read()
    assert not scratch.exists()


def test_python_playbook_removes_day_old_temp_dirs_of_killed_builds(tmp_path):
    import os

    env_dir = tmp_path / "envs" / "h4"
    stale, fresh = Path(f"{env_dir}.tmp-dead0001"), Path(f"{env_dir}.tmp-live0002")
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
    old = time_ago(days=2)
    os.utime(stale, (old, old))
    run_playbook("python", python_vars(env_dir, []), LocalExecutor())
    assert not stale.exists() and fresh.exists()  # a build still running keeps its dir


def time_ago(days: float) -> float:
    import time

    return time.time() - days * 86400
