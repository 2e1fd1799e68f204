"""A cube's environment from MOO's metadata.yaml (framework, interpreter, requirements,
playbooks, entry point), or for a cube without one (a published MLCube cube) from its
Dockerfile and requirements.txt; and the choice of runtime that follows from it."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from controller.entrypoint import dockerfile_entry, find_dockerfile, metadata_entry
from controller.errors import ConfigError, CubeError
from controller.runtimes import RUNTIMES
from controller.yamlsource import Source, kind_of, mapping_field, optional_str, unknown_key_warnings

if TYPE_CHECKING:
    from controller.cube import Cube

METADATA_FILE = "metadata.yaml"
METADATA_KEYS = ("name", "description", "authors", "framework", "model", "dataset",
                 "training_params", "entry_point", "output_folder", "runtime", "playbooks",
                 "requirements_file", "version", "license", "tags", "metrics")
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


def load_environment(cube: Cube) -> None:
    meta_file = cube.root / METADATA_FILE
    if meta_file.is_file():
        cube.metadata_file = meta_file
        _load_metadata(cube, Source(meta_file))
    else:
        _load_legacy(cube)


def _load_metadata(cube: Cube, src: Source) -> None:
    env, data = cube.env, src.data
    cube.metadata = data
    cube.warnings += unknown_key_warnings(src, METADATA_KEYS)
    fw = mapping_field(src, "framework")
    env.framework = {"name": optional_str(src, "framework.name", fw.get("name")),
                     "version": optional_str(src, "framework.version", fw.get("version"))}
    if isinstance(fw.get("version"), float):
        env.framework["version"] = src.raw_scalar("framework.version")
    runtime, reqs = _framework_runtime(src, fw.get("runtime"))
    if runtime is not None:
        env.runtime_name, env.python_version = _parse_interpreter(src, runtime)
    env.requirements_file = _requirements_file(cube, src, data.get("requirements_file"))
    file_reqs = read_requirements(cube.root / env.requirements_file) if env.requirements_file else []
    env.requirements = _with_framework(_dedupe(reqs + file_reqs), env.framework)
    env.playbooks = _playbooks(cube, src, data.get("playbooks"))
    env.metrics_file = _metrics_file(src, data.get("metrics"))
    declared = data.get("runtime")
    if declared is not None and declared not in RUNTIMES:
        raise src.error("runtime", f"has unknown runtime '{declared}'.",
                        f"Valid runtimes: {', '.join(RUNTIMES)}.")
    if data.get("entry_point") is not None:
        env.entry = metadata_entry(cube, src, data["entry_point"])
        env.entry_source = f"{METADATA_FILE} entry_point"
    elif (dockerfile := find_dockerfile(cube)) is not None:
        env.entry, env.entry_source = dockerfile_entry(cube, dockerfile)


def _framework_runtime(src: Source, value) -> tuple[str | None, list[str]]:
    """framework.runtime is 'python3.11' or {name: python3.11, requirement: [...]}."""
    if value is None or isinstance(value, str):
        return value, []
    if not isinstance(value, dict):
        raise src.error("framework.runtime",
                        f"must be a string or a mapping, not {kind_of(value)}.",
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


def _parse_interpreter(src: Source, runtime: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"\s*(python)\s*-?\s*(\d+(?:\.\d+)*)?\s*", runtime, re.IGNORECASE)
    if not m:
        raise src.error("framework.runtime", f"names an unknown interpreter '{runtime}'.",
                        "Use 'python3.X' (e.g. python3.11) or 'python3' for any Python 3.")
    return "python", m.group(2)


def _requirements_file(cube: Cube, src: Source, declared) -> str | None:
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


def _playbooks(cube: Cube, src: Source, value) -> list[str]:
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


def _metrics_file(src: Source, value) -> str | None:
    """`metrics: model/metrics.json`: where the tasks write their metrics, relative to the
    workspace like the outputs (cube sweep results reads it)."""
    if value is None:
        return None
    path = PurePosixPath(value) if isinstance(value, str) else None
    if path is None or path.is_absolute() or ".." in path.parts or path.suffix != ".json":
        raise src.error("metrics", f"must be a .json file relative to the workspace, not {value!r}.",
                        "Write e.g. 'metrics: model/metrics.json' (a file among the outputs).")
    return path.as_posix()


# ---------------------------------------------------------------------- legacy MLCube cubes

def _load_legacy(cube: Cube) -> None:
    """No metadata.yaml: entry from the Dockerfile, requirements from requirements.txt."""
    env = cube.env
    if (cube.root / "requirements.txt").is_file():
        env.requirements_file = "requirements.txt"
        env.requirements = read_requirements(cube.root / "requirements.txt")
    dockerfile = find_dockerfile(cube)
    if dockerfile is not None:
        env.entry, env.entry_source = dockerfile_entry(cube, dockerfile)
    elif not cube.docker:
        raise ConfigError(cube.root / METADATA_FILE, "is missing and the cube has no Dockerfile "
                          "or 'docker:' section, so cube cannot tell how to run it.",
                          "Add metadata.yaml with 'entry_point: main.py' and "
                          "'framework: {runtime: python3}'.")


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
    if runtime in ("docker", "podman") and not cube.docker:
        raise ConfigError(cube.mlcube_file, f"has no 'docker:' section, so the {runtime} "
                          "runtime cannot run it.", "Add 'docker: {image: name:tag}' to mlcube.yaml, or "
                          "use --runtime python.", field="docker")
    if runtime == "python" and not cube.env.has_python_entry():
        raise ConfigError(cube.metadata_file or cube.root / METADATA_FILE,
                          "gives no python entry point, so the python runtime cannot run "
                          "the cube.", "Add 'entry_point: main.py' to metadata.yaml, or use "
                          "--runtime docker.", field="entry_point")
