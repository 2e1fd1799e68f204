"""Task arguments: the one command line every runtime runs, overrides, outputs and inputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.cube import load_cube
from controller.errors import CubeError
from controller.taskargs import (
    apply_param_overrides,
    check_inputs,
    overrides_for,
    parse_param_overrides,
    prepare_outputs,
    split_tasks,
    task_argv,
)
from tests.conftest import REPO
from tests.test_cube import MLCUBE, make_cube


@pytest.fixture
def demo(tmp_path):
    return load_cube(make_cube(tmp_path))


def copy_cube(name: str, tmp_path: Path) -> Path:
    src = REPO / "cubes" / name if name == "hello" else REPO / "tests" / "cubes" / name
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def params(cube, task, overrides=None):
    """The task's parameters with overrides applied, as the job plan resolves them."""
    return apply_param_overrides(cube, task, overrides or {})


def test_argv_is_entry_task_then_inputs_then_outputs(demo):
    ws = demo.workspace
    assert task_argv(demo, "train") == [
        "python3", "main.py", "train", f"--data={ws / 'data'}", f"--config={ws / 'train.yaml'}",
        f"--model={ws / 'model'}"]


def test_argv_without_entry_is_what_follows_an_image_entrypoint(tmp_path):
    mlcube = MLCUBE.replace("  prep:\n", "  prep:\n    entrypoint: /app/main.py\n")
    cube = load_cube(make_cube(tmp_path, mlcube))
    assert task_argv(cube, "train", with_entry=False)[0] == "train"
    assert task_argv(cube, "prep", with_entry=False) == [f"--raw={cube.workspace / 'raw.txt'}",
                                                         f"--data={cube.workspace / 'data'}"]


def test_path_for_rewrites_every_path(demo):
    argv = task_argv(demo, "prep", path_for=lambda p: f"/mnt/{p.io}/{p.rel}")
    assert argv[-2:] == ["--raw=/mnt/input/raw.txt", "--data=/mnt/output/data"]


def test_task_entrypoint_replaces_entry_and_task_name(tmp_path):
    mlcube = MLCUBE.replace("  prep:\n", "  prep:\n    entrypoint: /app/main.py --fast\n")
    cube = load_cube(make_cube(tmp_path, mlcube))
    assert task_argv(cube, "prep")[:4] == ["python3", "main.py", "--fast",
                                          f"--raw={cube.workspace / 'raw.txt'}"]
    assert task_argv(cube, "train")[:3] == ["python3", "main.py", "train"]


def test_param_override_resolves_against_the_workspace(demo, tmp_path):
    argv = task_argv(demo, "train", params(demo, "train", {"data": "other/", "model": str(tmp_path / "m")}))
    assert f"--data={demo.workspace / 'other'}" in argv
    assert argv[-1] == f"--model={tmp_path / 'm'}"
    model = apply_param_overrides(demo, "train", {"model": str(tmp_path / "m")})[-1]
    assert model.type == "directory" and model.rel is None and model.opts is None


def test_override_keeps_declared_type_and_reinfers_an_inferred_one(demo, tmp_path):
    (tmp_path / "rawdir").mkdir()
    [raw, _] = apply_param_overrides(demo, "prep", {"raw": str(tmp_path / "rawdir")})
    assert raw.type == "directory"  # raw.txt was inferred as a file; the override is a folder
    [_, config, _] = apply_param_overrides(demo, "train", {"config": str(tmp_path / "rawdir")})
    assert config.type == "file" and config.opts == "ro"  # declared with type: file


def test_unknown_param_override_lists_valid_names(demo):
    with pytest.raises(CubeError) as info:
        task_argv(demo, "train", params(demo, "train", {"modle": "x"}))
    assert info.value.message == "Task 'train' of cube 'demo' has no parameter 'modle'."
    assert info.value.hint == "Valid parameters: config, data, model."


def test_empty_override_value_is_refused(demo):
    with pytest.raises(CubeError, match="empty path"):
        task_argv(demo, "train", params(demo, "train", {"model": ""}))


def test_parse_param_overrides_splits_on_the_first_equals():
    assert parse_param_overrides(["a=x=y", "b=/p"]) == {"a": "x=y", "b": "/p"}
    with pytest.raises(CubeError) as info:
        parse_param_overrides(["data_dir"])
    assert "name=path" in info.value.hint


def test_overrides_for_a_multi_task_run_go_to_tasks_that_have_them(demo):
    split = overrides_for(demo, ["prep", "train"], {"data": "d/", "model": "m/"})
    assert split == {"prep": {"data": "d/"}, "train": {"data": "d/", "model": "m/"}}
    with pytest.raises(CubeError) as info:
        overrides_for(demo, ["prep"], {"model": "m/"})
    assert "no parameter 'model'" in info.value.message and "data, raw" in info.value.hint


def test_split_tasks_validates_names_and_keeps_order(demo):
    assert split_tasks("train, prep", demo) == ["train", "prep"]
    with pytest.raises(CubeError) as info:
        split_tasks("prep,trian", demo)
    assert "no task 'trian'" in str(info.value) and info.value.hint == "Valid tasks: prep, train."
    with pytest.raises(CubeError, match="No task given"):
        split_tasks(" , ", demo)


def test_prepare_outputs_makes_folders_and_parents_of_files(tmp_path):
    mlcube = MLCUBE.replace("{type: directory, default: model}",
                            "{type: file, default: out/model.keras}")
    cube = load_cube(make_cube(tmp_path, mlcube))
    made = prepare_outputs(params(cube, "train"))
    assert made == [cube.workspace / "out"]
    assert (cube.workspace / "out").is_dir() and not (cube.workspace / "out/model.keras").exists()
    prepare_outputs(params(cube, "prep", {"data": "deep/er/data/"}))
    assert (cube.workspace / "deep/er/data").is_dir()


def test_prepare_outputs_under_another_root_skips_outside_paths(demo, tmp_path):
    job = tmp_path / "job"
    made = prepare_outputs(params(demo, "prep"), root=job)
    assert made == [job / "data"] and (job / "data").is_dir()
    assert not (demo.workspace / "data").exists()
    assert prepare_outputs(params(demo, "prep", {"data": str(tmp_path / "abs/")}), root=job) == []


def test_missing_input_names_param_path_and_producing_task(demo):
    with pytest.raises(CubeError) as info:
        check_inputs(demo, "train", params(demo, "train"))
    assert info.value.message == (f"Input 'data' of task 'train' does not exist: "
                                  f"{demo.workspace / 'data'}")
    assert info.value.hint == "Task 'prep' writes it: run it first (--task prep,train)."


def test_missing_input_without_producer_suggests_an_override(demo):
    with pytest.raises(CubeError) as info:
        check_inputs(demo, "prep", params(demo, "prep"))
    assert "'raw'" in info.value.message and "raw=PATH" in info.value.hint


def test_input_of_the_wrong_kind_is_refused(demo):
    (demo.workspace / "data").parent.mkdir(parents=True, exist_ok=True)
    (demo.workspace / "data").write_text("not a folder")
    (demo.workspace / "train.yaml").write_text("a: 1\n")
    with pytest.raises(CubeError, match="must be a directory"):
        check_inputs(demo, "train", params(demo, "train"))
    (demo.workspace / "data").unlink()
    (demo.workspace / "data").mkdir()
    check_inputs(demo, "train", params(demo, "train"))
    with pytest.raises(CubeError, match="must be a file"):
        check_inputs(demo, "train", params(demo, "train", {"config": "data"}))


@pytest.mark.parametrize("name, tasks, expect", [
    ("hello", ["greet", "summarize"], ("report/summary.txt", "3 greetings: Ada, Grace, Linus")),
    ("legacy", ["download", "train"], ("model/model.txt", "3.875")),
])
def test_example_cubes_run_with_the_argv_cube_builds(tmp_path, name, tasks, expect):
    cube = load_cube(copy_cube(name, tmp_path))
    for task in tasks:
        check_inputs(cube, task, params(cube, task))
        prepare_outputs(params(cube, task))
        argv = task_argv(cube, task)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=cube.root, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
    out_file, text = expect
    assert (cube.workspace / out_file).read_text().strip() == text
