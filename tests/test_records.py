"""Run records (controller/records.py, recorddiff.py, rerun.py): what every run used, `cube
remote diff` naming exactly what changed, `cube remote rerun` running the same argv."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from controller.recorddiff import Difference, diff_records
from tests.test_remote import copy_cube, cube, cube_cmd

BASE = {
    "cube": {"requirements_file": "requirements.txt"},
    "files": {"mnist.py": "a" * 64, "requirements.txt": "b" * 64},
    "requirements": ["numpy>=1.26", "six==1.16.0"],
    "frozen": "numpy==2.1.0\nsix==1.16.0\n",
    "params": {"overrides": {"train_config": "train.yaml"},
               "resolved": {"train": {"train_config": "train.yaml"}}},
    "inputs": {"train.yaml": {"sha256": "c" * 64,
                              "content": {"epochs": 1, "learning_rate": {"initial": 0.01}}}},
    "config": [], "runtime": {"name": "python", "env_key": "1" * 16, "python": "3.11.2"},
    "host": {"name": "lab1", "hostname": "vm", "os": "Debian 12", "cpus": 2,
             "memory_bytes": 1 << 34, "gpus": [], "driver": None},
}


def changed(**parts) -> dict:
    return json.loads(json.dumps({**BASE, **parts}))


def test_identical_records_have_no_difference():
    assert diff_records(BASE, changed()) == []


def test_a_changed_pin_is_named_once_under_requirements_not_as_a_code_file():
    other = changed(requirements=["numpy>=1.26", "six==1.17.0"],
                    files={**BASE["files"], "requirements.txt": "d" * 64},
                    frozen="numpy==2.1.0\nsix==1.17.0\n", runtime={**BASE["runtime"],
                                                                   "env_key": "2" * 16})
    assert [str(d) for d in diff_records(BASE, other)] == [
        "requirements: six: six==1.16.0 -> six==1.17.0",
        "frozen: six: 1.16.0 -> 1.17.0"]


def test_a_yaml_input_names_the_key_path_that_changed():
    inputs = {"train.yaml": {"sha256": "e" * 64,
                             "content": {"epochs": 1, "learning_rate": {"initial": 0.003}}}}
    assert diff_records(BASE, changed(inputs=inputs)) == [
        Difference("inputs", "train.yaml: learning_rate.initial", 0.01, 0.003)]


def test_code_host_and_hardware_differences_are_named():
    other = changed(files={**BASE["files"], "mnist.py": "f" * 64},
                    host={**BASE["host"], "name": "gpu01", "gpus": ["NVIDIA A100"],
                          "driver": "550.54"})
    found = {(d.section, d.what) for d in diff_records(BASE, other)}
    assert found == {("code", "mnist.py"), ("host", "name"), ("hardware", "gpus"),
                     ("hardware", "driver")}


def test_a_container_image_that_changed_is_a_runtime_difference():
    a = changed(runtime={"name": "docker", "env_key": "sha256:1", "image_digests": []})
    b = changed(runtime={"name": "docker", "env_key": "sha256:2", "image_digests": []})
    assert [d.what for d in diff_records(a, b)] == ["image"]


# ---- end to end on a lab host ------------------------------------------------------------------

def record_of(job: str) -> dict:
    shown = cube("remote", "show", job, "--json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def run_id(result) -> str:
    return re.search(r"job (\S+) succeeded", result.stderr).group(1)


def normalized_argv(record: dict) -> list[list[str]]:
    job = record["job_id"]
    return [[word.replace(job, "<job>") for word in t["argv"]] for t in record["tasks"]]


@pytest.mark.integration
def test_rerun_of_a_finished_job_with_an_unchanged_cube_runs_the_same_argv(lab_home, tmp_path):
    hello = copy_cube("hello", tmp_path)
    first = cube("remote", "run", str(hello), "--host", "lab1", "--task", "greet,summarize")
    assert first.returncode == 0, first.stderr
    again = cube("remote", "rerun", run_id(first))
    assert again.returncode == 0, again.stderr
    assert "changed since" not in again.stderr
    a, b = record_of(run_id(first)), record_of(run_id(again))
    assert a["job_id"] != b["job_id"]
    assert normalized_argv(a) == normalized_argv(b)
    assert [t["exit_code"] for t in b["tasks"]] == [0, 0]
    assert a["cube"]["digest"] == b["cube"]["digest"]
    ws = hello / "workspace"
    pulled = {p.relative_to(ws).as_posix() for d in ("greetings", "report")
              for p in (ws / d).rglob("*") if p.is_file()}
    assert set(b["outputs_files"]) == pulled and len(pulled) >= 4
    assert cube("remote", "diff", a["job_id"], b["job_id"]).returncode == 0


@pytest.mark.integration
def test_rerun_of_a_changed_cube_shows_the_change_and_asks(lab_home, tmp_path):
    hello = copy_cube("hello", tmp_path)
    first = cube("remote", "run", str(hello), "--host", "lab1", "--task", "greet")
    assert first.returncode == 0, first.stderr
    (hello / "hello.py").write_text((hello / "hello.py").read_text() + "\n# edited\n")
    refused = subprocess.run(cube_cmd("remote", "rerun", run_id(first)), input="n\n",
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "code: hello.py" in refused.stderr and "--yes" in refused.stderr
    forced = cube("remote", "rerun", run_id(first), "--yes")
    assert forced.returncode == 0, forced.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_diff_of_two_mnist_runs_names_the_pin_the_frozen_package_and_the_train_value(
        lab_home, tmp_path):
    """Two runs of the mnist cube (2,000 images, one epoch) that differ in one requirement pin
    and one train.yaml value: exactly those, plus the frozen package that moved."""
    mnist = copy_cube("mnist", tmp_path)
    requirements = mnist / "requirements.txt"
    original = requirements.read_text()
    config = mnist / "workspace" / "train-smoke.yaml"
    jobs = []
    for pin, rate in (("six==1.16.0", "0.01"), ("six==1.17.0", "0.003")):
        requirements.write_text(original + f"{pin}\n")
        config.write_text(re.sub(r"initial: [0-9.]+", f"initial: {rate}", config.read_text()))
        result = cube("remote", "run", str(mnist), "--host", "lab1", "--task", "download,train",
                      "train_config=train-smoke.yaml", timeout=1800)
        assert result.returncode == 0, result.stderr[-3000:]
        jobs.append(run_id(result))
    diff = cube("remote", "diff", *jobs)
    assert diff.returncode == 1, diff.stderr
    assert diff.stdout.splitlines() == [
        "requirements: six: six==1.16.0 -> six==1.17.0",
        "frozen: six: 1.16.0 -> 1.17.0",
        "inputs: train-smoke.yaml: learning_rate.initial: 0.01 -> 0.003"]
