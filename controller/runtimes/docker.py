"""The docker runtime: run a cube's tasks in containers, on this machine or on a host.

Why the Docker CLI and not the docker SDK: remote engines are reached through cube's own SSH
connection (host keys checked against cube's known_hosts, one reused connection, retries), and
the CLI is what every host with an engine has; the SDK's ssh:// transport opens its own
connections and bypasses both. So every engine call is a shell command given to an executor
(`sh(command) -> ExecResult`): LocalExecutor for `cube run`, a HostConnection for a host.
Getting the cube's image onto the engine is controller.runtimes.docker_image's job.
"""

from __future__ import annotations

import csv
import io
import os
import re
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

from controller.errors import CubeError
from controller.provision import Executor, LocalExecutor
from controller.runtimes.docker_image import (ConnTarget, Log, build_strategy, ensure_image,
                                              ensure_ship_image, image_id, image_name, short)
# Re-exported: image handling lived here before it had its own module.
from controller.runtimes.docker_image import (ALIASES, CHUNK, STRATEGIES,  # noqa: F401
                                              TAIL_LINES, LocalStdin, ShipTarget, StdinSink,
                                              StreamSink, build_context, check_engine,
                                              context_hash, dockerfile_path, engine_error,
                                              names_registry, ship_image)

MOUNT_ROOT = "/mnt/cube"


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
