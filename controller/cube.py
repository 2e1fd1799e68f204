"""The cube model: load and validate a cube folder (mlcube.yaml + optional metadata.yaml).

mlcube.yaml follows MLCube's schema (tasks and their file/dir parameters); metadata.yaml follows
MOO's (framework, runtime, requirements, entry point). A cube without metadata.yaml still loads:
its entry point comes from the Dockerfile's ENTRYPOINT and its requirements from
requirements.txt, so published MLCube cubes run unchanged.

Every error is a ConfigError naming the file, the dotted field, the YAML line and the fix.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller.errors import ConfigError, CubeError

MLCUBE_FILE = "mlcube.yaml"
METADATA_FILE = "metadata.yaml"
RUNTIMES = ("python", "docker")
PARAM_TYPES = ("file", "directory")
PARAM_OPTS = ("ro", "rw")
# MLCube's own top-level sections (platform runners included) are known; anything else warns.
MLCUBE_KEYS = ("name", "description", "authors", "platform", "docker", "singularity", "tasks",
               "ssh", "gcp", "k8s", "kubeflow", "runner", "workspace")
METADATA_KEYS = ("name", "description", "authors", "framework", "model", "dataset",
                 "training_params", "entry_point", "output_folder", "runtime", "playbooks",
                 "requirements_file", "version", "license", "tags")
# framework.name -> (pip package, names that already provide it). "none"/"python" add nothing.
FRAMEWORK_PACKAGES = {
    "tensorflow": ("tensorflow", {"tensorflow", "tensorflow-cpu", "tensorflow-gpu",
                                  "tensorflow-macos", "tf-nightly", "tf-nightly-cpu"}),
    "keras": ("keras", {"keras"}),
    "pytorch": ("torch", {"torch"}),
    "torch": ("torch", {"torch"}),
    "jax": ("jax", {"jax"}),
    "scikit-learn": ("scikit-learn", {"scikit-learn"}),
    "sklearn": ("scikit-learn", {"scikit-learn"}),
    "xgboost": ("xgboost", {"xgboost"}),
    "lightgbm": ("lightgbm", {"lightgbm"}),
    "mxnet": ("mxnet", {"mxnet", "mxnet-cu112"}),
}
PYTHON_NAMES = ("python", "python3")


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


def is_python(word: str) -> bool:
    return bool(re.fullmatch(r"python(\d+(\.\d+)*)?", os.path.basename(word)))


# ------------------------------------------------------------------------------------ YAML io

class _Source:
    """A parsed YAML file with a map from dotted field paths to line numbers, for errors."""

    def __init__(self, path: Path):
        self.path = path
        text = _read_text(path)
        try:
            self.data = yaml.safe_load(text)
            self.node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.lines = yaml_line_map(self.node)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(path, f"is not valid YAML: {problem}.",
                              "Fix the YAML syntax at that line (indentation, a missing ':' "
                              "or an unclosed quote or bracket).",
                              line=mark.line + 1 if mark else None) from None
        if self.data is None:
            self.data = {}
        if not isinstance(self.data, dict):
            raise ConfigError(path, "must be a YAML mapping (key: value pairs) at the top level.",
                              "Start the file with keys such as 'name:' and 'tasks:'.", line=1)

    def error(self, fld: str, message: str, hint: str) -> ConfigError:
        return ConfigError(self.path, message, hint, field=fld, line=line_of(self.lines, fld))

    def raw_scalar(self, fld: str) -> str | None:
        """A scalar as written: `version: 2.10` is the float 2.1 to YAML, "2.10" here."""
        node = self.node
        for part in fld.split("."):
            if not isinstance(node, yaml.MappingNode):
                return None
            node = next((v for k, v in node.value if str(k.value) == part), None)
        return node.value if isinstance(node, yaml.ScalarNode) else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(path, f"is not UTF-8 text ({err.reason}).",
                          "Save the file as UTF-8.") from None


def yaml_line_map(text_or_node) -> dict[str, int]:
    """Dotted field path -> 1-based line, from the YAML node tree (list items by index)."""
    out: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                out.setdefault(path, key.start_mark.line + 1)
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                path = f"{prefix}.{i}" if prefix else str(i)
                out.setdefault(path, value.start_mark.line + 1)
                walk(value, path)

    node = text_or_node
    if isinstance(node, str):
        node = yaml.compose(node, Loader=yaml.SafeLoader)
    walk(node, "")
    return out


def line_of(lines: dict[str, int], fld: str) -> int | None:
    """Line of `fld`, or of its nearest parent that exists (a missing key's owner)."""
    parts = fld.split(".")
    while parts:
        line = lines.get(".".join(parts))
        if line is not None:
            return line
        parts.pop()
    return None


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
    src = _Source(mlcube_file)
    config = apply_config_overrides(src.data, config_overrides or {})
    src.data = config
    ws = Path(workspace).expanduser() if workspace else root / "workspace"
    ws = Path(os.path.abspath(ws if ws.is_absolute() else Path.cwd() / ws))
    warnings = _unknown_key_warnings(src, MLCUBE_KEYS)
    cube = Cube(
        name=_str_field(src, "name", required=True), root=root, workspace=ws,
        description=_str_field(src, "description") or "",
        platform=_platform(src), docker=_docker(src),
        tasks=_load_tasks(src, ws), env=Environment(), warnings=warnings, config=config,
        authors=config.get("authors") or [], mlcube_file=mlcube_file)
    _load_environment(cube)
    _map_task_entrypoints(cube, src)
    cube.env.runtime, cube.env.runtime_reason = choose_runtime(cube, requested_runtime)
    return cube


def _map_task_entrypoints(cube: Cube, src: _Source) -> None:
    for task in cube.tasks.values():
        if not task.entrypoint:
            continue
        fld = f"tasks.{task.name}.entrypoint"
        task.entry = map_command(cube, shlex.split(task.entrypoint), lambda word: src.error(
            fld, f"runs '{word}', which is not a file in the cube folder {cube.root}.",
            "Name a script that is in the cube, e.g. 'entrypoint: python3 /workspace/other.py'."))


def _missing_cube(path, root: Path) -> ConfigError:
    if not root.exists():
        return ConfigError(root / MLCUBE_FILE, f"Cube folder '{path}' does not exist.",
                           "Pass the path of a folder that holds mlcube.yaml, e.g. cubes/hello.")
    return ConfigError(root / MLCUBE_FILE, f"'{path}' is not a cube: it has no {MLCUBE_FILE}.",
                       f"Pass a folder that holds {MLCUBE_FILE} (with 'name:' and 'tasks:'), "
                       "e.g. cubes/hello.")


def _unknown_key_warnings(src: _Source, known: tuple[str, ...]) -> list[str]:
    out = []
    for key in src.data:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(known)}."
        line = src.lines.get(str(key))
        where = f"{src.path}:{line}" if line else str(src.path)
        out.append(f"{where}: unknown top-level key '{key}' is ignored.{hint}")
    return out


def _str_field(src: _Source, fld: str, required: bool = False) -> str | None:
    value = src.data.get(fld)
    if value is None and required:
        raise src.error(fld, f"is missing the required field '{fld}'.",
                        f"Add a line such as '{fld}: my-cube' at the top of the file.")
    if value is not None and not isinstance(value, (str, int, float)):
        raise src.error(fld, f"must be a string, not {_kind(value)}.",
                        f"Write it as '{fld}: some text'.")
    return None if value is None else str(value)


def _mapping(src: _Source, fld: str, data: dict | None = None, key: str | None = None) -> dict:
    data = src.data if data is None else data
    value = data.get(key or fld)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise src.error(fld, f"must be a mapping (key: value pairs), not {_kind(value)}.",
                        f"Indent the entries of '{(key or fld)}:' under it as 'key: value'.")
    return value


def _docker(src: _Source) -> dict:
    """MLCube's docker section: image (required), build_context, build_file, plus cube's own
    optional build_strategy, env {K: V}, cpus and memory."""
    docker = _mapping(src, "docker")
    if not docker:
        return docker
    if not isinstance(docker.get("image"), str) or not docker["image"]:
        raise src.error("docker.image", "needs the image name.",
                        "Add 'image: my-org/my-cube:0.1' under 'docker:'.")
    env = _mapping(src, "docker.env", docker, "env")
    bad = [k for k, v in env.items() if isinstance(v, (dict, list))]
    if bad:
        raise src.error(f"docker.env.{bad[0]}", "must be a plain value (string or number).",
                        f"Write it as '{bad[0]}: value'.")
    for key in ("build_context", "build_file", "build_strategy", "memory"):
        _opt_str(src, f"docker.{key}", docker.get(key))
    return docker


def _platform(src: _Source) -> dict:
    platform = _mapping(src, "platform")
    count = platform.get("accelerator_count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise src.error("platform.accelerator_count", f"must be a whole number, not '{count}'.",
                        "Write 'accelerator_count: 0' (or the number of GPUs the cube needs).")
    return platform


def _kind(value) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


# -------------------------------------------------------------------------------------- tasks

def _load_tasks(src: _Source, ws: Path) -> dict[str, Task]:
    tasks = src.data.get("tasks")
    if not tasks:
        raise src.error("tasks", "defines no tasks.",
                        "Add a 'tasks:' mapping, e.g. 'tasks: {train: {parameters: "
                        "{inputs: {data: data/}, outputs: {model: model/}}}}'.")
    if not isinstance(tasks, dict):
        raise src.error("tasks", f"must be a mapping of task names to tasks, not {_kind(tasks)}.",
                        "Write each task as 'name:' indented under 'tasks:'.")
    return {str(name): _load_task(src, str(name), spec, ws) for name, spec in tasks.items()}


def _load_task(src: _Source, name: str, spec, ws: Path) -> Task:
    fld = f"tasks.{name}"
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise src.error(fld, f"must be a mapping with 'parameters:', not {_kind(spec)}.",
                        f"Write the task as '{name}: {{parameters: {{inputs: ..., outputs: ...}}}}'.")
    entrypoint = spec.get("entrypoint")
    if entrypoint is not None and not isinstance(entrypoint, str):
        raise src.error(f"{fld}.entrypoint", "must be a command string.",
                        "Write it as 'entrypoint: python3 /workspace/other.py'.")
    params_spec = _mapping(src, f"{fld}.parameters", spec, "parameters")
    params = []
    for io, section in (("input", "inputs"), ("output", "outputs")):
        group = _mapping(src, f"{fld}.parameters.{section}", params_spec, section)
        params += [_load_param(src, f"{fld}.parameters.{section}.{p}", str(p), io, v, ws)
                   for p, v in group.items()]
    return Task(name=name, entrypoint=entrypoint, params=params)


def _load_param(src: _Source, fld: str, name: str, io: str, spec, ws: Path) -> Param:
    if isinstance(spec, str):
        return make_param(name, io, spec, ws)
    if not isinstance(spec, dict):
        raise src.error(fld, f"must be a path or a mapping, not {_kind(spec)}.",
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


# -------------------------------------------------------------------------------- environment

def _load_environment(cube: Cube) -> None:
    meta_file = cube.root / METADATA_FILE
    if meta_file.is_file():
        cube.metadata_file = meta_file
        _load_metadata(cube, _Source(meta_file))
    else:
        _load_legacy(cube)


def _load_metadata(cube: Cube, src: _Source) -> None:
    env, data = cube.env, src.data
    cube.metadata = data
    cube.warnings += _unknown_key_warnings(src, METADATA_KEYS)
    fw = _mapping(src, "framework")
    env.framework = {"name": _opt_str(src, "framework.name", fw.get("name")),
                     "version": _opt_str(src, "framework.version", fw.get("version"))}
    if isinstance(fw.get("version"), float):
        env.framework["version"] = src.raw_scalar("framework.version")
    runtime, reqs = _framework_runtime(src, fw.get("runtime"))
    if runtime is not None:
        env.runtime_name, env.python_version = _parse_interpreter(src, runtime)
    env.requirements_file = _requirements_file(cube, src, data.get("requirements_file"))
    file_reqs = read_requirements(cube.root / env.requirements_file) if env.requirements_file else []
    env.requirements = _with_framework(_dedupe(reqs + file_reqs), env.framework)
    env.playbooks = _playbooks(cube, src, data.get("playbooks"))
    declared = data.get("runtime")
    if declared is not None and declared not in RUNTIMES:
        raise src.error("runtime", f"has unknown runtime '{declared}'.",
                        f"Valid runtimes: {', '.join(RUNTIMES)}.")
    if data.get("entry_point") is not None:
        env.entry = _metadata_entry(cube, src, data["entry_point"])
        env.entry_source = f"{METADATA_FILE} entry_point"
    elif (dockerfile := _dockerfile(cube)) is not None:
        env.entry, env.entry_source = _dockerfile_entry(cube, dockerfile)


def _opt_str(src: _Source, fld: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, int, float)):
        raise src.error(fld, f"must be a string, not {_kind(value)}.", f"Write it as '{fld}: ...'.")
    return str(value)


def _framework_runtime(src: _Source, value) -> tuple[str | None, list[str]]:
    """framework.runtime is 'python3.11' or {name: python3.11, requirement: [...]}."""
    if value is None or isinstance(value, str):
        return value, []
    if not isinstance(value, dict):
        raise src.error("framework.runtime", f"must be a string or a mapping, not {_kind(value)}.",
                        "Write 'runtime: python3.11' or 'runtime: {name: python3.11, "
                        "requirement: [numpy]}'.")
    reqs = value.get("requirement", value.get("requirements")) or []
    if isinstance(reqs, str):
        reqs = [reqs]
    if not isinstance(reqs, list) or not all(isinstance(r, str) for r in reqs):
        raise src.error("framework.runtime.requirement", "must be a list of pip requirements.",
                        "Write 'requirement: [numpy>=1.26, pyyaml]'.")
    name = value.get("name")
    if not isinstance(name, str):
        raise src.error("framework.runtime.name", "needs the interpreter name.",
                        "Write 'name: python3.11' (or 'python3' for any Python 3).")
    return name, [r.strip() for r in reqs if r.strip()]


def _parse_interpreter(src: _Source, runtime: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"\s*(python)\s*-?\s*(\d+(?:\.\d+)*)?\s*", runtime, re.IGNORECASE)
    if not m:
        raise src.error("framework.runtime", f"names an unknown interpreter '{runtime}'.",
                        "Use 'python3.X' (e.g. python3.11) or 'python3' for any Python 3.")
    return "python", m.group(2)


def _requirements_file(cube: Cube, src: _Source, declared) -> str | None:
    if declared is None:
        return "requirements.txt" if (cube.root / "requirements.txt").is_file() else None
    if not isinstance(declared, str) or not (cube.root / declared).is_file():
        raise src.error("requirements_file", f"names '{declared}', which is not a file in the cube.",
                        f"Give a path relative to {cube.root}, e.g. 'requirements_file: "
                        "requirements.txt'.")
    return declared


def read_requirements(path: Path, _seen: frozenset = frozenset()) -> list[str]:
    """pip requirement lines: comments and blank lines dropped, `-r other.txt` followed,
    other pip options (--index-url, -e) dropped: the venv is built from names alone."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        m = re.match(r"(?:-r|--requirement)[\s=]+(\S+)$", line)
        if m and path.parent / m.group(1) not in _seen:
            if not (path.parent / m.group(1)).is_file():
                raise ConfigError(path, f"includes '{line}', but {m.group(1)} does not exist.",
                                  "Fix the path (it is relative to this file) or remove the line.")
            out += read_requirements(path.parent / m.group(1), _seen | {path})
        elif line and not line.startswith("-"):
            out.append(line)
    return out


def _dedupe(reqs: list[str]) -> list[str]:
    seen, out = set(), []
    for r in reqs:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else req.strip().lower()


def _with_framework(reqs: list[str], framework: dict) -> list[str]:
    """Pin the framework itself (tensorflow==2.16.*) unless a requirement already names it."""
    known = FRAMEWORK_PACKAGES.get(str(framework.get("name") or "").lower())
    if not known:
        return reqs
    package, provided_by = known
    if any(requirement_name(r) in provided_by for r in reqs):
        return reqs
    version = framework.get("version")
    if not version:
        return reqs + [package]
    exact = len(version.split(".")) >= 3 or not re.fullmatch(r"[\d.]+", version)
    return reqs + [f"{package}=={version}" if exact else f"{package}=={version}.*"]


def _playbooks(cube: Cube, src: _Source, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise src.error("playbooks", "must be a list of playbook files.",
                        "Write 'playbooks: [provision/gpu.yaml]' (paths relative to the cube).")
    for i, pb in enumerate(value):
        if not (cube.root / pb).is_file():
            raise src.error(f"playbooks.{i}", f"names '{pb}', which is not a file in the cube.",
                            f"Give a path relative to {cube.root}.")
    return list(value)


def _metadata_entry(cube: Cube, src: _Source, value) -> list[str]:
    if isinstance(value, str):
        words = shlex.split(value)
    elif isinstance(value, list) and all(isinstance(w, str) for w in value):
        words = list(value)
    else:
        words = []
    if not words:
        raise src.error("entry_point", "must name the script to run.",
                        "Write 'entry_point: mnist.py' (relative to the cube folder).")
    if words[0].endswith(".py"):
        words = ["python3", *words]
    script = words[1] if is_python(words[0]) and len(words) > 1 else words[0]
    if not is_python(script) and not (cube.root / script).exists():
        raise src.error("entry_point", f"names '{script}', which is not in the cube.",
                        f"Give a path relative to {cube.root}, e.g. 'entry_point: main.py'.")
    return words


# ---------------------------------------------------------------------- legacy MLCube cubes

def _load_legacy(cube: Cube) -> None:
    """No metadata.yaml: entry from the Dockerfile, requirements from requirements.txt."""
    env = cube.env
    if (cube.root / "requirements.txt").is_file():
        env.requirements_file = "requirements.txt"
        env.requirements = read_requirements(cube.root / "requirements.txt")
    dockerfile = _dockerfile(cube)
    if dockerfile is not None:
        env.entry, env.entry_source = _dockerfile_entry(cube, dockerfile)
    elif not cube.docker:
        raise ConfigError(cube.root / METADATA_FILE, "is missing and the cube has no Dockerfile "
                          "or 'docker:' section, so cube cannot tell how to run it.",
                          "Add metadata.yaml with 'entry_point: main.py' and "
                          "'framework: {runtime: python3}'.")


def _dockerfile(cube: Cube) -> Path | None:
    context = cube.root / str(cube.docker.get("build_context") or ".")
    candidates = [context / str(cube.docker.get("build_file") or "Dockerfile"),
                  cube.root / "Dockerfile"]
    return next((p for p in candidates if p.is_file()), None)


def _dockerfile_entry(cube: Cube, dockerfile: Path) -> tuple[list[str], str]:
    """ENTRYPOINT ["python3", "/workspace/mnist.py"] -> ["python3", "mnist.py"]."""
    words, line = _parse_entrypoint(dockerfile)
    if not words:
        return [], ""

    def error(word: str) -> ConfigError:
        name = Path(word).name
        return ConfigError(dockerfile, f"has ENTRYPOINT script '{word}', but no file named "
                           f"'{name}' is in the cube folder {cube.root}.",
                           f"Put {name} in the cube folder, or add metadata.yaml with "
                           "'entry_point: <script>.py'.", field="ENTRYPOINT", line=line)

    where = dockerfile.relative_to(cube.root) if dockerfile.is_relative_to(cube.root) else dockerfile
    return map_command(cube, words, error), f"{where}:{line} ENTRYPOINT"


def _parse_entrypoint(dockerfile: Path) -> tuple[list[str], int | None]:
    """The last ENTRYPOINT instruction (exec or shell form) and its line; continuations joined."""
    found: tuple[list[str], int | None] = ([], None)
    lines = _read_text(dockerfile).splitlines()
    i = 0
    while i < len(lines):
        start, text = i + 1, lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i]
        i += 1
        m = re.match(r"\s*ENTRYPOINT\s+(.*)$", text, re.IGNORECASE)
        if m:
            found = (_entrypoint_words(dockerfile, m.group(1).strip(), start), start)
    return found


def _entrypoint_words(dockerfile: Path, arg: str, line: int) -> list[str]:
    if not arg.startswith("["):
        return shlex.split(arg)
    try:
        words = json.loads(arg)
    except json.JSONDecodeError:
        words = None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ConfigError(dockerfile, f"has an ENTRYPOINT that is not a JSON list of strings: {arg}",
                          'Write it in exec form: ENTRYPOINT ["python3", "/workspace/main.py"].',
                          field="ENTRYPOINT", line=line)
    return words


def _map_script(cube: Cube, word: str) -> str | None:
    """'/workspace/mnist.py' -> 'mnist.py': the file of the same name in the cube, or None."""
    name = Path(word).name
    if (cube.root / name).is_file():
        return name
    skip = {cube.root / "workspace", cube.root / ".git"}
    for match in sorted(cube.root.rglob(name)):
        if match.is_file() and not any(match.is_relative_to(s) for s in skip):
            return match.relative_to(cube.root).as_posix()
    return None


def map_command(cube: Cube, words: list[str], error) -> list[str]:
    """Map a container command's script to the cube's own file: the script after a python
    interpreter (`python3 -u /workspace/x.py`) or a bare `x.py` must exist in the cube,
    else `error(word)` is raised. Other commands (`/bin/bash`, `run.sh`) are mapped when the
    cube has them and kept as they are otherwise: they may live in the image."""
    out = list(words)
    if out and is_python(out[0]):
        out[0] = os.path.basename(out[0])
        i = 1
        while i < len(out) and out[i].startswith("-") and out[i] not in ("-m", "-c"):
            i += 1
        if i < len(out) and not out[i].startswith("-"):
            out[i] = _required_script(cube, out[i], error)
    elif out and out[0].endswith(".py"):
        out = ["python3", _required_script(cube, out[0], error), *out[1:]]
    else:
        for i, word in enumerate(out[:2]):
            if "/" in word or word.endswith(".sh"):
                out[i] = _map_script(cube, word) or word
    return out


def _required_script(cube: Cube, word: str, error) -> str:
    mapped = _map_script(cube, word)
    if mapped is None:
        raise error(word)
    return mapped


# ---------------------------------------------------------------------------- runtime choice

def choose_runtime(cube: Cube, requested: str | None = None) -> tuple[str, str]:
    """(runtime, why): --runtime > metadata `runtime:` > a python entry > the docker section."""
    env, meta = cube.env, cube.metadata
    if requested is not None:
        if requested not in RUNTIMES:
            raise CubeError(f"Unknown runtime '{requested}'.",
                            f"Valid runtimes: {', '.join(RUNTIMES)}.")
        _check_runnable(cube, requested)
        return requested, f"chosen with --runtime {requested}"
    if meta.get("runtime"):
        _check_runnable(cube, meta["runtime"])
        return meta["runtime"], f"{METADATA_FILE} sets 'runtime: {meta['runtime']}'"
    if env.has_python_entry():
        declared = (meta.get("framework") or {}).get("runtime")
        if cube.metadata_file is not None and declared:
            return "python", f"{METADATA_FILE} declares a python framework.runtime"
        return "python", f"its entry point ({env.entry_source}) runs python"
    if cube.docker:
        return "docker", "no python entry point, and mlcube.yaml has a 'docker:' section"
    raise ConfigError(cube.metadata_file or cube.root / METADATA_FILE,
                      "gives no way to run the cube: no python entry point and no 'docker:' "
                      "section in mlcube.yaml.",
                      "Add 'entry_point: main.py' and 'framework: {runtime: python3}' to "
                      "metadata.yaml.", field="entry_point")


def _check_runnable(cube: Cube, runtime: str) -> None:
    if runtime == "docker" and not cube.docker:
        raise ConfigError(cube.mlcube_file, "has no 'docker:' section, so the docker runtime "
                          "cannot run it.", "Add 'docker: {image: name:tag}' to mlcube.yaml, or "
                          "use --runtime python.", field="docker")
    if runtime == "python" and not cube.env.has_python_entry():
        raise ConfigError(cube.metadata_file or cube.root / METADATA_FILE,
                          "gives no python entry point, so the python runtime cannot run "
                          "the cube.", "Add 'entry_point: main.py' to metadata.yaml, or use "
                          "--runtime docker.", field="entry_point")
