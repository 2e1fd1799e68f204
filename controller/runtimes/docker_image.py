"""Docker images for the docker runtime: the engine check, the build strategy (pull, build,
auto, ship), getting a cube's image onto an engine (ensure_image, rebuilt only when the build
context's hash label changed), and shipping the controller's image to a host over SSH.

Every engine call is a shell command given to an executor (`sh(command) -> ExecResult`), see
controller.runtimes.docker for why the CLI and not the docker SDK.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Protocol

from controller.errors import ConfigError, CubeError
from controller.provision import ExecResult, Executor, StepFailed, run_playbook

STRATEGIES = ("pull", "build", "auto", "ship")
ALIASES = {"always": "build"}        # MLCube's name for "build every time"
TAIL_LINES = 20
CHUNK = 1 << 20
Log = Callable[[str], None]


# ---- engine ----------------------------------------------------------------------------------

def check_engine(ex: Executor, where: str = "this machine") -> str:
    """The engine's server version, or a CubeError saying what is wrong and how to fix it."""
    result = ex.sh("docker version --format 'server {{.Server.Version}}'", timeout=60)
    if result.code == 0 and "server" in result.stdout:
        return result.stdout.split("server", 1)[1].strip()
    raise engine_error(result, where)


def engine_error(result: ExecResult, where: str) -> CubeError:
    text = result.output
    if result.code == 127 or "command not found" in text or "No such file" in text:
        return CubeError(f"The Docker CLI is not installed on {where}.",
                         "Install Docker (Debian/Ubuntu: apt-get install docker.io), or run "
                         "with --runtime python.")
    if "permission denied" in text.lower():
        return CubeError(f"The Docker engine on {where} refused this user: permission denied "
                         "on its socket (/var/run/docker.sock).",
                         "Add the user to the docker group (sudo usermod -aG docker $USER) "
                         "and log in again.")
    if "Cannot connect to the Docker daemon" in text or "Is the docker daemon running" in text:
        return CubeError(f"The Docker engine on {where} is not running (the CLI cannot "
                         "connect to it).", "Start it: sudo systemctl start docker, or "
                         "scripts/docker-up.sh on a machine without systemd.")
    return CubeError(f"The Docker engine on {where} did not answer (exit {result.code}): "
                     f"{_tail(text, 5)}", "Check `docker info` on that machine.")


def image_id(ex: Executor, ref: str) -> str | None:
    """`sha256:...` of an image (by name or ID) on the executor's engine, None when absent."""
    result = ex.sh(f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)}", timeout=60)
    return result.stdout.strip() if result.code == 0 and result.stdout.strip() else None


def short(image_ref: str | None) -> str:
    return (image_ref or "?").removeprefix("sha256:")[:12]


# ---- image strategy --------------------------------------------------------------------------

def names_registry(image: str) -> bool:
    """Docker's own rule: the first path component names a registry when it has a '.' or ':'
    or is 'localhost' (`ghcr.io/x/y`, `host:5000/y`); `cube/hello` and `ubuntu` do not."""
    first, sep, _ = image.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def build_strategy(cube, requested: str | None = None) -> tuple[str, str]:
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


def image_name(cube) -> str:
    image = cube.docker.get("image")
    if not isinstance(image, str) or not image:
        raise ConfigError(cube.mlcube_file, "needs the image name for the docker runtime.",
                          "Add 'image: my-org/my-cube:0.1' under 'docker:'.", field="docker.image")
    return image


def build_context(cube) -> Path:
    return cube.root / str(cube.docker.get("build_context") or ".")


def dockerfile_path(cube) -> Path | None:
    path = build_context(cube) / str(cube.docker.get("build_file") or "Dockerfile")
    return path if path.is_file() else None


def context_hash(cube) -> str:
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


def _context_files(cube, context: Path) -> set[Path]:
    import pathspec

    ignore_file = context / ".dockerignore"
    lines = ignore_file.read_text().splitlines() if ignore_file.is_file() else []
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    files = {p for p in context.rglob("*") if p.is_file() and not p.is_symlink()
             and not p.is_relative_to(cube.workspace)
             and not spec.match_file(p.relative_to(context).as_posix())}
    dockerfile = dockerfile_path(cube)
    return files | ({dockerfile} if dockerfile else set())


# ---- getting the image onto an engine --------------------------------------------------------

def ensure_image(ex: Executor, cube, log: Log, *, strategy: str | None = None,
                 context_dir: str | None = None, where: str = "this machine") -> str:
    """Make the cube's image present on the executor's engine by `pull`, `build` or `auto`
    (playbooks/docker.yaml) and return its ID. `context_dir` is the build context on that
    machine (default: the cube's own, for local runs). `ship` is ship_image's job.
    A present image is never re-pulled (runs stay offline-safe; refresh a moving tag with
    `docker pull`); `build` rebuilds only when the build context's hash changed."""
    image = image_name(cube)
    strategy = strategy or build_strategy(cube)[0]
    if strategy == "ship":
        raise CubeError("build_strategy 'ship' sends an image from the controller; "
                        "use ship_image for it.", "Call ensure_image with build, pull or auto.")
    dockerfile = dockerfile_path(cube)
    if strategy == "build" and dockerfile is None:
        raise _no_dockerfile(cube)
    context = context_dir or str(build_context(cube))
    variables = {"image": image, "strategy": strategy, "context": context,
                 "build_file": str(PurePosixPath(context) / _build_file(cube)),
                 "context_hash": context_hash(cube) if dockerfile else "",
                 "has_dockerfile": dockerfile is not None}
    try:
        steps = run_playbook("docker", variables, ex, lambda _m: None)
    except StepFailed as err:
        raise _translate(err, cube, image, where) from None
    found = image_id(ex, image)
    _report(steps, found, log)
    return found


def _build_file(cube) -> str:
    return str(cube.docker.get("build_file") or "Dockerfile")


def _report(steps, found: str | None, log: Log) -> None:
    for step in steps:
        if step.name in ("build", "pull") and step.status == "skipped":
            log(f"image {short(found)} present, skipping {step.name}")
        elif step.name == "build" and step.status == "ran":
            log(f"built image {short(found)}")
        elif step.name == "pull" and step.status == "ran":
            log(f"pulled image {short(found)}")


def _translate(err: StepFailed, cube, image: str, where: str) -> CubeError:
    if err.step == "engine reachable":
        return engine_error(err.result, where)
    tail = _tail(err.result.output, TAIL_LINES)
    if err.step == "build":
        return CubeError(f"Building image {image} from {dockerfile_path(cube)} on {where} "
                         f"failed (exit {err.result.code}). Last lines:\n{_indent(tail)}",
                         "Fix the Dockerfile step shown above, then run again.")
    return CubeError(f"Image {image} is not on {where} and could not be pulled "
                     f"(exit {err.result.code}):\n{_indent(tail)}",
                     "If no registry is reachable from there, set 'build_strategy: build' "
                     "(build from the Dockerfile there) or 'ship' (send the controller's image "
                     "over SSH) under 'docker:' in mlcube.yaml.")


def _no_dockerfile(cube) -> ConfigError:
    return ConfigError(cube.mlcube_file, f"sets build_strategy 'build', but there is no "
                       f"{_build_file(cube)} in {build_context(cube)}.",
                       "Add the Dockerfile, fix docker.build_context / docker.build_file, or "
                       "use 'build_strategy: pull'.", field="docker.build_file")


# ---- ship: controller -> host over a byte stream ---------------------------------------------

class StdinSink(Protocol):
    """A command running on the host, fed through its stdin."""
    def write(self, data: bytes) -> object: ...
    def wait(self) -> ExecResult: ...            # closes stdin, waits for the command


class ShipTarget(Executor, Protocol):
    def open_remote_stdin(self, argv: list[str]) -> StdinSink: ...


def ship_image(image: str, local: Executor, remote: ShipTarget, log: Log,
               where: str = "the host") -> str:
    """Send the controller's image to the host's engine (`docker save | docker load`), unless
    the host already has that image ID (then at most a `docker tag`). Returns the ID."""
    local_id = image_id(local, image)
    if local_id is None:
        raise CubeError(f"Image {image} is not on the controller, so it cannot be shipped.",
                        "Build or pull it here first (the ship strategy does this through "
                        "ensure_ship_image).")
    if image_id(remote, image) == local_id:
        log(f"host already has image {short(local_id)}, nothing to ship")
        return local_id
    if image_id(remote, local_id) == local_id:
        _check(remote.sh(shlex.join(["docker", "tag", local_id, image])), f"tag on {where}")
        log(f"host already has image {short(local_id)}, nothing to ship (tagged {image})")
        return local_id
    sent, seconds = _stream_save(image, remote, where)
    if image_id(remote, image) != local_id:
        raise CubeError(f"Shipping image {image} to {where} finished, but the host's image ID "
                        "differs from the controller's.", "Run again; if it persists, check "
                        "the host's disk space (docker system df).")
    log(f"shipped image {short(local_id)} to {where} ({sent / 1e6:.1f} MB in {seconds:.1f} s)")
    return local_id


def _stream_save(image: str, remote: ShipTarget, where: str) -> tuple[int, float]:
    start, sent = time.monotonic(), 0
    sink = remote.open_remote_stdin(["docker", "load", "--quiet"])
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        while chunk := save.stdout.read(CHUNK):
            sink.write(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionError, OSError):
        save.kill()  # the host's `docker load` stopped reading: its error says why
    finally:
        save.stdout.close()
        save_err = save.stderr.read().decode(errors="replace")
        save.wait()
    loaded = sink.wait()
    if loaded.code != 0:
        raise CubeError(f"`docker load` on {where} failed (exit {loaded.code}): "
                        f"{_tail(loaded.output, 5)}", "Check the host's disk space and engine.")
    if save.returncode != 0:
        raise CubeError(f"`docker save {image}` on the controller failed: {_tail(save_err, 5)}",
                        "Check that the image exists here (docker image ls).")
    return sent, time.monotonic() - start


def ensure_ship_image(cube, local: Executor, remote: ShipTarget, log: Log,
                      where: str = "the host") -> str:
    """The `ship` strategy: the image on the controller (auto: present, else built or
    pulled here), then sent to the host's engine."""
    check_engine(remote, where)
    ensure_image(local, cube, log, strategy="auto")
    return ship_image(image_name(cube), local, remote, log, where)


class LocalStdin:
    """open_remote_stdin for this machine (tests, and `ship` to a second local engine)."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)

    def write(self, data: bytes) -> int:
        return self.proc.stdin.write(data)

    def wait(self) -> ExecResult:
        out, err = self.proc.communicate()
        return ExecResult(self.proc.returncode, out.decode(errors="replace"),
                          err.decode(errors="replace"))


class StreamSink:
    """StdinSink over a controller.streams Stream (an SSH channel or a local process)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data: bytes) -> int:
        return self.stream.write(data)

    def wait(self) -> ExecResult:
        try:
            self.stream.close_stdin()
            code = self.stream.wait()
            return ExecResult(code, "", self.stream.stderr_text())
        finally:
            self.stream.close()


class ConnTarget:
    """A HostConnection as a ship target: `sh` as is, stdin streams on its SSH transport."""

    def __init__(self, conn):
        self.conn = conn

    def sh(self, command: str, *, timeout: float | None = None) -> ExecResult:
        return self.conn.sh(command, timeout=timeout)

    def open_remote_stdin(self, argv: list[str]) -> StreamSink:
        from controller.streams import exec_stream

        return StreamSink(exec_stream(self.conn.client, shlex.join(argv)))


# ---- helpers ---------------------------------------------------------------------------------

def _check(result: ExecResult, what: str) -> ExecResult:
    if result.code != 0:
        raise CubeError(f"docker {what} failed (exit {result.code}): {_tail(result.output, 5)}")
    return result


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:]) or "(no output)"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
