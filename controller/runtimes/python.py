"""The python runtime: pick an interpreter, provision a venv keyed by the env hash (with
playbooks/python.yaml), and build the task's command with the venv's interpreter.

The same `find_interpreter` serves remote hosts, which pass the agent probe's list of
interpreters ([{path, version}]) instead of scanning this machine's PATH.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from controller.cube import Cube, Param
from controller.entrypoint import is_python
from controller.errors import CubeError
from controller.paths import envs_dir
from controller.plan import JobLayout, JobPlan, LocalLayout, TaskPlan, output_dirs
from controller.provision import run_playbook
from controller.runtimes.base import HostFacts, LaunchSpec, LocalFacts, Log, TaskLaunch
from controller.target import LocalTarget, Target
from controller.taskargs import task_argv

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
    assert op is not None  # the pattern matches any string (every part is optional)
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


# ---- the runtime -----------------------------------------------------------------------------

class PythonRuntime:
    """A venv keyed by the env hash under the target's envs folder (built by
    playbooks/python.yaml, then the cube's own playbooks), and each task run by the venv's
    interpreter with the venv first on PATH. The same code serves this machine and hosts."""

    name = "python"

    def prepare(self, plan: JobPlan, target: Target, layout: JobLayout, facts: HostFacts,
                log: Log, *, dry_run: bool = False) -> LaunchSpec:
        cube = plan.cube
        env_dir = provision_env(cube, target, layout, facts, log, dry_run=dry_run)
        tasks = [TaskLaunch(t.name, python_task_argv(cube, t, env_dir, layout.path_for),
                            cwd=layout.cube_dir, env=venv_env(env_dir),
                            path_prepend=[posixpath.join(env_dir, "bin")])
                 for t in plan.tasks]
        return LaunchSpec(self.name, tasks, env_key=posixpath.basename(env_dir),
                          mkdirs=output_dirs(plan, layout))


def env_hash_for(cube: Cube, interpreter: Interpreter) -> str:
    """The env hash is keyed on the interpreter actually used (major.minor), on this machine
    and on hosts alike: a venv is bound to the interpreter that built it, so a cube declaring
    "3" or nothing gets one env per Python it really runs on, never a 3.10 venv reused by 3.11."""
    return cube.env.env_hash(".".join(interpreter.version.split(".")[:2]))


def provision_env(cube: Cube, target: Target, layout: JobLayout, facts: HostFacts, log: Log, *,
                  dry_run: bool = False) -> str:
    """The cube's venv on the target, built once, then the cube's own playbooks (metadata.yaml
    `playbooks:`, whose checks keep reruns cheap). A complete env has its marker (written just
    before the atomic rename), so reuse costs one command; an env whose base interpreter
    vanished is moved aside and rebuilt. Returns the env folder on the target."""
    interpreter = pick_interpreter(cube.env.python_version, facts.pythons)
    env_hash = env_hash_for(cube, interpreter)
    env_dir = posixpath.join(layout.envs_dir, env_hash)
    variables = {"python": interpreter.path, "env_dir": env_dir, "env_hash": env_hash,
                 "requirements": list(cube.env.requirements), "pip_log": f"{env_dir}.pip.log"}
    marker, usable = _env_state(target, env_dir)
    if marker is not None and not usable:
        log(f"env {env_hash} lost its base interpreter; rebuilding it")
        if not dry_run:
            _discard(target, env_dir)
    if marker is not None and usable:
        log(f"reusing env {env_hash} (Python {marker.get('python', '?')}, "
            f"{len(marker.get('requirements', []))} requirements) at {env_dir}")
    else:
        log(f"building env {env_hash} with {interpreter.path} "
            f"({len(cube.env.requirements)} requirements; pip log: {env_dir}.pip.log)")
        run_playbook("python", variables, target, log, dry_run=dry_run)
    user_vars = {**variables, "python": posixpath.join(env_dir, "bin", "python"),
                 "cube_root": layout.cube_dir, "workspace": workspace_on_target(cube, layout)}
    for book in cube.env.playbooks:
        run_playbook(book, user_vars, target, log, dry_run=dry_run, base=cube.root)
    return env_dir


def _env_state(target: Target, env_dir: str) -> tuple[dict | None, bool]:
    """(marker, usable): the env's marker (None: no complete env), and whether its
    interpreter still runs (a venv's python links to a base Python that may be uninstalled)."""
    q = shlex.quote(env_dir)
    result = target.sh(f"cat {q}/{MARKER} 2>/dev/null || exit 3; test -x {q}/bin/python")
    if result.code == 3:
        return None, False
    try:
        return json.loads(result.stdout), result.code == 0
    except ValueError:
        return None, False


def _discard(target: Target, env_dir: str) -> None:
    # Rename first so a concurrent run never sees a half-deleted env under the real name.
    q, doomed = shlex.quote(env_dir), shlex.quote(f"{env_dir}.broken-{secrets.token_hex(4)}")
    target.sh(f"mv {q} {doomed} && rm -rf {doomed}", timeout=600)


def ensure_local_env(cube: Cube, log: Log, *, plan: bool = False) -> Path:
    """The cube's venv on this machine (what `cube run` provisions), for tools and benches."""
    layout = LocalLayout(cube.root, envs_dir())
    return Path(provision_env(cube, LocalTarget(), layout, LocalFacts(), log, dry_run=plan))


def local_env_dir(cube: Cube) -> Path:
    """Where this machine's venv for the cube is (or would be)."""
    interpreter = pick_interpreter(cube.env.python_version, local_interpreters())
    return envs_dir() / env_hash_for(cube, interpreter)


def pick_interpreter(version_req: str | None, candidates: Iterable) -> Interpreter:
    seen: list[Interpreter] = []
    path = find_interpreter(version_req, _remember(candidates, seen))
    return next(i for i in seen if i.path == path)


def _remember(candidates: Iterable, seen: list) -> Iterator[Interpreter]:
    for candidate in candidates:
        interp = _coerce(candidate)
        seen.append(interp)
        yield interp


def workspace_on_target(cube: Cube, layout: JobLayout) -> str:
    """Where the cube's workspace (its inputs) is on the target, for user playbooks."""
    return getattr(layout, "inputs_dir", None) or str(cube.workspace)


def python_task_argv(cube: Cube, task: TaskPlan, env_dir: str | Path,
                     path_for: Callable[[Param], str]) -> list[str]:
    """task_argv with its interpreter (python, python3, python3.X) replaced by the venv's."""
    argv = task_argv(cube, task.name, task.params, path_for=path_for)
    if argv and is_python(argv[0]):
        argv[0] = posixpath.join(str(env_dir), "bin", "python")
    return argv


def venv_env(env_dir: str) -> dict[str, str]:
    """On top of the target's environment: the venv, and unbuffered output so logs stream."""
    return {"VIRTUAL_ENV": env_dir, "PYTHONUNBUFFERED": "1"}


def read_marker(env_dir: Path) -> dict | None:
    try:
        return json.loads((Path(env_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
