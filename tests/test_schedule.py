"""`cube schedule` (controller/schedule.py): one crontab line per schedule, run as cron would."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller import schedule
from controller.errors import CubeError
from tests.conftest import require
from tests.test_remote import copy_cube

USER_LINE = "17 3 * * * echo the-users-own-line  # not cube's"


def test_a_line_round_trips_with_cron_percent_escapes(tmp_path):
    command = "env PATH=/usr/bin cube remote run /c --name n >> /logs/$(date +%Y%m%d).log 2>&1"
    line = schedule.crontab_line("n", "0 2 * * *", command)
    assert "\\%Y\\%m\\%d" in line and line.endswith("# cube-schedule:n")
    parsed = schedule.parse_line(line)
    assert (parsed.name, parsed.cron, parsed.command) == ("n", "0 2 * * *", command)
    assert schedule.parse_line(USER_LINE) is None


def test_paths_become_absolute_and_remote_runs_get_their_name(tmp_path):
    (tmp_path / "cubes" / "mnist").mkdir(parents=True)
    args = schedule.absolute_args(["remote", "run", "cubes/mnist", "--host", "@lab",
                                   "train_config=train.yaml"], tmp_path)
    assert args[2] == str(tmp_path / "cubes" / "mnist") and args[-1] == "train_config=train.yaml"
    assert schedule.with_name(args, "nightly")[-2:] == ["--name", "nightly"]
    assert schedule.with_name(["remote", "run", "x", "--name", "own"], "n")[-1] == "own"


@pytest.mark.parametrize("expr", ["0 2 * *", "0 2 * * * *", "0 2 * * ; rm"])
def test_a_bad_cron_expression_is_refused(expr):
    with pytest.raises(CubeError, match="cron"):
        schedule.check_cron(expr)


def test_a_bad_name_is_refused():
    with pytest.raises(CubeError, match="not usable"):
        schedule.check_name("../x")


@pytest.fixture
def crontab():
    """The user's real crontab, saved and put back: tests add their own line to it."""
    require(shutil.which("crontab") is not None, "cron is installed by scripts/cron-up.sh")
    saved = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    subprocess.run(["crontab", "-"], input=USER_LINE + "\n", text=True, check=True)
    yield
    if saved.returncode == 0:
        subprocess.run(["crontab", "-"], input=saved.stdout, text=True, check=True)
    else:
        subprocess.run(["crontab", "-r"], capture_output=True)


def crontab_lines() -> list[str]:
    return subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout.splitlines()


@pytest.mark.integration
def test_a_schedule_runs_a_remote_job_as_cron_would_and_is_removed_alone(lab_home, tmp_path,
                                                                        crontab):
    hello = copy_cube("hello", tmp_path)
    cube = str(Path(sys.executable).with_name("cube"))
    added = subprocess.run([cube, "schedule", "add", "hello-nightly", "--cron", "0 2 * * *",
                            "--", "remote", "run", "hello", "--host", "lab1", "--task", "greet"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    [line] = [x for x in crontab_lines() if "cube-schedule:hello-nightly" in x]
    assert line.startswith("0 2 * * * ") and f" {hello} " in line and "--name hello-nightly" in line
    assert USER_LINE in crontab_lines()

    # cron's bare environment: nothing of ours, not even CUBE_HOME or PATH
    ran = subprocess.run(["env", "-i", cube, "schedule", "run", "hello-nightly"],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    [log] = (lab_home_path(line) / "schedules" / "hello-nightly").glob("*.log")
    assert re.fullmatch(r"\d{8}\.log", log.name)
    assert "succeeded" in log.read_text() and (hello / "workspace" / "greetings").is_dir()

    removed = subprocess.run([cube, "schedule", "remove", "hello-nightly"], capture_output=True,
                             text=True)
    assert removed.returncode == 0, removed.stderr
    assert crontab_lines() == [USER_LINE]


def lab_home_path(line: str) -> Path:
    return Path(re.search(r"CUBE_HOME=(\S+)", line).group(1))
