"""LocalTarget: this machine behind the Target protocol that hosts implement too (the host side
is tested against real sshd in test_transport.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from controller import paths
from controller.errors import CubeError
from controller.provision import LocalExecutor
from controller.target import LocalTarget, Target


def test_this_machine_is_a_target_rooted_at_cube_home(cube_home):
    target = LocalTarget()
    assert isinstance(target, Target) and target.name == "this machine"
    assert target.root == str(cube_home) == str(paths.cube_home())
    assert LocalExecutor is LocalTarget  # provisioning's old name for it


def test_sh_and_run_time_out_the_same_way(tmp_path):
    target = LocalTarget(tmp_path)
    ran = target.run(["sh", "-c", "echo partial; sleep 30"], timeout=0.5, check=False)
    shelled = target.sh("echo partial; sleep 30", timeout=0.5)
    for r in (ran, shelled):
        assert (r.code, r.stdout, r.timed_out) == (124, "partial\n", True)
        assert "timed out after 0.5 s" in r.stderr
    with pytest.raises(CubeError, match="did not finish within 0.5 s"):
        target.run(["sleep", "30"], timeout=0.5)
    assert not target.run(["sh", "-c", "exit 124"], check=False).timed_out


def test_run_passes_input_and_check_raises_on_any_failure(tmp_path):
    target = LocalTarget(tmp_path)
    assert target.run(["cat"], input=b"fed").stdout == "fed"
    r = target.sh("x=$((6*7)); echo $x; echo err >&2; exit 3")
    assert (r.code, r.stdout, r.stderr) == (3, "42\n", "err\n")
    with pytest.raises(CubeError) as err:
        target.run(["sh", "-c", "echo the-reason >&2; exit 5"])
    assert "exited with code 5" in str(err.value) and "the-reason" in str(err.value)


def test_put_replaces_a_file_atomically_with_its_mode(tmp_path):
    target, path = LocalTarget(tmp_path), tmp_path / "f.txt"
    path.write_text("old")
    target.put(b"new", str(path), mode=0o600)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no temp file left


def test_open_stream_carries_bytes_both_ways(tmp_path):
    stream = LocalTarget(tmp_path).open_stream(["sh", "-c", "tr a-z A-Z; echo done >&2"])
    stream.write(b"shout")
    stream.close_stdin()
    assert stream.read() == b"SHOUT" and stream.wait() == 0
    assert stream.stderr_text() == "done\n"
    stream.close()


def test_agent_verbs_run_the_zipapp_under_the_root(tmp_path):
    target = LocalTarget(tmp_path / "root")
    probe = target.agent("probe")
    assert probe["root"] == target.root and probe["agent_version"] >= 2
    argv = target.agent_argv("list-jobs")
    assert argv[1].endswith(".pyz") and Path(argv[1]).parent == paths.local_agent_dir()
    assert target.agent("list-jobs") == {"jobs": []}
    with pytest.raises(CubeError) as err:
        target.agent("status", "nope")
    assert "this machine: there is no job 'nope'" in str(err.value) and err.value.hint
