"""The docker runtime: get a cube's image onto an engine and run a task in a container.

Why the Docker CLI and not the docker SDK: remote engines are reached through cube's own SSH
connection (host keys checked against cube's known_hosts, one reused connection, retries), and
the CLI is what every host with an engine has; the SDK's ssh:// transport opens its own
connections and bypasses both. So every engine call is a shell command given to an executor
(`sh(command) -> ExecResult`): LocalExecutor for `cube run`, a HostConnection for a host.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import secrets
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping, Protocol

from controller.errors import ConfigError, CubeError
from controller.provision import ExecResult, Executor, LocalExecutor, StepFailed, run_playbook

STRATEGIES = ("pull", "build", "auto", "ship")
ALIASES = {"always": "build"}        # MLCube's name for "build every time"
MOUNT_ROOT = "/mnt/cube"
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


# ---- mounts and the container's command ------------------------------------------------------

@dataclass
class Mount:
    host: str                         # absolute folder on the engine's machine
    target: str                       # where the container sees it
    readonly: bool = True
    params: list[str] = field(default_factory=list)

    def spec(self) -> str:
        """`--mount` value. --mount rather than -v: -v silently creates a missing host folder
        (as root), --mount fails; and its CSV syntax can quote any path (-v breaks on ':')."""
        fields = ["type=bind", f"source={self.host}", f"target={self.target}"]
        fields += ["readonly"] if self.readonly else []
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow(fields)
        return buf.getvalue()


def host_path(path: Path, path_map: Mapping | None) -> str:
    """The engine machine's path for a controller path: the longest matching prefix of
    `path_map` {local prefix: host prefix} is replaced (remote runs); unmapped paths stay."""
    text = str(path)
    for local, remote in sorted((path_map or {}).items(), key=lambda kv: -len(str(kv[0]))):
        local = str(local).rstrip("/")
        if text == local or text.startswith(local + "/"):
            return str(remote).rstrip("/") + text[len(local):]
    return text


def plan_mounts(params, path_map: Mapping | Callable | None = None
                ) -> tuple[list[Mount], dict[str, str]]:
    """One bind mount per distinct host folder (a file parameter mounts its parent), and each
    parameter's path inside the container. `path_map` gives host paths: a {local prefix: host
    prefix} mapping, or a function Param -> host path (remote.remote_path_for). A folder shared
    by an `ro` input and anything writable is mounted read-write: one mount per folder, and
    the writer needs it; `ro` only holds when the folder is the task's alone to read."""
    mounts: dict[str, Mount] = {}
    inside: dict[str, str] = {}
    for p in params:
        full = str(path_map(p)) if callable(path_map) else host_path(p.path, path_map)
        folder = full if p.type == "directory" else str(PurePosixPath(full).parent)
        if not PurePosixPath(folder).is_absolute():
            raise CubeError(f"Parameter '{p.name}' maps to '{folder}', which is not an "
                            "absolute path, so it cannot be mounted into the container.",
                            "Give an absolute path (or one relative to the workspace).")
        mount = mounts.setdefault(folder, Mount(folder, f"{MOUNT_ROOT}/io{len(mounts)}"))
        mount.readonly = mount.readonly and p.io == "input" and p.opts == "ro"
        mount.params.append(p.name)
        inside[p.name] = (mount.target if p.type == "directory"
                          else f"{mount.target}/{PurePosixPath(full).name}")
    return list(mounts.values()), inside


def check_mount_sources(ex: Executor, mounts: list[Mount], where: str = "this machine") -> None:
    """Every mount's host folder exists (checked on the engine's machine, in one command)."""
    script = "; ".join(f"test -d {shlex.quote(m.host)} || echo {shlex.quote(m.host)}"
                       for m in mounts)
    missing = [line for line in ex.sh(script or "true").stdout.splitlines() if line]
    if missing:
        names = {m.host: ", ".join(m.params) for m in mounts}
        raise CubeError(f"Cannot mount {missing[0]} (parameter {names[missing[0]]}) into the "
                        f"container: the folder does not exist on {where}.",
                        "Create it, or point the parameter at an existing path.")


def container_env(cube, env: Mapping | None, gpus: list[int] | None) -> dict[str, str]:
    """mlcube.yaml docker.env, then the caller's. HOME=/tmp because the container runs as the
    user's uid, which has no home (or passwd entry) in the image; caches need somewhere."""
    out = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1"}
    out.update({str(k): str(v) for k, v in (cube.docker.get("env") or {}).items()})
    out.update({str(k): str(v) for k, v in (env or {}).items()})
    if gpus:
        # --gpus exposes only the chosen devices, renumbered from 0 inside the container.
        out["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpus)))
    return out


def gpu_args(cube, gpus: list[int] | None) -> list[str]:
    if not gpus or int(cube.platform.get("accelerator_count") or 0) <= 0:
        return []
    # The CLI parses --gpus as CSV: a list of devices must be one quoted field.
    return ["--gpus", f'"device={",".join(str(g) for g in gpus)}"']


def choose_gpus(cube, host_gpus: list[int]) -> list[int] | None:
    """The first `platform.accelerator_count` of the host's GPUs; None for CPU-only runs."""
    want = int(cube.platform.get("accelerator_count") or 0)
    return list(host_gpus[:want]) if want > 0 and host_gpus else None


def host_gpus(ex: Executor) -> list[int]:
    result = ex.sh("nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null", timeout=30)
    return [int(x) for x in result.stdout.split() if x.isdigit()] if result.code == 0 else []


def container_argv(cube, task: str, overrides: Mapping | None, *, image: str, job_name: str,
                   uid: int, gid: int, gpus: list[int] | None = None, env: Mapping | None = None,
                   cpus: float | str | None = None, memory: str | None = None,
                   path_map: Mapping | Callable | None = None) -> list[str]:
    """`docker run` for one task: the image's ENTRYPOINT gets `TASK --param=/mnt/cube/ioN/..`
    (MLCube's convention), built by the one task_argv with container paths."""
    from controller.taskargs import apply_param_overrides

    params = apply_param_overrides(cube, task, dict(overrides or {}))
    mounts, inside = plan_mounts(params, path_map)
    gpus = gpus if gpu_args(cube, gpus) else None
    argv = ["docker", "run", "--rm", "--init", "--name", job_name,
            "--label", f"cube.job={job_name}", "--user", f"{uid}:{gid}", *gpu_args(cube, gpus)]
    for key, value in container_env(cube, env, gpus).items():
        argv += ["-e", f"{key}={value}"]
    argv += ["--cpus", str(cpus)] if cpus else []
    argv += ["--memory", str(memory)] if memory else []
    for mount in mounts:
        argv += ["--mount", mount.spec()]
    return argv + _entry_and_args(cube, task, overrides, inside, image)


def _entry_and_args(cube, task: str, overrides, inside: dict[str, str], image: str) -> list[str]:
    from controller.taskargs import task_argv

    spec = cube.task(task)
    argv = task_argv(cube, task, dict(overrides or {}), path_for=lambda p: inside[p.name])
    if spec.entrypoint:  # MLCube's per-task entrypoint replaces ENTRYPOINT and the task name
        words = shlex.split(spec.entrypoint)
        return ["--entrypoint", words[0], image, *words[1:], *argv[len(spec.entry or []):]]
    return [image, task, *argv[len(cube.env.entry) + 1:]]


def job_name(cube, task: str) -> str:
    """A container name (Docker allows [a-zA-Z0-9][a-zA-Z0-9_.-]*), unique per run."""
    base = re.sub(r"[^a-zA-Z0-9_.-]+", "-", f"cube-{cube.name}-{task}").strip("-.")
    return f"{base}-{secrets.token_hex(3)}"


def stop_container(ex: Executor, name: str, grace: float = 10.0) -> bool:
    """`docker stop` (SIGTERM, SIGKILL after `grace`); False when no such container runs."""
    result = ex.sh(shlex.join(["docker", "stop", "-t", str(int(grace)), name]),
                   timeout=grace + 60)
    return result.code == 0


def container_running(ex: Executor, name: str) -> bool:
    result = ex.sh(shlex.join(["docker", "ps", "-q", "--filter", f"name=^/{name}$"]))
    return bool(result.stdout.strip())


# ---- `cube run --runtime docker` -------------------------------------------------------------

def run_task_in_docker(cube, task: str, overrides: dict[str, str], *, log: Log = print,
                       grace: float = 10.0, executor: Executor | None = None,
                       strategy: str | None = None, env: Mapping | None = None,
                       cpus=None, memory=None, user: tuple[int, int] | None = None,
                       name: str | None = None) -> int:
    """controller.runtimes entry for local runs: image by its strategy (`ship` is `auto` here,
    since the controller is the host), then the task in a container as this user; output to
    the terminal and the task log. Returns the exit code."""
    from controller.runner import run_process, task_log_path

    ex = executor or LocalExecutor()
    ensure_image(ex, cube, log, strategy=_local_strategy(cube, strategy))
    name = name or job_name(cube, task)
    argv = local_container_argv(cube, task, overrides, ex, name=name, user=user, env=env,
                                cpus=cpus, memory=memory)
    log_file = task_log_path(cube, task, overrides)
    log(f"running {task} in container {name} ({image_name(cube)}): log {log_file}")
    try:
        return run_process(argv, cwd=cube.root, log_file=log_file, grace=grace)
    finally:
        if container_running(ex, name):  # the CLI was killed before its container ended
            stop_container(ex, name, grace)
        # One that was created but never started (e.g. no GPU driver) is not removed by --rm.
        ex.sh(shlex.join(["docker", "rm", "-f", name]) + " >/dev/null 2>&1")


def local_container_argv(cube, task: str, overrides, ex: Executor, *, name: str,
                         user: tuple[int, int] | None = None, env: Mapping | None = None,
                         cpus=None, memory=None) -> list[str]:
    """container_argv for this machine: this user's uid:gid, this machine's GPUs, limits from
    the arguments or mlcube.yaml docker.cpus / docker.memory; mount folders checked."""
    from controller.taskargs import apply_param_overrides

    uid, gid = user or (os.getuid(), os.getgid())
    check_mount_sources(ex, plan_mounts(apply_param_overrides(cube, task, overrides))[0])
    return container_argv(cube, task, overrides, image=image_name(cube), job_name=name,
                          uid=uid, gid=gid, gpus=choose_gpus(cube, host_gpus(ex)), env=env,
                          cpus=cpus or cube.docker.get("cpus"),
                          memory=memory or cube.docker.get("memory"))


def _local_strategy(cube, requested: str | None) -> str:
    chosen = build_strategy(cube, requested)[0]
    return "auto" if chosen == "ship" else chosen


def plan_task(cube, task: str, overrides: dict[str, str], log: Log,
              executor: Executor | None = None) -> list[str]:
    """For `cube run --plan`: say what would happen to the image (without building or
    pulling) and return the task's `docker run` argv (job name shown as <job>)."""
    ex = executor or LocalExecutor()
    strategy, why = build_strategy(cube)
    found = image_id(ex, image_name(cube))
    state = f"present as {short(found)}" if found else "absent"
    log(f"image {image_name(cube)}: strategy {strategy} ({why}); {state} on this machine")
    return container_argv(cube, task, overrides, image=image_name(cube), job_name="<job>",
                          uid=os.getuid(), gid=os.getgid(), gpus=choose_gpus(cube, host_gpus(ex)),
                          cpus=cube.docker.get("cpus"), memory=cube.docker.get("memory"))


# ---- `cube remote run --runtime docker` ------------------------------------------------------

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


def remote_launch_spec(conn, cube, per_task: dict[str, dict], path_for, layout, job_id: str,
                       probe: dict, log: Log) -> dict:
    """The agent's launch spec for a docker job: the image made present on the host by its
    strategy, then one `docker run` per task, all named after the job (tasks run one after
    another and --rm removes each, so the name is free again; `cancel` stops it by name)."""
    where = f"host {getattr(getattr(conn, 'spec', None), 'name', None) or probe.get('hostname')}"
    _require_engine(probe, where)
    strategy = build_strategy(cube)[0]
    if strategy == "ship":
        ensure_ship_image(cube, LocalExecutor(), ConnTarget(conn), log, where)
    else:
        context = str(PurePosixPath(layout.cube_dir) / str(cube.docker.get("build_context") or "."))
        ensure_image(conn, cube, log, strategy=strategy, context_dir=context, where=where)
    uid, gid = _host_ids(conn, probe)
    indexes = [g["index"] for g in probe.get("gpus") or [] if g.get("index") is not None]
    gpus = choose_gpus(cube, indexes)
    name = f"cube-{re.sub(r'[^a-zA-Z0-9_.-]+', '-', job_id)}"
    tasks = []
    for task, overrides in per_task.items():
        argv = container_argv(cube, task, overrides, image=image_name(cube), job_name=name,
                              uid=uid, gid=gid, gpus=gpus, path_map=path_for,
                              cpus=cube.docker.get("cpus"), memory=cube.docker.get("memory"))
        folders = [m.host for m in _task_mounts(cube, task, overrides, path_for)]
        tasks.append({"name": task, "argv": with_folders(folders, argv), "cwd": layout.cube_dir})
    return {"tasks": tasks, "docker_container": name}


def with_folders(folders: list[str], argv: list[str]) -> list[str]:
    """argv run after `mkdir -p` of the mount folders, made by the host user just before the
    task (--mount refuses missing ones; a job's outputs, and inputs an earlier task of the
    job writes, exist only then). `exec` keeps one process, so signals reach `docker run`."""
    script = f"mkdir -p -- {shlex.join(folders)} && exec \"$@\"" if folders else 'exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *argv]


def _task_mounts(cube, task: str, overrides, path_for) -> list[Mount]:
    from controller.taskargs import apply_param_overrides

    return plan_mounts(apply_param_overrides(cube, task, overrides), path_for)[0]


def _require_engine(probe: dict, where: str) -> None:
    info = probe.get("docker") or {}
    if info and not info.get("reachable"):
        raise CubeError(f"The docker runtime cannot run on {where}: {info.get('error')}.",
                        info.get("hint") or "Check `docker info` on that host.")


def _host_ids(conn, probe: dict) -> tuple[int, int]:
    """The host user's uid:gid, so outputs there (and pulled back) are not owned by root."""
    if "uid" in probe and "gid" in probe:
        return int(probe["uid"]), int(probe["gid"])
    result = conn.sh("id -u; id -g")
    uid, gid = result.stdout.split()[:2]
    return int(uid), int(gid)


# ---- helpers ---------------------------------------------------------------------------------

def _check(result: ExecResult, what: str) -> ExecResult:
    if result.code != 0:
        raise CubeError(f"docker {what} failed (exit {result.code}): {_tail(result.output, 5)}")
    return result


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:]) or "(no output)"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
