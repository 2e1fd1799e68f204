"""The python runtime: pick an interpreter, provision a venv keyed by the env hash (with
playbooks/python.yaml), and build the task's command with the venv's interpreter.

The same `find_interpreter` serves remote hosts, which pass the agent probe's list of
interpreters ([{path, version}]) instead of scanning this machine's PATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from controller.entrypoint import is_python
from controller.errors import CubeError
from controller.paths import envs_dir

MIN_VERSION = (3, 8)
MARKER = "cube-env.json"
_VERSIONED = re.compile(r"^python3(\.\d+)?$")


@dataclass(frozen=True)
class Interpreter:
    path: str
    version: str            # "3.11.7"

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return _as_tuple(self.version)


def _as_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def version_matches(version: str, requirement: str | None) -> bool:
    """Never below 3.8. None: any. "3.11" / "3" / "3.11.4": the version starts with those.
    ">=3.9" (also >, <=, <, ==): compared component-wise."""
    have = _as_tuple(version)
    if not requirement or have < MIN_VERSION:  # venv + our playbook need 3.8 whatever is asked
        return have >= MIN_VERSION
    req = requirement.strip().removeprefix("python").strip()
    op = re.match(r"^(>=|<=|==|>|<)?\s*", req)
    want = _as_tuple(req[op.end():])
    if not want:
        raise CubeError(f"Python version requirement '{requirement}' is not a version.",
                        "Write it as 3.11, 3 or >=3.9.")
    compare = {"": lambda: have[:len(want)] == want, "==": lambda: have[:len(want)] == want,
               ">=": lambda: have >= want, ">": lambda: have[:len(want)] > want,
               "<=": lambda: have[:len(want)] <= want, "<": lambda: have < want}
    return compare[op.group(1) or ""]()


def _coerce(candidate) -> Interpreter:
    if isinstance(candidate, Interpreter):
        return candidate
    if isinstance(candidate, dict):
        return Interpreter(str(candidate["path"]), str(candidate["version"]))
    path, version = candidate
    return Interpreter(str(path), str(version))


def find_interpreter(version_req: str | None, candidates: Iterable) -> str:
    """Path of the first candidate matching `version_req`; candidates are Interpreter objects,
    {path, version} dicts (the agent's probe) or (path, version) pairs, best first. Consumed
    lazily, so a local scan stops probing at the first match."""
    found = []
    for candidate in candidates:
        interp = _coerce(candidate)
        if version_matches(interp.version, version_req):
            return interp.path
        found.append(interp)
    listing = ", ".join(f"{i.path} ({i.version})" for i in found) or "none"
    want = f"Python {version_req}" if version_req else "Python >= 3.8"
    raise CubeError(f"No interpreter matching {want} was found. Interpreters found: {listing}.",
                    f"Install {want} (e.g. apt install python{version_req or '3'} or pyenv), "
                    "or change framework.runtime in metadata.yaml.")


def local_interpreters(path_env: str | None = None) -> Iterator[Interpreter]:
    """This machine's interpreters: the controller's own first, then python3 and python3.X on
    PATH. Each is asked for its version, because names lie (pyenv shims for absent versions)."""
    yield Interpreter(sys.executable, "%d.%d.%d" % sys.version_info[:3])
    seen = {os.path.realpath(sys.executable)}
    for path in _path_pythons(path_env if path_env is not None else os.environ.get("PATH", "")):
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        version = _ask_version(path)
        if version:
            yield Interpreter(path, version)


def _path_pythons(path_env: str) -> list[str]:
    out = []
    for folder in filter(None, path_env.split(os.pathsep)):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        out += [os.path.join(folder, n) for n in names
                if _VERSIONED.match(n) and os.access(os.path.join(folder, n), os.X_OK)]
    return out


def _ask_version(path: str) -> str | None:
    try:
        proc = subprocess.run([path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                              capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


# ---- local environments ----------------------------------------------------------------------

def local_env_dir(cube) -> Path:
    return envs_dir() / cube.env.env_hash()


def read_marker(env_dir: Path) -> dict | None:
    try:
        return json.loads((env_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_local_env(cube, log: Callable[[str], None] = print, *, plan: bool = False) -> Path:
    """The cube's venv under $CUBE_HOME/envs/<env hash>, built once. A present marker means a
    complete env (it is written just before the atomic rename), so reuse costs one file read."""
    env_dir = local_env_dir(cube)
    marker = read_marker(env_dir)
    if marker is not None and not (env_dir / "bin" / "python").exists():
        log(f"env {env_dir.name} lost its base interpreter; rebuilding it")
        _discard(env_dir)
        marker = None
    if marker is not None:
        log(f"reusing env {env_dir.name} (Python {marker.get('python', '?')}, "
            f"{len(marker.get('requirements', []))} requirements) at {env_dir}")
    else:
        _build_local_env(cube, env_dir, log, plan)
    _run_user_playbooks(cube, env_dir, log, plan)
    return env_dir


def _discard(env_dir: Path) -> None:
    # Rename first so a concurrent run never sees a half-deleted env under the real name.
    import secrets
    import shutil

    doomed = env_dir.with_name(f"{env_dir.name}.broken-{secrets.token_hex(4)}")
    os.replace(env_dir, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _build_local_env(cube, env_dir: Path, log, plan: bool) -> None:
    from controller.provision import LocalExecutor, run_playbook

    python = find_interpreter(cube.env.python_version, local_interpreters())
    reqs = list(cube.env.requirements)
    log(f"building env {env_dir.name} with {python} ({len(reqs)} requirements; "
        f"pip log: {env_dir}.pip.log)")
    run_playbook("python", _variables(cube, env_dir, python), LocalExecutor(), log, dry_run=plan)


def _variables(cube, env_dir: Path, python: str) -> dict:
    return {"python": python, "env_dir": str(env_dir), "env_hash": cube.env.env_hash(),
            "requirements": list(cube.env.requirements), "pip_log": f"{env_dir}.pip.log"}


def _run_user_playbooks(cube, env_dir: Path, log, plan: bool) -> None:
    """metadata.yaml `playbooks:` (paths relative to the cube); their checks keep reruns cheap."""
    if not cube.env.playbooks:
        return
    from controller.provision import LocalExecutor, run_playbook

    variables = {**_variables(cube, env_dir, str(env_dir / "bin" / "python")),
                 "cube_root": str(cube.root), "workspace": str(cube.workspace)}
    for book in cube.env.playbooks:
        run_playbook(book, variables, LocalExecutor(), log, dry_run=plan, base=cube.root)


# ---- the task's command ----------------------------------------------------------------------

def python_task_argv(cube, task: str, overrides: dict[str, str] | None, env_dir: str | Path,
                     path_for: Callable | None = None) -> list[str]:
    """task_argv with its interpreter (python, python3, python3.X) replaced by the venv's."""
    from controller.taskargs import task_argv

    kwargs = {"path_for": path_for} if path_for is not None else {}
    argv = task_argv(cube, task, overrides or {}, **kwargs)
    if argv and is_python(argv[0]):
        argv[0] = str(Path(env_dir) / "bin" / "python")
    return argv


def task_env(env_dir: Path) -> dict[str, str]:
    """The task's environment: the venv first on PATH, unbuffered output so logs stream."""
    env = dict(os.environ)
    env["VIRTUAL_ENV"] = str(env_dir)
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONHOME", None)
    return env


def run_task(cube, task: str, overrides: dict[str, str], *, log: Callable[[str], None] = print,
             grace: float = 10.0) -> int:
    """The python runtime's entry in controller.runtimes.RUNTIMES: provision (or reuse) the
    venv, then run the task in the cube folder, streaming its output."""
    from controller.runner import run_process, task_log_path

    env_dir = ensure_local_env(cube, log)
    argv = python_task_argv(cube, task, overrides, env_dir)
    log_file = task_log_path(cube, task, overrides)
    log(f"running {task}: log {log_file}")
    return run_process(argv, cwd=cube.root, log_file=log_file, env=task_env(env_dir), grace=grace)
