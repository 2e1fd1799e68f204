"""Container images for the docker and podman runtimes: the engine check, the build strategy
(pull, build, auto, ship), getting a cube's image onto an engine (ensure_image, rebuilt only when
the build context's hash label changed), and shipping the controller's image to a host over SSH.

Every engine call is a shell command given to a target (`sh(command) -> ExecResult`) and names
its engine: podman speaks docker's CLI for everything used here, so one code path serves both
(controller.runtimes.docker says why the CLI and not the docker SDK).
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import pathspec

from controller.cube import Cube
from controller.errors import ConfigError, CubeError
from controller.provision import StepFailed, run_playbook
from controller.streams import Stream
from controller.target import ExecResult, Executor

STRATEGIES = ("pull", "build", "auto", "ship")
ALIASES = {"always": "build"}        # MLCube's name for "build every time"
TAIL_LINES = 20
CHUNK = 1 << 20
Log = Callable[[str], None]


# ---- engine ----------------------------------------------------------------------------------

ENGINES = ("docker", "podman")
# What to install where an engine's CLI is missing (Debian/Ubuntu package names).
INSTALL = {"docker": "apt-get install docker.io", "podman": "apt-get install podman uidmap"}


@dataclass(frozen=True)
class EngineInfo:
    name: str                  # docker | podman: the CLI every call runs
    version: str
    rootless: bool = False     # podman run by a non-root user: container root is that user


def check_engine(ex: Executor, where: str = "this machine", engine: str = "docker") -> str:
    """The engine's server version, or a CubeError saying what is wrong and how to fix it."""
    return engine_info(ex, where, engine).version


def engine_info(ex: Executor, where: str = "this machine", engine: str = "docker") -> EngineInfo:
    """One call that checks the engine answers and, for podman, whether it runs rootless
    (`podman info` knows; a version query alone would not touch the user's storage)."""
    if engine == "podman":
        fmt = "server {{.Version.Version}} rootless={{.Host.Security.Rootless}}"
        result = ex.sh(f"podman info --format {shlex.quote(fmt)}", timeout=60)
    else:
        result = ex.sh("docker version --format 'server {{.Server.Version}}'", timeout=60)
    if result.code == 0 and "server" in result.stdout:
        words = result.stdout.split("server", 1)[1].split()
        return EngineInfo(engine, words[0] if words else "?", "rootless=true" in words)
    raise engine_error(result, where, engine)


def engine_error(result: ExecResult, where: str, engine: str = "docker") -> CubeError:
    text, title = result.output, engine.capitalize()
    if result.code == 127 or "command not found" in text or "No such file" in text:
        return CubeError(f"The {title} CLI is not installed on {where}.",
                         f"Install {title} (Debian/Ubuntu: {INSTALL.get(engine, engine)}), or "
                         "run with --runtime python.")
    if engine == "docker" and "permission denied" in text.lower():
        return CubeError(f"The Docker engine on {where} refused this user: permission denied "
                         "on its socket (/var/run/docker.sock).",
                         "Add the user to the docker group (sudo usermod -aG docker $USER) "
                         "and log in again, or use --runtime podman (rootless).")
    if "Cannot connect to the Docker daemon" in text or "Is the docker daemon running" in text:
        return CubeError(f"The Docker engine on {where} is not running (the CLI cannot "
                         "connect to it).", "Start it: sudo systemctl start docker, or "
                         "scripts/docker-up.sh on a machine without systemd.")
    if engine == "podman" and ("newuidmap" in text or "subuid" in text or "subgid" in text):
        return CubeError(f"Rootless podman on {where} cannot map user IDs: {_tail(text, 3)}",
                         "Install uidmap (apt-get install uidmap) and give the user ranges in "
                         "/etc/subuid and /etc/subgid (usermod --add-subuids 100000-165535 "
                         "--add-subgids 100000-165535 USER), then `podman system migrate`.")
    fix = "Check `podman info` on that machine (scripts/podman-up.sh sets it up)." \
        if engine == "podman" else "Check `docker info` on that machine."
    return CubeError(f"The {title} engine on {where} did not answer (exit {result.code}): "
                     f"{_tail(text, 5)}", fix)


def image_id(ex: Executor, ref: str, engine: str = "docker") -> str | None:
    """`sha256:...` of an image (by name or ID) on the executor's engine, None when absent."""
    result = ex.sh(f"{engine} image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)}",
                   timeout=60)
    found = result.stdout.strip()
    if result.code != 0 or not found:
        return None
    return found if found.startswith("sha256:") else f"sha256:{found}"  # podman: bare hex


def short(image_ref: str | None) -> str:
    return (image_ref or "?").removeprefix("sha256:")[:12]


# ---- image strategy --------------------------------------------------------------------------

def names_registry(image: str) -> bool:
    """Docker's own rule: the first path component names a registry when it has a '.' or ':'
    or is 'localhost' (`ghcr.io/x/y`, `host:5000/y`); `cube/hello` and `ubuntu` do not."""
    first, sep, _ = image.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def build_strategy(cube: Cube, requested: str | None = None) -> tuple[str, str]:
    """(strategy, why): --build-strategy > mlcube.yaml docker.build_strategy > pull when the
    image names a registry > auto when the cube has a Dockerfile > pull (Docker Hub)."""
    declared = requested or cube.docker.get("build_strategy")
    if declared:
        strategy = ALIASES.get(str(declared), str(declared))
        if strategy not in STRATEGIES:
            raise ConfigError(cube.mlcube_file, f"has unknown build strategy '{declared}'.",
                              f"Valid strategies: {', '.join(STRATEGIES)}.",
                              field="docker.build_strategy")
        return strategy, ("requested" if requested else "docker.build_strategy in mlcube.yaml")
    if names_registry(image_name(cube)):
        return "pull", "the image names a registry"
    if dockerfile_path(cube) is not None:
        return "auto", "the cube has a Dockerfile"
    return "pull", "the cube has no Dockerfile"


def image_name(cube: Cube) -> str:
    image = cube.docker.get("image")
    if not isinstance(image, str) or not image:
        raise ConfigError(cube.mlcube_file, "needs the image name for the docker runtime.",
                          "Add 'image: my-org/my-cube:0.1' under 'docker:'.", field="docker.image")
    return image


def build_context(cube: Cube) -> Path:
    return cube.root / str(cube.docker.get("build_context") or ".")


def dockerfile_path(cube: Cube) -> Path | None:
    path = build_context(cube) / str(cube.docker.get("build_file") or "Dockerfile")
    return path if path.is_file() else None


def context_hash(cube: Cube) -> str:
    """sha256 (16 hex) of the build context as `docker build` would send it: every file not
    excluded by .dockerignore (nor in the workspace, whose outputs change on every run), plus
    the Dockerfile. Stored as the image's `cube.context` label, it says whether a rebuild is due."""
    context = build_context(cube)
    digest = hashlib.sha256()
    for path in sorted(_context_files(cube, context)):
        rel = path.relative_to(context).as_posix() if path.is_relative_to(context) else str(path)
        digest.update(f"{rel}\0{path.stat().st_mode & 0o111}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _context_files(cube: Cube, context: Path) -> set[Path]:
    ignore_file = context / ".dockerignore"
    lines = ignore_file.read_text().splitlines() if ignore_file.is_file() else []
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    files = {p for p in context.rglob("*") if p.is_file() and not p.is_symlink()
             and not p.is_relative_to(cube.workspace)
             and not spec.match_file(p.relative_to(context).as_posix())}
    dockerfile = dockerfile_path(cube)
    return files | ({dockerfile} if dockerfile else set())


# ---- getting the image onto an engine --------------------------------------------------------

def ensure_image(ex: Executor, cube: Cube, log: Log, *, strategy: str | None = None,
                 context_dir: str | None = None, where: str = "this machine",
                 engine: str = "docker") -> str:
    """Make the cube's image present on the executor's engine by `pull`, `build` or `auto`
    (playbooks/docker.yaml, run with the engine's CLI) and return its ID. `context_dir` is the
    build context on that machine (default: the cube's own, for local runs). `ship` is
    ship_image's job. A present image is never re-pulled (runs stay offline-safe; refresh a
    moving tag with `docker pull`); `build` rebuilds only when the build context's hash changed."""
    image = image_name(cube)
    strategy = strategy or build_strategy(cube)[0]
    if strategy == "ship":
        raise CubeError("build_strategy 'ship' sends an image from the controller; "
                        "use ship_image for it.", "Call ensure_image with build, pull or auto.")
    dockerfile = dockerfile_path(cube)
    if strategy == "build" and dockerfile is None:
        raise _no_dockerfile(cube)
    context = context_dir or str(build_context(cube))
    variables = {"engine": engine, "image": image, "strategy": strategy, "context": context,
                 "build_file": str(PurePosixPath(context) / _build_file(cube)),
                 "context_hash": context_hash(cube) if dockerfile else "",
                 "has_dockerfile": dockerfile is not None}
    try:
        steps = run_playbook("docker", variables, ex, lambda _m: None)
    except StepFailed as err:
        raise _translate(err, cube, image, where, engine) from None
    found = image_id(ex, image, engine)
    if found is None:
        raise CubeError(f"{engine} reports image {image} missing on {where} right after making "
                        "it present.", f"Check `{engine} image ls` there.")
    _report(steps, found, log)
    return found


def image_plan(ex: Executor, cube: Cube, strategy: str, why: str, where: str,
               engine: str = "docker") -> str:
    """What ensure_image/ship would do, said without building, pulling or sending anything."""
    image = image_name(cube)
    found = image_id(ex, image, engine)
    state = f"present as {short(found)}" if found else "absent"
    return f"image {image}: strategy {strategy} ({why}); {state} on {where}"


def _build_file(cube: Cube) -> str:
    return str(cube.docker.get("build_file") or "Dockerfile")


def _report(steps, found: str | None, log: Log) -> None:
    for step in steps:
        if step.name in ("build", "pull") and step.status == "skipped":
            log(f"image {short(found)} present, skipping {step.name}")
        elif step.name == "build" and step.status == "ran":
            log(f"built image {short(found)}")
        elif step.name == "pull" and step.status == "ran":
            log(f"pulled image {short(found)}")


def _translate(err: StepFailed, cube: Cube, image: str, where: str, engine: str) -> CubeError:
    if err.step == "engine reachable":
        return engine_error(err.result, where, engine)
    tail = _tail(err.result.output, TAIL_LINES)
    if err.step == "build":
        return CubeError(f"Building image {image} from {dockerfile_path(cube)} with {engine} on "
                         f"{where} failed (exit {err.result.code}). Last lines:\n{_indent(tail)}",
                         "Fix the Dockerfile step shown above, then run again.")
    return CubeError(f"Image {image} is not on {where} and could not be pulled "
                     f"(exit {err.result.code}):\n{_indent(tail)}",
                     "If no registry is reachable from there, set 'build_strategy: build' "
                     "(build from the Dockerfile there) or 'ship' (send the controller's image "
                     "over SSH) under 'docker:' in mlcube.yaml.")


def _no_dockerfile(cube: Cube) -> ConfigError:
    return ConfigError(cube.mlcube_file, f"sets build_strategy 'build', but there is no "
                       f"{_build_file(cube)} in {build_context(cube)}.",
                       "Add the Dockerfile, fix docker.build_context / docker.build_file, or "
                       "use 'build_strategy: pull'.", field="docker.build_file")


# ---- ship: controller -> host over a byte stream ---------------------------------------------

class StreamTarget(Executor, Protocol):
    """What shipping needs of the receiving side: a shell, and a command fed bulk bytes
    (controller.target.Target has both)."""

    def open_stream(self, argv: Sequence[str]) -> Stream: ...


def ship_image(image: str, local: Executor, remote: StreamTarget, log: Log,
               where: str = "the host", engine: str = "docker") -> str:
    """Send the controller's image to the host's engine (`ENGINE save | ENGINE load`), unless
    the host already has that image ID (then at most a tag). Returns the ID. `local` is the
    controller's engine, where `save` runs."""
    local_id = image_id(local, image, engine)
    if local_id is None:
        raise CubeError(f"Image {image} is not in the controller's {engine} engine, so it cannot "
                        "be shipped.", "Build or pull it here first (the ship strategy does "
                        "this through ensure_ship_image).")
    if image_id(remote, image, engine) == local_id:
        log(f"host already has image {short(local_id)}, nothing to ship")
        return local_id
    bare = local_id.removeprefix("sha256:")   # both CLIs take the bare ID; podman no prefix
    if image_id(remote, bare, engine) == local_id:
        _check(remote.sh(shlex.join([engine, "tag", bare, image])), engine, f"tag on {where}")
        log(f"host already has image {short(local_id)}, nothing to ship (tagged {image})")
        return local_id
    sent, seconds = _stream_save(image, remote, where, engine)
    if image_id(remote, image, engine) != local_id:
        raise CubeError(f"Shipping image {image} to {where} finished, but the host's image ID "
                        "differs from the controller's.", "Run again; if it persists, check "
                        f"the host's disk space ({engine} system df).")
    log(f"shipped image {short(local_id)} to {where} ({sent / 1e6:.1f} MB in {seconds:.1f} s)")
    return local_id


def _stream_save(image: str, remote: StreamTarget, where: str, engine: str) -> tuple[int, float]:
    start, sent = time.monotonic(), 0
    stream = remote.open_stream([engine, "load", "--quiet"])
    save = subprocess.Popen([engine, "save", image], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert save.stdout is not None and save.stderr is not None  # both are PIPEs
    try:
        while chunk := save.stdout.read(CHUNK):
            stream.write(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionError, OSError):
        save.kill()  # the host's `load` stopped reading: its error says why
    finally:
        save.stdout.close()
        save_err = save.stderr.read().decode(errors="replace")
        save.wait()
    loaded = _finish(stream)
    if loaded.code != 0:
        raise CubeError(f"`{engine} load` on {where} failed (exit {loaded.code}): "
                        f"{_tail(loaded.output, 5)}", "Check the host's disk space and engine.")
    if save.returncode != 0:
        raise CubeError(f"`{engine} save {image}` on the controller failed: "
                        f"{_tail(save_err, 5)}", f"Check that the image exists here "
                        f"({engine} image ls).")
    return sent, time.monotonic() - start


def _finish(stream: Stream) -> ExecResult:
    try:
        stream.close_stdin()
        code = stream.wait()
        return ExecResult(code, "", stream.stderr_text())
    finally:
        stream.close()


def ensure_ship_image(cube: Cube, local: Executor, remote: StreamTarget, log: Log,
                      where: str = "the host", engine: str = "docker") -> str:
    """The `ship` strategy: the image on the controller (auto: present, else built or
    pulled here), then sent to the host's engine."""
    check_engine(remote, where, engine)
    ensure_image(local, cube, log, strategy="auto", engine=engine)
    return ship_image(image_name(cube), local, remote, log, where, engine)


# ---- helpers ---------------------------------------------------------------------------------

def _check(result: ExecResult, engine: str, what: str) -> ExecResult:
    if result.code != 0:
        raise CubeError(f"{engine} {what} failed (exit {result.code}): {_tail(result.output, 5)}",
                        f"Run the same `{engine}` command on that machine to see why.")
    return result


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:]) or "(no output)"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
