"""`cube remote prune` on a lab host with a root of its own: a dry run lists exactly what a real
prune then removes, and a running job's folder, environment and cube copy survive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from controller.errors import CubeError
from controller.hosts import update_inventory
from controller.prune import parse_age
from tests.test_fleet_queue import gate as gate  # noqa: F401 (fixtures)
from tests.test_fleet_queue import napper as napper  # noqa: F401
from tests.test_fleet_queue import submit, wait_states
from tests.test_remote import cube


def test_ages():
    assert parse_age("14d") == 14 * 86400 and parse_age("12h") == 43200
    assert parse_age("90") == 90 and parse_age("2w") == 14 * 86400 and parse_age("0") == 0
    with pytest.raises(CubeError, match="is not an age"):
        parse_age("soon")


@pytest.fixture
def prune_host(lab_home, cube_home, tmp_path):
    """`lab2-prune`: lab2 with a cube root of its own, so pruning touches no other test's files."""
    inventory = yaml.safe_load((cube_home / "hosts.yaml").read_text())
    root = tmp_path / "prune-root"
    update_inventory({"lab2-prune": {**inventory["hosts"]["lab2"], "root": str(root),
                                     "groups": [], "labels": ["prune"]}})
    return "lab2-prune", root


def prune(host: str, *args: str) -> dict:
    out = cube("remote", "prune", "--host", host, "--json", *args)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)["hosts"]
    assert row["reachable"], row
    return row


def items(row: dict) -> list[tuple[str, str]]:
    return [(i["kind"], i.get("path") or i.get("id")) for i in row["removed"]]


def test_dry_run_lists_exactly_what_prune_removes_and_running_jobs_survive(
        prune_host, napper, gate, tmp_path):
    host, root = prune_host
    other = tmp_path / "other"
    other.mkdir()
    done = _renamed(napper, other, "napper2")
    finished = cube("remote", "run", str(done), "--host", host, "--task", "nap")
    assert finished.returncode == 0, finished.stderr
    running = submit(napper, host)  # waits for the gate: holds its folder, env and cube copy
    assert wait_states({running: str(root)}, {"running"})

    assert prune(host, "--dry-run")["removed"] == []  # nothing is 14 days old
    planned = prune(host, "--older-than", "0", "--dry-run")
    kinds = sorted(k for k, _ in items(planned))
    assert kinds == ["cube", "job"], planned  # napper2's job and copy; the env is in use
    assert (root / "jobs").exists() and planned["bytes"] > 0
    removed = prune(host, "--older-than", "0")
    assert items(removed) == items(planned) and removed["bytes"] == planned["bytes"]
    assert all(not Path(path).exists() for _, path in items(removed))
    assert (root / "jobs" / running).is_dir() and (root / "cubes" / "napper").is_dir()
    assert any(use.startswith("env:") for use in removed["in_use"])
    assert prune(host, "--older-than", "0", "--dry-run")["removed"] == []

    gate.write_text("open")
    assert wait_states({running: str(root)}, {"succeeded"})
    last = prune(host, "--older-than", "0")
    assert sorted(k for k, _ in items(last)) == ["cube", "env", "job"], last
    assert list((root / "envs").iterdir()) == [] and list((root / "jobs").iterdir()) == []


def _renamed(src: Path, where: Path, name: str) -> Path:
    """A copy of the napper cube under another name (its own cube copy on the host)."""
    copy = where / name
    shutil.copytree(src, copy)
    for file in ("mlcube.yaml", "metadata.yaml"):
        path = copy / file
        path.write_text(path.read_text().replace("name: napper", f"name: {name}"))
    (copy / "workspace" / "plan.txt").write_text("seconds=0\n")
    return copy
