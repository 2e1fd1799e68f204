"""The container runtimes: run a cube's tasks in containers, on this machine or on a host.

`DockerRuntime` and `PodmanRuntime` (controller.runtimes.podman) are one class with a different
engine: podman takes docker's CLI arguments for everything used here. `prepare` makes the image
present (controller.runtimes.docker_image), then returns one `ENGINE run` per task.

Why the engine's CLI and not the docker SDK: remote engines are reached through cube's own SSH
connection (host keys checked against cube's known_hosts, one reused connection, retries), and
the CLI is what every host with an engine has; the SDK's ssh:// transport opens its own
connections and bypasses both, and podman would need a second client library. So every engine
call is a shell command given to the target (`target.sh`), and `save | load` shipping is a byte
stream to it (`target.open_stream`).
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
import secrets
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from controller.cube import Cube, Param
from controller.errors import ConfigError, CubeError
from controller.plan import HostLayout, JobLayout, JobPlan
from controller.provision import LocalExecutor
from controller.runtimes.base import HostFacts, LaunchSpec, Log, TaskLaunch

# Re-exported: image handling lived here before it had its own module.
from controller.runtimes.docker_image import (  # noqa: F401
    ALIASES,
    CHUNK,
    STRATEGIES,
    TAIL_LINES,
    EngineInfo,
    build_context,
    build_strategy,
    check_engine,
    context_hash,
    dockerfile_path,
    engine_error,
    engine_info,
    ensure_image,
    ensure_ship_image,
    image_id,
    image_name,
    image_plan,
    names_registry,
    ship_image,
    short,
)
from controller.target import Executor, Target
from controller.taskargs import task_argv

MOUNT_ROOT = "/mnt/cube"
_ULIMIT_VALUE = re.compile(r"^(-?\d+|unlimited)(:(-?\d+|unlimited))?$")


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
    `path_map` {local prefix: host prefix} is replaced; unmapped paths stay."""
    text = str(path)
    for local, remote in sorted((path_map or {}).items(), key=lambda kv: -len(str(kv[0]))):
        local = str(local).rstrip("/")
        if text == local or text.startswith(local + "/"):
            return str(remote).rstrip("/") + text[len(local):]
    return text


PathMap = Mapping | Callable[[Param], str] | None


def plan_mounts(params: Sequence[Param], path_map: PathMap = None
                ) -> tuple[list[Mount], dict[str, str]]:
    """One bind mount per distinct host folder (a file parameter mounts its parent), and each
    parameter's path inside the container. `path_map` gives host paths: a {local prefix: host
    prefix} mapping, or a function Param -> host path (a layout's `path_for`). A folder shared
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


def container_env(cube: Cube, env: Mapping | None, gpus: list[int] | None) -> dict[str, str]:
    """mlcube.yaml docker.env, then the caller's. HOME=/tmp because the container runs as the
    user's uid, which has no home (or passwd entry) in the image; caches need somewhere."""
    out = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1"}
    out.update({str(k): str(v) for k, v in (cube.docker.get("env") or {}).items()})
    out.update({str(k): str(v) for k, v in (env or {}).items()})
    if gpus:
        # Only the chosen devices are exposed, renumbered from 0 inside the container.
        out["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpus)))
    return out


def gpu_args(cube: Cube, gpus: list[int] | None, engine: str = "docker") -> list[str]:
    if not gpus or int(cube.platform.get("accelerator_count") or 0) <= 0:
        return []
    if engine == "podman":  # podman has no --gpus: NVIDIA's CDI names each device
        return [arg for g in gpus for arg in ("--device", f"nvidia.com/gpu={g}")]
    # The CLI parses --gpus as CSV: a list of devices must be one quoted field.
    return ["--gpus", f'"device={",".join(str(g) for g in gpus)}"']


def choose_gpus(cube: Cube, host_gpus: list[int]) -> list[int] | None:
    """The first `platform.accelerator_count` of the host's GPUs; None for CPU-only runs."""
    want = int(cube.platform.get("accelerator_count") or 0)
    return list(host_gpus[:want]) if want > 0 and host_gpus else None


def ulimits(cube: Cube) -> dict[str, str]:
    """mlcube.yaml `docker.ulimits` ({nofile: "1024:1024", nproc: 4096}) as --ulimit values.
    Engines raise some limits by default; where the machine forbids that (rootful podman in
    some VMs: `error setting rlimit type 6/7`), explicit lower limits let containers start."""
    raw = cube.docker.get("ulimits") or {}
    if not isinstance(raw, dict):
        raise ConfigError(cube.mlcube_file, "'docker.ulimits' must be a mapping of limit name "
                          "to SOFT:HARD.", "Write it as 'ulimits: {nofile: \"1024:1024\", "
                          "nproc: \"4096:4096\"}' under 'docker:'.", field="docker.ulimits")
    out = {}
    for name, value in raw.items():
        text = str(value).strip()
        if not re.fullmatch(r"[a-z]+", str(name)) or not _ULIMIT_VALUE.match(text):
            raise ConfigError(cube.mlcube_file, f"has ulimit '{name}: {value}', which is not "
                              "NAME: SOFT[:HARD].", "Quote the value, e.g. nofile: \"1024:1024\" "
                              "(names as in `docker run --ulimit`: nofile, nproc, memlock...).",
                              field=f"docker.ulimits.{name}")
        out[str(name)] = text
    return out


def container_argv(cube: Cube, task: str, params: Sequence[Param] | None = None, *, image: str,
                   job_name: str, uid: int, gid: int, engine: str = "docker",
                   gpus: list[int] | None = None, env: Mapping | None = None,
                   cpus: float | str | None = None, memory: str | None = None,
                   limits: Mapping[str, str] | None = None,
                   path_map: PathMap = None) -> list[str]:
    """`ENGINE run` for one task: the image's ENTRYPOINT gets `TASK --param=/mnt/cube/ioN/..`
    (MLCube's convention), built by the one task_argv with container paths. `params` are the
    task's resolved parameters (controller.plan.TaskPlan.params; default: as declared)."""
    params = list(cube.task(task).params if params is None else params)
    mounts, inside = plan_mounts(params, path_map)
    gpus = gpus if gpu_args(cube, gpus, engine) else None
    argv = [engine, "run", "--rm", "--init", "--name", job_name,
            "--label", f"cube.job={job_name}", "--user", f"{uid}:{gid}",
            *gpu_args(cube, gpus, engine)]
    for key, value in container_env(cube, env, gpus).items():
        argv += ["-e", f"{key}={value}"]
    argv += ["--cpus", str(cpus)] if cpus else []
    argv += ["--memory", str(memory)] if memory else []
    for name, value in (limits or {}).items():
        argv += ["--ulimit", f"{name}={value}"]
    for mount in mounts:
        argv += ["--mount", mount.spec()]
    return argv + _entry_and_args(cube, task, params, inside, image)


def _entry_and_args(cube: Cube, task: str, params: list[Param], inside: dict[str, str],
                    image: str) -> list[str]:
    spec = cube.task(task)
    args = task_argv(cube, task, params, path_for=lambda p: inside[p.name], with_entry=False)
    if spec.entrypoint:  # MLCube's per-task entrypoint replaces ENTRYPOINT and the task name
        words = shlex.split(spec.entrypoint)
        return ["--entrypoint", words[0], image, *words[1:], *args]
    return [image, *args]


def job_name(cube: Cube, task: str) -> str:
    """A container name (engines allow [a-zA-Z0-9][a-zA-Z0-9_.-]*), unique per run."""
    base = re.sub(r"[^a-zA-Z0-9_.-]+", "-", f"cube-{cube.name}-{task}").strip("-.")
    return f"{base}-{secrets.token_hex(3)}"


def host_job_name(job_id: str) -> str:
    """A host job's container: every task's, one after another (--rm frees the name)."""
    return f"cube-{re.sub(r'[^a-zA-Z0-9_.-]+', '-', job_id)}"


def with_folders(folders: list[str], argv: list[str]) -> list[str]:
    """argv run after `mkdir -p` of the mount folders, made by the target's user just before
    the task (--mount refuses missing ones; a job's outputs, and inputs an earlier task of the
    job writes, exist only then). `exec` keeps one process, so signals reach `ENGINE run`."""
    script = f"mkdir -p -- {shlex.join(folders)} && exec \"$@\"" if folders else 'exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *argv]


def stop_container(ex: Executor, name: str, grace: float = 10.0, engine: str = "docker") -> bool:
    """`ENGINE stop` (SIGTERM, SIGKILL after `grace`); False when no such container runs."""
    result = ex.sh(shlex.join([engine, "stop", "-t", str(int(grace)), name]),
                   timeout=grace + 60)
    return result.code == 0


def container_running(ex: Executor, name: str, engine: str = "docker") -> bool:
    # Docker reports names with a leading slash to the filter, podman without.
    result = ex.sh(shlex.join([engine, "ps", "-q", "--filter", f"name=^/?{name}$"]))
    return bool(result.stdout.strip())


# ---- the runtime -----------------------------------------------------------------------------

class ContainerRuntime:
    """prepare(plan, target, layout, facts, log) for one engine: the engine checked, the image
    present by its strategy, then one container per task as the target's user."""

    name = "docker"
    engine = "docker"

    def prepare(self, plan: JobPlan, target: Target, layout: JobLayout, facts: HostFacts,
                log: Log, *, dry_run: bool = False) -> LaunchSpec:
        cube, on_host = plan.cube, isinstance(layout, HostLayout)
        info = self.check(target, facts)
        image = self.image(cube, target, layout, log, on_host=on_host, dry_run=dry_run)
        uid, gid = self.user(info, facts)
        gpus = choose_gpus(cube, facts.gpus)
        limits = ulimits(cube)
        tasks = []
        for task in plan.tasks:
            name = (host_job_name(layout.job_id) if isinstance(layout, HostLayout)
                    else job_name(cube, task.name))
            argv = container_argv(cube, task.name, task.params, image=image_name(cube),
                                  job_name=name, uid=uid, gid=gid, engine=self.engine,
                                  gpus=gpus, cpus=cube.docker.get("cpus"),
                                  memory=cube.docker.get("memory"), limits=limits,
                                  path_map=layout.path_for)
            folders = [m.host for m in plan_mounts(task.params, layout.path_for)[0]]
            tasks.append(TaskLaunch(task.name, with_folders(folders, argv), layout.cube_dir,
                                    container=name))
        return LaunchSpec(self.name, tasks, env_key=image or "", engine=self.engine)

    def check(self, target: Target, facts: HostFacts) -> EngineInfo:
        """The engine answers: from the host's probe when it reports this engine (no extra
        round trip), else asked directly, which also tells whether podman runs rootless."""
        probed = facts.engine(self.engine)
        if probed and not probed.get("reachable"):
            raise CubeError(f"The {self.name} runtime cannot run on {target.name}: "
                            f"{probed.get('error')}.",
                            probed.get("hint") or f"Check `{self.engine} info` there.")
        if probed and (self.engine == "docker" or "rootless" in probed):
            return EngineInfo(self.engine, str(probed.get("server_version") or "?"),
                              bool(probed.get("rootless")))
        return engine_info(target, target.name, self.engine)

    def image(self, cube: Cube, target: Target, layout: JobLayout, log: Log, *,
              on_host: bool, dry_run: bool) -> str | None:
        """The image's ID on the target's engine. `ship` sends this machine's image to a host;
        on this machine it means `auto`. A dry run only says what would happen."""
        strategy, why = build_strategy(cube)
        if strategy == "ship" and not on_host:
            strategy, why = "auto", "ship means auto on this machine"
        if dry_run:
            log(image_plan(target, cube, strategy, why, target.name, self.engine))
            return image_id(target, image_name(cube), self.engine)
        if strategy == "ship":
            return ensure_ship_image(cube, LocalExecutor(), target, log, target.name,
                                     self.engine)
        context = posixpath.join(layout.cube_dir, str(cube.docker.get("build_context") or "."))
        return ensure_image(target, cube, log, strategy=strategy, context_dir=context,
                            where=target.name, engine=self.engine)

    def user(self, info: EngineInfo, facts: HostFacts) -> tuple[int, int]:
        """Who the container runs as, so that outputs belong to the target's user: that
        uid:gid; under rootless podman container root, which IS that user outside (with
        --userns=keep-id instead, the image's own binaries could not be executed)."""
        return (0, 0) if info.rootless else facts.uid_gid


class DockerRuntime(ContainerRuntime):
    name = "docker"
    engine = "docker"
