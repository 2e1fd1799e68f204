"""The cube model: loading, path resolution, environments, runtime choice and every config
error as the user sees it (file, field, line, hint)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cube import apply_config_overrides, load_cube
from controller.environment import choose_runtime
from controller.errors import ConfigError, CubeError
from controller.yamlsource import line_of, yaml_line_map
from tests.conftest import REPO

HELLO = REPO / "cubes" / "hello"
LEGACY = REPO / "tests" / "cubes" / "legacy"

MLCUBE = """\
name: demo
description: a demo cube
tasks:
  prep:
    parameters:
      inputs: {raw: raw.txt}
      outputs: {data: data/}
  train:
    parameters:
      inputs:
        data: data/
        config: {type: file, default: train.yaml, opts: ro}
      outputs:
        model: {type: directory, default: model}
"""
METADATA = """\
framework:
  name: none
  runtime: python3.11
entry_point: main.py
"""


def make_cube(tmp_path: Path, mlcube: str = MLCUBE, metadata: str | None = METADATA,
              files: dict[str, str] | None = None) -> Path:
    root = tmp_path / "demo"
    root.mkdir(exist_ok=True)
    (root / "mlcube.yaml").write_text(textwrap.dedent(mlcube))
    if metadata is not None:
        (root / "metadata.yaml").write_text(textwrap.dedent(metadata))
    (root / "main.py").write_text("print('hi')\n")
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def config_error(root: Path, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_cube(root, **kw)
    return info.value


# ------------------------------------------------------------------------------ loading

def test_hello_cube_loads_with_its_two_tasks_and_resolved_paths():
    cube = load_cube(HELLO)
    assert cube.name == "hello" and list(cube.tasks) == ["greet", "summarize"]
    assert cube.workspace == HELLO / "workspace"
    names, greetings = cube.tasks["greet"].params
    assert (names.io, names.type, names.opts, names.rel) == ("input", "file", "ro", "names.yaml")
    assert names.path == HELLO / "workspace" / "names.yaml" and names.path.is_file()
    assert (greetings.io, greetings.type, greetings.rel) == ("output", "directory", "greetings")
    assert cube.env.entry == ["python3", "hello.py"] and cube.env.requirements == []
    assert cube.warnings == []


def test_params_list_inputs_first_then_outputs(tmp_path):
    mlcube = MLCUBE.replace("inputs: {raw: raw.txt}\n      outputs: {data: data/}",
                            "outputs: {data: data/}\n      inputs: {raw: raw.txt}")
    cube = load_cube(make_cube(tmp_path, mlcube))
    assert [(p.name, p.io) for p in cube.tasks["prep"].params] == [("raw", "input"),
                                                                   ("data", "output")]


def test_untyped_params_follow_mlcube_rules(tmp_path):
    root = make_cube(tmp_path, """\
        name: demo
        tasks:
          t:
            parameters:
              inputs: {slash: a/, existing: present, absent: nothing.bin}
              outputs: {out_file: model, out_dir: present_out, out_slash: logs/}
        """)
    (root / "workspace" / "present").mkdir(parents=True)
    (root / "workspace" / "present_out").mkdir()
    types = {p.name: p.type for p in load_cube(root).tasks["t"].params}
    assert types == {"slash": "directory", "existing": "directory", "absent": "file",
                     "out_file": "file", "out_dir": "directory", "out_slash": "directory"}


def test_paths_outside_the_workspace_have_no_rel(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = make_cube(tmp_path, f"""\
        name: demo
        tasks:
          t:
            parameters:
              inputs: {{home: ~/data/, abs: {tmp_path}/elsewhere.txt, up: ../up.txt}}
              outputs: {{inside: {tmp_path}/demo/workspace/out/}}
        """)
    params = {p.name: p for p in load_cube(root).tasks["t"].params}
    assert params["home"].path == tmp_path / "home" / "data" and params["home"].rel is None
    assert params["abs"].path == tmp_path / "elsewhere.txt" and params["abs"].rel is None
    assert params["up"].path == root / "up.txt" and params["up"].rel is None
    assert params["inside"].rel == "out"


def test_workspace_option_moves_every_relative_path(tmp_path):
    root = make_cube(tmp_path)
    cube = load_cube(root, workspace=tmp_path / "ws")
    assert cube.workspace == tmp_path / "ws"
    assert cube.tasks["prep"].params[0].path == tmp_path / "ws" / "raw.txt"


def test_config_overrides_change_the_raw_config_before_validation(tmp_path):
    root = make_cube(tmp_path, MLCUBE + "docker: {image: a:1}\n")
    cube = load_cube(root, config_overrides=["docker.image=b:2", "platform.accelerator_count=1"])
    assert cube.docker["image"] == "b:2" and cube.platform == {"accelerator_count": 1}
    assert cube.config["docker"]["image"] == "b:2"


def test_apply_config_overrides_types_values_and_leaves_the_input_alone():
    raw = {"docker": {"image": "a"}}
    out = apply_config_overrides(raw, {"docker.cpus": "2", "docker.env.X": "yes", "name": "n"})
    assert out == {"docker": {"image": "a", "cpus": 2, "env": {"X": True}}, "name": "n"}
    assert raw == {"docker": {"image": "a"}}


def test_malformed_config_override_says_how_to_write_it():
    with pytest.raises(CubeError, match="not of the form KEY=VALUE") as info:
        apply_config_overrides({}, ["docker.image"])
    assert "-P docker.image=" in info.value.hint


# ------------------------------------------------------------------------------- errors

def test_missing_mlcube_yaml_names_the_file_and_the_fix(tmp_path):
    err = config_error(tmp_path)
    assert "mlcube.yaml" in str(err) and "is not a cube" in str(err)
    assert "holds mlcube.yaml" in err.hint


def test_missing_cube_folder_is_reported(tmp_path):
    err = config_error(tmp_path / "nope")
    assert "does not exist" in str(err) and str(tmp_path / "nope") in str(err)


def test_bad_yaml_reports_the_parser_line(tmp_path):
    root = make_cube(tmp_path, "name: demo\ntasks:\n  t:\n    parameters: {inputs: [\n\nx: 1\n")
    err = config_error(root)
    assert err.line is not None and err.line >= 5
    assert f"mlcube.yaml:{err.line}" in str(err) and "not valid YAML" in str(err)
    assert "YAML syntax" in err.hint


def test_bad_yaml_in_metadata_names_metadata_yaml(tmp_path):
    root = make_cube(tmp_path, metadata="framework:\n  name: x\n runtime: python3\n")
    err = config_error(root)
    assert err.file == root / "metadata.yaml" and err.line == 3


def test_top_level_list_is_refused(tmp_path):
    err = config_error(make_cube(tmp_path, "- a\n- b\n"))
    assert "must be a YAML mapping" in str(err)


def test_missing_name_is_reported_with_the_fix(tmp_path):
    err = config_error(make_cube(tmp_path, MLCUBE.replace("name: demo\n", "")))
    assert err.field == "name" and "name: my-cube" in err.hint


def test_missing_task_lists_the_valid_tasks(tmp_path):
    cube = load_cube(make_cube(tmp_path))
    with pytest.raises(ConfigError) as info:
        cube.task("trian")
    assert "has no task 'trian'" in str(info.value) and "mlcube.yaml" in str(info.value)
    assert info.value.hint == "Valid tasks: prep, train."


def test_wrong_param_type_names_field_line_and_valid_types(tmp_path):
    err = config_error(make_cube(tmp_path, MLCUBE.replace("type: directory", "type: folder")))
    assert err.field == "tasks.train.parameters.outputs.model.type"
    assert err.line == 14 and "mlcube.yaml:14" in str(err)
    assert "unknown type 'folder'" in str(err) and err.hint == "Valid types: file, directory."


def test_wrong_opts_lists_ro_and_rw(tmp_path):
    err = config_error(make_cube(tmp_path, MLCUBE.replace("opts: ro", "opts: readonly")))
    assert err.field == "tasks.train.parameters.inputs.config.opts" and err.line == 12
    assert "ro, rw" in err.hint


def test_tasks_must_be_a_mapping(tmp_path):
    err = config_error(make_cube(tmp_path, "name: demo\ntasks:\n  - train\n  - prep\n"))
    assert err.field == "tasks" and err.line == 2 and "must be a mapping" in str(err)


def test_no_tasks_is_an_error(tmp_path):
    err = config_error(make_cube(tmp_path, "name: demo\n"))
    assert err.field == "tasks" and "defines no tasks" in str(err)


def test_param_without_default_says_to_add_one(tmp_path):
    err = config_error(make_cube(tmp_path, MLCUBE.replace("default: model}", "opts: rw}")))
    assert err.field == "tasks.train.parameters.outputs.model.default"
    assert "default: model/" in err.hint


def test_param_with_a_misspelled_key_is_refused(tmp_path):
    err = config_error(make_cube(tmp_path, MLCUBE.replace("type: directory", "typ: directory")))
    assert err.field == "tasks.train.parameters.outputs.model.typ" and err.line == 14
    assert "'type', 'default' and 'opts'" in err.hint


def test_param_that_is_a_number_is_refused(tmp_path):
    err = config_error(make_cube(tmp_path, MLCUBE.replace("raw: raw.txt", "raw: 3")))
    assert err.field == "tasks.prep.parameters.inputs.raw" and "not a number" in str(err)


def test_unknown_top_level_key_warns_with_a_suggestion(tmp_path):
    cube = load_cube(make_cube(tmp_path, MLCUBE + "dokcer: {image: x}\n"))
    [warning] = cube.warnings
    assert "mlcube.yaml:15" in warning and "unknown top-level key 'dokcer'" in warning
    assert "Did you mean 'docker'?" in warning


def test_docker_section_needs_an_image_and_plain_env_values(tmp_path):
    err = config_error(make_cube(tmp_path, MLCUBE + "docker:\n  build_file: Dockerfile\n"))
    assert err.field == "docker.image" and err.line == 15 and "image:" in err.hint
    err = config_error(make_cube(tmp_path, MLCUBE + "docker:\n  image: x\n  env:\n"
                                                    "    A: 1\n    B: [1]\n"))
    assert err.field == "docker.env.B" and err.line == 19
    cube = load_cube(make_cube(tmp_path, MLCUBE + "docker: {image: x, env: {A: 1}, cpus: 2}\n"))
    assert cube.docker == {"image": "x", "env": {"A": 1}, "cpus": 2}


def test_accelerator_count_must_be_a_whole_number(tmp_path):
    err = config_error(make_cube(tmp_path, MLCUBE + "platform: {accelerator_count: many}\n"))
    assert err.field == "platform.accelerator_count" and "whole number" in str(err)


def test_yaml_line_map_maps_dotted_paths_and_parents():
    lines = yaml_line_map("a:\n  b:\n    - x\n    - {c: 1}\n")
    assert lines == {"a": 1, "a.b": 2, "a.b.0": 3, "a.b.1": 4, "a.b.1.c": 4}
    assert line_of(lines, "a.b.7.zzz") == 2 and line_of(lines, "nope") is None


# ------------------------------------------------------------------------ environment

def test_metadata_runtime_string_sets_the_python_version(tmp_path):
    env = load_cube(make_cube(tmp_path)).env
    assert (env.runtime_name, env.python_version) == ("python", "3.11")
    assert env.entry == ["python3", "main.py"] and env.entry_source == "metadata.yaml entry_point"


def test_requirements_merge_runtime_list_file_and_pinned_framework(tmp_path):
    root = make_cube(tmp_path, metadata="""\
        framework:
          name: tensorflow
          version: "2.16"
          runtime: {name: python3.11, requirement: [numpy, pyyaml]}
        entry_point: main.py
        """, files={"requirements.txt": "# deps\n\npillow>=10  # images\nnumpy\n--index-url x\n"})
    env = load_cube(root).env
    assert env.requirements == ["numpy", "pyyaml", "pillow>=10", "tensorflow==2.16.*"]
    assert env.requirements_file == "requirements.txt"


def test_requirements_file_follows_dash_r(tmp_path):
    root = make_cube(tmp_path, files={"requirements.txt": "-r base.txt\nrich\n",
                                      "base.txt": "numpy  # base\n-r requirements.txt\n"})
    assert load_cube(root).env.requirements == ["numpy", "rich"]
    (root / "base.txt").unlink()
    err = config_error(root)
    assert err.file == root / "requirements.txt" and "base.txt does not exist" in str(err)


def test_framework_is_not_added_when_already_listed_by_name(tmp_path):
    root = make_cube(tmp_path, metadata="""\
        framework: {name: tensorflow, version: 2.16.1, runtime: python3}
        entry_point: main.py
        """, files={"requirements.txt": "Tensorflow_CPU==2.16.1\n"})
    assert load_cube(root).env.requirements == ["Tensorflow_CPU==2.16.1"]
    (root / "requirements.txt").write_text("numpy\n")
    assert load_cube(root).env.requirements == ["numpy", "tensorflow==2.16.1"]


def test_framework_version_keeps_its_written_digits(tmp_path):
    root = make_cube(tmp_path, metadata="framework: {name: tensorflow, version: 2.10, "
                                        "runtime: python3}\nentry_point: main.py\n")
    env = load_cube(root).env
    assert env.framework["version"] == "2.10" and env.requirements == ["tensorflow==2.10.*"]


def test_unknown_interpreter_is_a_config_error(tmp_path):
    err = config_error(make_cube(tmp_path, metadata="framework: {runtime: ruby3}\n"
                                                    "entry_point: main.py\n"))
    assert err.field == "framework.runtime" and err.line == 1 and "python3.X" in err.hint


def test_unknown_metadata_runtime_lists_valid_runtimes(tmp_path):
    err = config_error(make_cube(tmp_path, metadata=METADATA + "runtime: conda\n"))
    assert err.field == "runtime" and err.line == 5
    assert err.hint == "Valid runtimes: python, docker, podman."


def test_entry_point_that_is_not_in_the_cube_is_an_error(tmp_path):
    err = config_error(make_cube(tmp_path, metadata=METADATA.replace("main.py", "train.py")))
    assert err.field == "entry_point" and "'train.py'" in str(err) and err.line == 4


def test_missing_user_playbook_names_its_index(tmp_path):
    root = make_cube(tmp_path, metadata=METADATA + "playbooks: [setup.yaml, gone.yaml]\n",
                     files={"setup.yaml": "name: s\nsteps: []\n"})
    err = config_error(root)
    assert err.field == "playbooks.1" and "gone.yaml" in str(err)
    (root / "gone.yaml").write_text("name: g\nsteps: []\n")
    assert load_cube(root).env.playbooks == ["setup.yaml", "gone.yaml"]


def test_unknown_metadata_key_warns(tmp_path):
    cube = load_cube(make_cube(tmp_path, metadata=METADATA + "entry_piont: x.py\n"))
    assert any("metadata.yaml:5" in w and "entry_point" in w for w in cube.warnings)


# ----------------------------------------------------------------------- legacy cubes

def test_legacy_cube_takes_entry_from_the_dockerfile_and_requirements_txt():
    cube = load_cube(LEGACY)
    assert cube.metadata_file is None
    assert cube.env.entry == ["python3", "legacy.py"]
    assert cube.env.entry_source == "Dockerfile:10 ENTRYPOINT"
    assert cube.env.requirements == [] and cube.env.requirements_file == "requirements.txt"
    assert cube.env.runtime == "python" and "Dockerfile" in cube.env.runtime_reason


def test_legacy_entry_maps_a_script_in_a_subfolder_and_shell_form(tmp_path):
    root = make_cube(tmp_path, MLCUBE, metadata=None, files={
        "src/run.py": "", "requirements.txt": "numpy==1.26.4\n",
        "Dockerfile": "FROM x\nENTRYPOINT python3 \\\n  /opt/app/run.py --verbose\n"})
    env = load_cube(root).env
    assert env.entry == ["python3", "src/run.py", "--verbose"]
    assert env.requirements == ["numpy==1.26.4"] and env.entry_source == "Dockerfile:2 ENTRYPOINT"


def test_legacy_entry_skips_python_options_and_keeps_image_commands(tmp_path):
    root = make_cube(tmp_path, MLCUBE + "docker: {image: x}\n", metadata=None, files={
        "Dockerfile": 'ENTRYPOINT ["/usr/bin/python3", "-u", "/w/main.py", "-v"]\n'})
    assert load_cube(root).env.entry == ["python3", "-u", "main.py", "-v"]
    (root / "Dockerfile").write_text('ENTRYPOINT ["/bin/bash", "/opt/start.sh"]\n')
    cube = load_cube(root)
    assert cube.env.entry == ["/bin/bash", "/opt/start.sh"] and cube.env.runtime == "docker"


def test_legacy_dockerfile_from_build_context(tmp_path):
    root = make_cube(tmp_path, MLCUBE + "docker: {image: x, build_context: build, "
                                        "build_file: Dockerfile.cpu}\n", metadata=None,
                     files={"build/Dockerfile.cpu": 'ENTRYPOINT ["python", "/w/main.py"]\n'})
    assert load_cube(root).env.entry == ["python", "main.py"]


def test_legacy_entry_script_missing_names_the_dockerfile(tmp_path):
    root = make_cube(tmp_path, metadata=None, files={
        "Dockerfile": 'FROM x\n\nENTRYPOINT ["python3", "/workspace/mnist.py"]\n'})
    err = config_error(root)
    assert err.file == root / "Dockerfile" and err.line == 3 and err.field == "ENTRYPOINT"
    assert "no file named 'mnist.py'" in str(err) and "metadata.yaml" in err.hint


def test_legacy_entrypoint_that_is_not_json_is_an_error(tmp_path):
    root = make_cube(tmp_path, metadata=None, files={"Dockerfile": "ENTRYPOINT [python3, x]\n"})
    err = config_error(root)
    assert err.line == 1 and "exec form" in err.hint


def test_cube_with_no_way_to_run_says_to_add_metadata(tmp_path):
    err = config_error(make_cube(tmp_path, metadata=None))
    assert err.file.name == "metadata.yaml" and "entry_point" in err.hint


def test_task_entrypoint_is_mapped_and_a_missing_one_is_an_error(tmp_path):
    mlcube = MLCUBE.replace("  prep:\n", "  prep:\n    entrypoint: python3 /app/main.py\n")
    assert load_cube(make_cube(tmp_path, mlcube)).tasks["prep"].entry == ["python3", "main.py"]
    err = config_error(make_cube(tmp_path, mlcube.replace("/app/main.py", "/app/other.py")))
    assert err.field == "tasks.prep.entrypoint" and err.line == 5 and "other.py" in str(err)


# --------------------------------------------------------------------- runtime choice

def test_runtime_choice_order(tmp_path):
    root = make_cube(tmp_path, MLCUBE + "docker: {image: x}\n")
    cube = load_cube(root)
    assert choose_runtime(cube, None) == ("python",
                                          "metadata.yaml declares a python framework.runtime")
    assert choose_runtime(cube, "docker") == ("docker", "chosen with --runtime docker")
    (root / "metadata.yaml").write_text(METADATA + "runtime: docker\n")
    assert load_cube(root).env.runtime == "docker"
    assert "runtime: docker" in load_cube(root).env.runtime_reason
    assert load_cube(root, requested_runtime="python").env.runtime == "python"


def test_docker_only_when_there_is_no_python_entry(tmp_path):
    root = make_cube(tmp_path, MLCUBE + "docker: {image: x}\n", metadata=None)
    cube = load_cube(root)
    assert cube.env.entry == [] and cube.env.runtime == "docker"
    assert "no python entry point" in cube.env.runtime_reason
    with pytest.raises(ConfigError, match="no python entry point") as info:
        choose_runtime(cube, "python")
    assert "--runtime docker" in info.value.hint


def test_unknown_or_impossible_requested_runtime(tmp_path):
    cube = load_cube(make_cube(tmp_path))
    with pytest.raises(CubeError) as info:
        choose_runtime(cube, "conda")
    assert str(info.value.message) == "Unknown runtime 'conda'."
    with pytest.raises(ConfigError) as info:
        choose_runtime(cube, "docker")
    assert info.value.field == "docker" and "--runtime python" in info.value.hint


# -------------------------------------------------------------------------- env hash

def test_env_hash_is_stable_and_ignores_requirement_order(tmp_path):
    root = make_cube(tmp_path, files={"requirements.txt": "numpy\npyyaml\n"})
    first = load_cube(root).env.env_hash()
    assert len(first) == 16 and int(first, 16) >= 0
    assert load_cube(root).env.env_hash() == first
    (root / "requirements.txt").write_text("pyyaml\n# reordered\nnumpy\n")
    assert load_cube(root).env.env_hash() == first


def test_env_hash_changes_with_requirements_interpreter_and_framework(tmp_path):
    root = make_cube(tmp_path, files={"requirements.txt": "numpy\n"})
    base = load_cube(root).env
    hashes = {base.env_hash(), base.env_hash("3.12")}
    (root / "requirements.txt").write_text("numpy==2.0\n")
    hashes.add(load_cube(root).env.env_hash())
    (root / "metadata.yaml").write_text(METADATA.replace("python3.11", "python3.12"))
    hashes.add(load_cube(root).env.env_hash())
    (root / "metadata.yaml").write_text(METADATA.replace("name: none", "name: jax"))
    hashes.add(load_cube(root).env.env_hash())
    assert len(hashes) == 5
    assert base.env_hash("3.11") == base.env_hash()  # declared 3.11 == actual 3.11


def test_env_hash_ignores_the_entry_point(tmp_path):
    root = make_cube(tmp_path, files={"other.py": ""})
    before = load_cube(root).env.env_hash()
    (root / "metadata.yaml").write_text(METADATA.replace("main.py", "other.py"))
    assert load_cube(root).env.env_hash() == before


# -------------------------------------------------------------------------------- CLI

def cli(*args: str):
    from controller.cli import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


def test_cli_describe_shows_tasks_paths_and_environment():
    result = cli("describe", str(HELLO))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "task greet" in out and "task summarize" in out
    assert str(HELLO / "workspace" / "names.yaml") in out and "ro" in out
    assert "python (metadata.yaml declares a python framework.runtime)" in out
    from controller.runtimes.python import local_env_dir

    # the hash a local run uses: keyed on the interpreter found here, as on hosts
    assert local_env_dir(load_cube(HELLO)).name in out
    assert "python3 hello.py greet --names=" in out


def test_cli_describe_json_with_overrides_and_task_filter(tmp_path):
    result = cli("describe", str(LEGACY), "--task", "train", "--json",
                 "--workspace", str(tmp_path), "model_dir=/tmp/m", "-P", "docker.image=y:2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    [task] = data["tasks"]
    params = {p["name"]: p for p in task["params"]}
    assert task["name"] == "train" and params["model_dir"]["path"] == "/tmp/m"
    assert params["data_dir"]["path"] == str(tmp_path / "data")
    assert data["environment"]["entry"] == ["python3", "legacy.py"]
    assert data["environment"]["runtime"] == "python"


def test_cli_validate_ok_and_warnings(tmp_path):
    assert cli("validate", str(HELLO)).output == "ok: hello (2 tasks)\n"
    root = make_cube(tmp_path, MLCUBE + "taks: {}\n")
    result = cli("validate", str(root))
    assert result.exit_code == 0 and "warning:" in result.output and "'tasks'" in result.output


def test_cli_describe_lists_warnings_and_validate_json(tmp_path):
    root = make_cube(tmp_path, MLCUBE + "platfrom: {}\n")
    assert "warnings\n" in cli("describe", str(root)).output
    data = json.loads(cli("validate", str(root), "--json").output)
    assert data["ok"] and data["tasks"] == ["prep", "train"] and "'platform'" in data["warnings"][0]


def test_cli_validate_error_exits_2_with_file_field_and_hint(tmp_path):
    root = make_cube(tmp_path, MLCUBE.replace("type: directory", "type: folder"))
    proc = subprocess.run([sys.executable, "-c", "from controller.cli import main; main()",
                           "validate", str(root)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {root / 'mlcube.yaml'}:14: field 'tasks.train.parameters.outputs.model.type'" \
        in proc.stderr
    assert "hint: Valid types: file, directory." in proc.stderr


def test_cli_unknown_param_override_is_refused():
    result = cli("describe", str(HELLO), "nmaes=x.yaml")
    assert isinstance(result.exception, CubeError)
    assert "no parameter 'nmaes'" in str(result.exception)
    assert "greetings_dir, names, summary" in str(result.exception)


def test_example_cubes_are_tracked_with_their_inputs():
    # The README runs cubes/hello from a clean clone, so its input must be committed.
    tracked = subprocess.run(["git", "ls-files", "cubes/hello", "tests/cubes/legacy"],
                             cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for need in ("cubes/hello/workspace/names.yaml", "cubes/hello/hello.py",
                 "tests/cubes/legacy/workspace/data.yaml", "tests/cubes/legacy/Dockerfile"):
        assert need in tracked
