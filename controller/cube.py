"""The cube model: load and validate a cube folder (mlcube.yaml + optional metadata.yaml).

mlcube.yaml follows MLCube's schema (tasks and their file/dir parameters); metadata.yaml follows
MOO's (framework, runtime, requirements, entry point). A cube without metadata.yaml still loads:
its entry point comes from the Dockerfile's ENTRYPOINT and its requirements from
requirements.txt, so published MLCube cubes run unchanged.

Every error is a ConfigError naming the file, the dotted field, the YAML line and the fix.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller.entrypoint import is_python, map_command

# Re-exported: these lived here before the environment and YAML helpers had their own modules.
from controller.environment import (  # noqa: F401
    FRAMEWORK_PACKAGES,
    METADATA_FILE,
    METADATA_KEYS,
    PYTHON_NAMES,
    RUNTIMES,
    choose_runtime,
    load_environment,
    read_requirements,
    requirement_name,
)
from controller.errors import ConfigError, CubeError
from controller.yamlsource import (  # noqa: F401
    Source,
    kind_of,
    line_of,
    mapping_field,
    optional_str,
    unknown_key_warnings,
    yaml_line_map,
)

MLCUBE_FILE = "mlcube.yaml"
PARAM_TYPES = ("file", "directory")
PARAM_OPTS = ("ro", "rw")
# MLCube's own top-level sections (platform runners included) are known; anything else warns.
MLCUBE_KEYS = ("name", "description", "authors", "platform", "docker", "singularity", "tasks",
               "ssh", "gcp", "k8s", "kubeflow", "runner", "workspace")

# ---------------------------------------------------------------------------------- data model

@dataclass
class Param:
    name: str
    io: str                   # "input" | "output"
    type: str                 # "file" | "directory"
    path: Path                # absolute
    rel: str | None           # relative to the workspace; None when outside it
    opts: str | None = None   # "ro" | "rw" | None
    explicit_type: bool = False  # fixed by `type:` or a trailing '/'; else re-inferred on override


@dataclass
class Task:
    name: str
    entrypoint: str | None    # MLCube's per-task override: replaces entry AND the task name
    params: list[Param]       # inputs first, then outputs
    entry: list[str] | None = None  # entrypoint mapped to the cube's files (None: cube's entry)

    @property
    def inputs(self) -> list[Param]:
        return [p for p in self.params if p.io == "input"]

    @property
    def outputs(self) -> list[Param]:
        return [p for p in self.params if p.io == "output"]

    def param_names(self) -> list[str]:
        return sorted({p.name for p in self.params})


@dataclass
class Environment:
    runtime_name: str = "python"           # interpreter family
    python_version: str | None = None      # "3.11", "3" or None = any
    framework: dict = field(default_factory=lambda: {"name": None, "version": None})
    requirements: list[str] = field(default_factory=list)
    entry: list[str] = field(default_factory=list)  # argv prefix, paths relative to cube root
    entry_source: str = ""                  # where entry came from, for `cube describe`
    runtime: str = "python"                 # default runtime for this cube
    runtime_reason: str = ""
    playbooks: list[str] = field(default_factory=list)  # relative to the cube root
    requirements_file: str | None = None
    metrics_file: str | None = None        # metadata `metrics:`: workspace-relative JSON output

    def env_hash(self, interpreter_version: str | None = None) -> str:
        """Key of a provisioned environment: sha256 over the JSON of (interpreter version,
        framework name and version, sorted requirements, interpreter family), first 16 hex.

        `interpreter_version` is the version of the interpreter actually used (e.g. "3.11");
        without it the declared `python_version` is used. Entry point and playbooks are not
        part of it: changing code must not rebuild a venv."""
        key = {
            "python": interpreter_version or self.python_version or "",
            "framework": [self.framework.get("name") or "", str(self.framework.get("version") or "")],
            "requirements": sorted(self.requirements),
            "runtime": self.runtime_name,
        }
        blob = json.dumps(key, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def has_python_entry(self) -> bool:
        return bool(self.entry) and is_python(self.entry[0])

    def entry_for(self, python: str) -> list[str]:
        """The entry argv with its interpreter replaced by `python` (a venv's interpreter)."""
        if self.has_python_entry():
            return [python, *self.entry[1:]]
        return list(self.entry)


@dataclass
class Cube:
    name: str
    root: Path
    workspace: Path
    description: str
    platform: dict
    docker: dict
    tasks: dict[str, Task]
    env: Environment
    warnings: list[str]
    config: dict                   # raw mlcube.yaml after -P overrides
    metadata: dict = field(default_factory=dict)
    authors: list = field(default_factory=list)
    mlcube_file: Path | None = None
    metadata_file: Path | None = None  # None when the cube has no metadata.yaml

    def task(self, name: str) -> Task:
        if name not in self.tasks:
            raise ConfigError(self.mlcube_file, f"Cube '{self.name}' has no task '{name}'.",
                              f"Valid tasks: {', '.join(self.tasks)}.", field=f"tasks.{name}")
        return self.tasks[name]


def apply_config_overrides(config: dict, overrides) -> dict:
    """`-P docker.image=x` style overrides on a copy of the raw config. Dotted keys make
    missing mappings; values are YAML-typed (`platform.accelerator_count=1` is an int)."""
    items = overrides.items() if isinstance(overrides, dict) else (
        split_override(o, "-P") for o in overrides)
    out = copy.deepcopy(config)
    for key, value in items:
        node = out
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = yaml.safe_load(value) if isinstance(value, str) and value != "" else value
    return out


def split_override(item: str, what: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise CubeError(f"Override '{item}' is not of the form KEY=VALUE.",
                        f"Write it as {what} docker.image=my/image:tag." if what == "-P"
                        else "Write a parameter override as name=path, e.g. data_dir=/data.")
    return key.strip(), value


# ------------------------------------------------------------------------------------ loading

def load_cube(path, workspace: Path | None = None, config_overrides=None,
              requested_runtime: str | None = None) -> Cube:
    """Load and validate the cube at `path` (a folder or its mlcube.yaml)."""
    root = Path(path).expanduser().resolve()
    if root.is_file() and root.name == MLCUBE_FILE:
        root = root.parent
    mlcube_file = root / MLCUBE_FILE
    if not mlcube_file.is_file():
        raise _missing_cube(path, root)
    src = Source(mlcube_file)
    config = apply_config_overrides(src.data, config_overrides or {})
    src.data = config
    ws = Path(workspace).expanduser() if workspace else root / "workspace"
    ws = Path(os.path.abspath(ws if ws.is_absolute() else Path.cwd() / ws))
    warnings = unknown_key_warnings(src, MLCUBE_KEYS)
    cube = Cube(
        name=str(_str_field(src, "name", required=True)), root=root, workspace=ws,
        description=_str_field(src, "description") or "",
        platform=_platform(src), docker=_docker(src),
        tasks=_load_tasks(src, ws), env=Environment(), warnings=warnings, config=config,
        authors=config.get("authors") or [], mlcube_file=mlcube_file)
    load_environment(cube)
    _map_task_entrypoints(cube, src)
    cube.env.runtime, cube.env.runtime_reason = choose_runtime(cube, requested_runtime)
    return cube


def _map_task_entrypoints(cube: Cube, src: Source) -> None:
    for task in cube.tasks.values():
        if not task.entrypoint:
            continue
        fld = f"tasks.{task.name}.entrypoint"
        task.entry = map_command(cube, shlex.split(task.entrypoint), lambda word, fld=fld: src.error(
            fld, f"runs '{word}', which is not a file in the cube folder {cube.root}.",
            "Name a script that is in the cube, e.g. 'entrypoint: python3 /workspace/other.py'."))


def _missing_cube(path, root: Path) -> ConfigError:
    if not root.exists():
        return ConfigError(root / MLCUBE_FILE, f"Cube folder '{path}' does not exist.",
                           "Pass the path of a folder that holds mlcube.yaml, e.g. cubes/hello.")
    return ConfigError(root / MLCUBE_FILE, f"'{path}' is not a cube: it has no {MLCUBE_FILE}.",
                       f"Pass a folder that holds {MLCUBE_FILE} (with 'name:' and 'tasks:'), "
                       "e.g. cubes/hello.")


def _str_field(src: Source, fld: str, required: bool = False) -> str | None:
    value = src.data.get(fld)
    if value is None and required:
        raise src.error(fld, f"is missing the required field '{fld}'.",
                        f"Add a line such as '{fld}: my-cube' at the top of the file.")
    if value is not None and not isinstance(value, (str, int, float)):
        raise src.error(fld, f"must be a string, not {kind_of(value)}.",
                        f"Write it as '{fld}: some text'.")
    return None if value is None else str(value)


def _docker(src: Source) -> dict:
    """MLCube's docker section: image (required), build_context, build_file, plus cube's own
    optional build_strategy, env {K: V}, cpus and memory."""
    docker = mapping_field(src, "docker")
    if not docker:
        return docker
    if not isinstance(docker.get("image"), str) or not docker["image"]:
        raise src.error("docker.image", "needs the image name.",
                        "Add 'image: my-org/my-cube:0.1' under 'docker:'.")
    env = mapping_field(src, "docker.env", docker, "env")
    bad = [k for k, v in env.items() if isinstance(v, (dict, list))]
    if bad:
        raise src.error(f"docker.env.{bad[0]}", "must be a plain value (string or number).",
                        f"Write it as '{bad[0]}: value'.")
    for key in ("build_context", "build_file", "build_strategy", "memory"):
        optional_str(src, f"docker.{key}", docker.get(key))
    return docker


def _platform(src: Source) -> dict:
    platform = mapping_field(src, "platform")
    count = platform.get("accelerator_count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise src.error("platform.accelerator_count", f"must be a whole number, not '{count}'.",
                        "Write 'accelerator_count: 0' (or the number of GPUs the cube needs).")
    return platform


# -------------------------------------------------------------------------------------- tasks

def _load_tasks(src: Source, ws: Path) -> dict[str, Task]:
    tasks = src.data.get("tasks")
    if not tasks:
        raise src.error("tasks", "defines no tasks.",
                        "Add a 'tasks:' mapping, e.g. 'tasks: {train: {parameters: "
                        "{inputs: {data: data/}, outputs: {model: model/}}}}'.")
    if not isinstance(tasks, dict):
        raise src.error("tasks", f"must be a mapping of task names to tasks, not {kind_of(tasks)}.",
                        "Write each task as 'name:' indented under 'tasks:'.")
    return {str(name): _load_task(src, str(name), spec, ws) for name, spec in tasks.items()}


def _load_task(src: Source, name: str, spec, ws: Path) -> Task:
    fld = f"tasks.{name}"
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise src.error(fld, f"must be a mapping with 'parameters:', not {kind_of(spec)}.",
                        f"Write the task as '{name}: {{parameters: {{inputs: ..., outputs: ...}}}}'.")
    entrypoint = spec.get("entrypoint")
    if entrypoint is not None and not isinstance(entrypoint, str):
        raise src.error(f"{fld}.entrypoint", "must be a command string.",
                        "Write it as 'entrypoint: python3 /workspace/other.py'.")
    params_spec = mapping_field(src, f"{fld}.parameters", spec, "parameters")
    params = []
    for io, section in (("input", "inputs"), ("output", "outputs")):
        group = mapping_field(src, f"{fld}.parameters.{section}", params_spec, section)
        params += [_load_param(src, f"{fld}.parameters.{section}.{p}", str(p), io, v, ws)
                   for p, v in group.items()]
    return Task(name=name, entrypoint=entrypoint, params=params)


def _load_param(src: Source, fld: str, name: str, io: str, spec, ws: Path) -> Param:
    if isinstance(spec, str):
        return make_param(name, io, spec, ws)
    if not isinstance(spec, dict):
        raise src.error(fld, f"must be a path or a mapping, not {kind_of(spec)}.",
                        f"Write '{name}: data/' or '{name}: {{type: directory, default: data/}}'.")
    ptype, opts, default = spec.get("type"), spec.get("opts"), spec.get("default")
    if ptype is not None and ptype not in PARAM_TYPES:
        raise src.error(f"{fld}.type", f"has unknown type '{ptype}'.",
                        f"Valid types: {', '.join(PARAM_TYPES)}.")
    if opts is not None and opts not in PARAM_OPTS:
        raise src.error(f"{fld}.opts", f"has unknown opts '{opts}'.",
                        f"Valid opts: {', '.join(PARAM_OPTS)} (read-only or read-write).")
    if not isinstance(default, str) or not default:
        raise src.error(f"{fld}.default", "needs a 'default' path.",
                        f"Add 'default: {name}/' (a directory) or 'default: {name}.txt' (a file).")
    unknown = set(spec) - {"type", "opts", "default"}
    if unknown:
        raise src.error(f"{fld}.{sorted(unknown)[0]}", f"has unknown key '{sorted(unknown)[0]}'.",
                        "A parameter has only 'type', 'default' and 'opts'.")
    return make_param(name, io, default, ws, ptype, opts)


def make_param(name: str, io: str, raw: str, ws: Path, ptype: str | None = None,
               opts: str | None = None) -> Param:
    """A parameter with its path resolved against the workspace. Without a declared type it is
    a directory when the path ends in '/' or names an existing folder, else a file (MLCube)."""
    path = Path(os.path.expanduser(raw))
    path = Path(os.path.normpath(path if path.is_absolute() else ws / path))
    explicit = ptype is not None or raw.endswith(("/", os.sep))
    if ptype is None:
        ptype = "directory" if raw.endswith(("/", os.sep)) or path.is_dir() else "file"
    try:
        rel = path.relative_to(ws).as_posix()
    except ValueError:
        rel = None
    return Param(name=name, io=io, type=ptype, path=path, rel=rel, opts=opts,
                 explicit_type=explicit)
