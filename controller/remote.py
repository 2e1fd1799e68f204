"""The life of a remote job: connect, ensure agent, probe, sync up, provision, launch, follow,
pull outputs, record. `attach` resumes following and pulling for a job started earlier.

On the host (ROOT = the host's cube root):
    ROOT/cubes/<cube>/              cube code (mirror of the local cube, minus its workspace)
    ROOT/cubes/<cube>/workspace/    the task inputs pushed from the local workspace
    ROOT/jobs/<job>/workspace/      this job's outputs (two jobs never share outputs)
"""

from __future__ import annotations

import base64
import os
import posixpath
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from controller import jobs as ledger_mod
from controller.errors import CubeError, TaskFailed

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(f"cube: {message}", file=sys.stderr, flush=True)


@dataclass
class RunRequest:
    cube_path: Path
    host: str
    tasks: str
    overrides: dict[str, str] = field(default_factory=dict)
    config_overrides: list[str] = field(default_factory=list)
    workspace: Path | None = None
    runtime: str | None = None
    name: str | None = None
    detach: bool = False
    inventory: Path | None = None
    accept_new_host_key: bool = False


# ---- paths on the host ------------------------------------------------------------------------


@dataclass
class RemoteLayout:
    root: str
    cube_name: str
    job_id: str

    @property
    def cube_dir(self) -> str:
        return posixpath.join(self.root, "cubes", self.cube_name)

    @property
    def inputs_dir(self) -> str:
        return posixpath.join(self.cube_dir, "workspace")

    @property
    def job_dir(self) -> str:
        return posixpath.join(self.root, "jobs", self.job_id)

    @property
    def outputs_dir(self) -> str:
        return posixpath.join(self.job_dir, "workspace")


def job_params(cube, per_task: dict[str, dict]):
    """Every (task, param) of the job, with each task's parameter overrides applied."""
    from controller.taskargs import apply_param_overrides

    return [(t, p) for t, ov in per_task.items() for p in apply_param_overrides(cube, t, ov)]


def produced_paths(params) -> set[str]:
    return {p.rel for _, p in params if p.io == "output"}


def pushed_inputs(params) -> list[str]:
    """Workspace-relative inputs that must travel: not produced by an earlier task of the job."""
    produced = produced_paths(params)
    needed = []
    for task, p in params:
        if p.io != "input" or p.rel in produced:
            continue
        _require_inside_workspace(task, p)
        if not p.path.exists():
            raise CubeError(
                f"Input '{p.name}' of task '{task}' does not exist: {p.path}.",
                "Create it, point the parameter elsewhere with name=PATH, or add the task that "
                "produces it to --task.",
            )
        needed.append(p.rel)
    return sorted(set(needed))


def _require_inside_workspace(task: str, p) -> None:
    if p.rel is None:
        raise CubeError(
            f"Parameter '{p.name}' of task '{task}' points outside the workspace ({p.path}); "
            "remote runs sync only the workspace.",
            "Move the file into the workspace, or use --workspace to choose one that holds it.",
        )


def remote_path_for(params, layout: RemoteLayout):
    produced = produced_paths(params)

    def path_for(p) -> str:
        _require_inside_workspace("?", p)
        base = layout.outputs_dir if (p.io == "output" or p.rel in produced) else layout.inputs_dir
        return posixpath.join(base, p.rel)

    return path_for


def output_rels(params) -> list[str]:
    return sorted(produced_paths(params))


# ---- starting a job ---------------------------------------------------------------------------


def run(req: RunRequest, log: Log = stderr_log) -> int:
    """`cube remote run`: returns the exit code the CLI should exit with."""
    from controller.cube import load_cube
    from controller.environment import choose_runtime
    from controller.taskargs import overrides_for, split_tasks

    cube = load_cube(req.cube_path, workspace=req.workspace,
                     config_overrides=req.config_overrides)
    task_names = split_tasks(req.tasks, cube)
    runtime, why = choose_runtime(cube, req.runtime)
    per_task = overrides_for(cube, task_names, req.overrides)
    params = job_params(cube, per_task)
    inputs = pushed_inputs(params)
    conn = _connect(req.host, req.inventory, req.accept_new_host_key, log)
    try:
        if req.name:
            running = _running_job_named(conn, req.name)
            if running:
                log(f"job '{req.name}' is already running on {req.host} as {running}; attaching")
                return attach(running, log=log, conn=conn)
        job = _new_job(cube, req, task_names, runtime, params, conn)
        log(f"job {job.id}: {', '.join(task_names)} on {req.host} ({runtime}: {why})")
        layout = RemoteLayout(conn.root, cube.name, job.id)
        probe = _timed(log, "probe", lambda: conn.agent("probe"))
        _sync_up(conn, cube, layout, inputs, log)
        launch_spec = _prepare_runtime(conn, cube, runtime, per_task, params, layout, job,
                                       probe, log)
        _launch(conn, job, launch_spec, log)
        if req.detach:
            print(job.id)
            log(f"detached; follow with `cube remote attach {job.id}`")
            return 0
        return _follow_and_finish(conn, job, log)
    finally:
        conn.close()


def _connect(host: str, inventory, accept_new: bool, log: Log):
    from controller.hosts import resolve_host
    from controller.transport import connect

    spec = resolve_host(host, inventory)
    return _timed(log, f"connect {host}", lambda: connect(spec, accept_new_host_key=accept_new))


def _timed(log: Log, what: str, fn):
    start = time.monotonic()
    result = fn()
    log(f"{what}: {time.monotonic() - start:.2f}s")
    return result


def _running_job_named(conn, name: str) -> str | None:
    jobs = conn.agent("list-jobs", "--name", name).get("jobs", [])
    running = [j for j in jobs if j.get("state") in ("pending", "running")]
    return running[0]["job_id"] if running else None


def _new_job(cube, req: RunRequest, task_names, runtime, params, conn) -> ledger_mod.Job:
    job = ledger_mod.Job(
        id=ledger_mod.new_job_id(cube.name), cube=cube.name, host=req.host, tasks=task_names,
        name=req.name, cube_path=str(cube.root), params=dict(req.overrides),
        env_hash=cube.env.env_hash(), runtime=runtime, remote_dir=conn.root,
        workspace=str(cube.workspace), outputs=output_rels(params),
        inventory=str(req.inventory or ""),
    )
    job.log_path = str(_local_log_path(job.id))
    _CURRENT["job"] = job.id
    return job


_CURRENT: dict[str, str] = {}


def last_job_hint() -> str:
    job = _CURRENT.get("job")
    return f"Reattach with `cube remote attach {job}`." if job else ""


def _local_log_path(job_id: str) -> Path:
    from controller import paths

    return paths.cube_home() / "jobs" / job_id / "output.log"


def _sync_up(conn, cube, layout: RemoteLayout, inputs: list[str], log: Log) -> None:
    from controller import sync

    code = sync.push(conn, cube.root, layout.cube_dir, exclude=_workspace_inside(cube))
    log(f"sync code: {describe_sync(code)}")
    if inputs:
        data = sync.push(conn, cube.workspace, layout.inputs_dir, paths=inputs, delete=False)
        log(f"sync inputs: {describe_sync(data)}")


def describe_sync(report) -> str:
    return (f"{report.files_sent} files, {report.bytes_sent:,} bytes sent, "
            f"{report.files_deleted} deleted, {report.seconds:.2f}s")


def _workspace_inside(cube) -> list[str]:
    try:
        return [cube.workspace.relative_to(cube.root).as_posix()]
    except ValueError:
        return []


def _prepare_runtime(conn, cube, runtime, per_task, params, layout, job, probe,
                     log: Log) -> dict:
    from controller.runtimes.python import python_task_argv

    path_for = remote_path_for(params, layout)
    if runtime == "docker":
        from controller.runtimes import docker

        return docker.remote_launch_spec(conn, cube, per_task, path_for, layout, job.id,
                                         probe, log)
    env_dir, job.env_hash = _provision_python(conn, cube, probe, layout, log)
    tasks = [{"name": name, "argv": python_task_argv(cube, name, overrides, env_dir, path_for),
              "cwd": layout.cube_dir} for name, overrides in per_task.items()]
    return {"tasks": tasks, "mkdirs": _output_dirs(params, path_for)}


def _output_dirs(params, path_for) -> list[str]:
    dirs = set()
    for _, p in params:
        if p.io == "output":
            target = path_for(p)
            dirs.add(target if p.type == "directory" else posixpath.dirname(target))
    return sorted(dirs)


def _provision_python(conn, cube, probe, layout: RemoteLayout, log: Log) -> tuple[str, str]:
    from controller.provision import run_playbook
    from controller.runtimes.python import find_interpreter

    found = probe.get("python", [])
    interpreter = find_interpreter(cube.env.python_version, found)
    version = next(i["version"] for i in found if i["path"] == interpreter)
    env_hash = cube.env.env_hash(".".join(str(version).split(".")[:2]))
    env_dir = posixpath.join(conn.root, "envs", env_hash)
    variables = {
        "python": interpreter, "env_dir": env_dir, "env_hash": env_hash,
        "requirements": list(cube.env.requirements), "pip_log": env_dir + ".pip.log",
    }
    start = time.monotonic()
    run_playbook("python", variables, conn, log=log)
    # User playbooks see the same variables as in a local run: the venv's interpreter, the cube.
    user_vars = {**variables, "python": posixpath.join(env_dir, "bin", "python"),
                 "cube_root": layout.cube_dir, "workspace": layout.inputs_dir}
    for playbook in cube.env.playbooks:
        run_playbook(str(cube.root / playbook), user_vars, conn, log=log)
    log(f"provision python env {env_hash}: {time.monotonic() - start:.2f}s")
    return env_dir, env_hash


def _launch(conn, job: ledger_mod.Job, spec: dict, log: Log) -> None:
    import json

    payload = {"job_id": job.id, "name": job.name, "tasks": spec["tasks"],
               "env": spec.get("env", {}), "mkdirs": spec.get("mkdirs", []),
               "docker_container": spec.get("docker_container")}
    state = conn.agent("launch", input=json.dumps(payload).encode())
    job.state = state.get("state", "running")
    job.started_at = time.time()
    ledger_mod.Ledger().save(job)
    if job.state not in ("pending", "running"):
        log(f"job {job.id} did not start: {state}")


# ---- following a job --------------------------------------------------------------------------

# How long one `read-log` long poll may wait for new output. Bounded polls let a read timeout
# tell a dead link (no TCP error for minutes) from a quiet task.
FOLLOW_WINDOW_S = float(os.environ.get("CUBE_FOLLOW_WINDOW", 20))
READ_TIMEOUT_S = FOLLOW_WINDOW_S + max(5.0, FOLLOW_WINDOW_S)
RECONNECT_BUDGET_S = float(os.environ.get("CUBE_RECONNECT_BUDGET", 600))


def _follow_and_finish(conn, job: ledger_mod.Job, log: Log) -> int:
    state = _follow(conn, job, log)
    _finish(conn, job, state, log)
    return _exit_code(job, log)


def _follow(conn, job: ledger_mod.Job, log: Log) -> dict:
    """Stream the job's log from where the local copy ends until the job is final; reconnect
    on a dropped link. The local log file's size IS the offset, so no byte is lost or doubled,
    even across a killed controller."""
    path = Path(job.log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as out:
        while True:
            try:
                answer = _read_log(conn, job.id, out.tell())
            except _connection_errors() as err:
                log(f"connection to {job.host} lost ({type(err).__name__}: {err}); reconnecting")
                _reconnect(conn, log)
                continue
            _append_log(out, base64.b64decode(answer["data"]))
            if answer["done"]:
                return answer["state"]


def _read_log(conn, job_id: str, offset: int) -> dict:
    """One long poll: returns as soon as the log grows or the job ends. Its timeout is how a
    dead link (silent for minutes at the TCP level) is told from a quiet task."""
    return conn.agent("read-log", job_id, "--offset", str(offset), "--wait",
                      str(FOLLOW_WINDOW_S), timeout=READ_TIMEOUT_S)


def _connection_errors() -> tuple:
    import socket

    import paramiko

    from controller.transport import ConnectionLost

    return (socket.error, socket.timeout, EOFError, paramiko.SSHException, ConnectionError,
            ConnectionLost)


def _reconnect(conn, log: Log) -> None:
    from controller.errors import HostUnreachable

    deadline = time.monotonic() + RECONNECT_BUDGET_S
    while True:
        try:
            conn.reconnect()
            log("reconnected")
            return
        except HostUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _finish(conn, job: ledger_mod.Job, state: dict, log: Log) -> None:
    job.state = state.get("state", job.state)
    job.exit_code = state.get("exit_code")
    job.ended_at = time.time()
    ledger_mod.Ledger().save(job)
    pull_outputs(conn, job, log)


def pull_outputs(conn, job: ledger_mod.Job, log: Log) -> None:
    from controller import sync

    outputs_dir = RemoteLayout(job.remote_dir, job.cube, job.id).outputs_dir
    report = sync.pull(conn, outputs_dir, Path(job.workspace), paths=job.outputs)
    log(f"pulled outputs into {job.workspace}: {describe_sync(report)}")
    job.outputs_pulled = True
    ledger_mod.Ledger().save(job)


def _exit_code(job: ledger_mod.Job, log: Log) -> int:
    log(f"job {job.id} {job.state}" + (f" (exit {job.exit_code})" if job.exit_code else ""))
    if job.state == "succeeded":
        return 0
    if job.state == "failed":
        raise TaskFailed(",".join(job.tasks), job.exit_code or 1,
                         f"Its log: {job.log_path} (`cube remote logs {job.id}`).")
    if job.state == "cancelled":
        return 130
    raise CubeError(f"Job {job.id} was lost on {job.host}: its process vanished without "
                    "recording an end (host reboot or killed supervisor).",
                    f"Outputs it wrote were pulled into {job.workspace}; re-run the task.",
                    exit_code=1)


# ---- jobs started earlier -----------------------------------------------------------------------


def connect_for(job: ledger_mod.Job, log: Log = stderr_log):
    return _connect(job.host, Path(job.inventory) if job.inventory else None, False, log)


def attach(ref: str, log: Log = stderr_log, conn=None) -> int:
    """Follow a job to its end and pull its outputs (again if needed)."""
    job = ledger_mod.Ledger().get(ref)
    _CURRENT["job"] = job.id
    own = conn is None
    conn = conn or connect_for(job, log)
    try:
        return _follow_and_finish(conn, job, log)
    finally:
        if own:
            conn.close()


def status(ref: str) -> dict:
    job = ledger_mod.Ledger().get(ref)
    conn = connect_for(job, lambda _m: None)
    try:
        state = conn.agent("status", job.id)
    finally:
        conn.close()
    if state.get("state") != job.state and job.state not in ledger_mod.FINAL_STATES:
        job.state, job.exit_code = state.get("state"), state.get("exit_code")
        ledger_mod.Ledger().save(job)
    return {"job": job.id, "host": job.host, **state}


def cancel(ref: str, grace: float, log: Log = stderr_log) -> dict:
    job = ledger_mod.Ledger().get(ref)
    conn = connect_for(job, log)
    try:
        state = conn.agent("cancel", job.id, "--grace", str(grace))
    finally:
        conn.close()
    job.state, job.exit_code = state.get("state", job.state), state.get("exit_code")
    ledger_mod.Ledger().save(job)
    return state


def fetch(ref: str, log: Log = stderr_log) -> None:
    job = ledger_mod.Ledger().get(ref)
    conn = connect_for(job, log)
    try:
        pull_outputs(conn, job, log)
    finally:
        conn.close()


def logs(ref: str, follow: bool, log: Log = stderr_log) -> None:
    """Print the job's log: the local copy, then (with -f, or if the job may have more) the rest."""
    job = ledger_mod.Ledger().get(ref)
    path = Path(job.log_path)
    if path.exists():
        sys.stdout.buffer.write(path.read_bytes())
        sys.stdout.buffer.flush()
    if job.finished and not follow and job.outputs_pulled:
        return
    conn = connect_for(job, log)
    try:
        if follow:
            _follow(conn, job, log)
        else:
            _copy_new_log(conn, job, path)
    finally:
        conn.close()


def shell_argv(ref: str) -> list[str]:
    """OpenSSH's client gives a real TTY; host keys are checked against the same files."""
    import shlex

    from controller.hosts import resolve_host
    from controller.transport import openssh_shell_argv

    job = ledger_mod.Ledger().get(ref)
    spec = resolve_host(job.host, Path(job.inventory) if job.inventory else None)
    layout = RemoteLayout(job.remote_dir, job.cube, job.id)
    rc = ["[ -f ~/.bashrc ] && . ~/.bashrc"]  # the user's own setup first, then the env on top
    if job.runtime == "python":
        env = posixpath.join(job.remote_dir, "envs", job.env_hash)
        rc.append(f"export VIRTUAL_ENV={shlex.quote(env)} PATH={shlex.quote(env)}/bin:\"$PATH\"")
    rc_file = posixpath.join(layout.job_dir, ".cube-shellrc")
    remote_cmd = (f"cd {shlex.quote(layout.job_dir)} && printf '%s\\n' "
                  f"{' '.join(shlex.quote(line) for line in rc)} > {shlex.quote(rc_file)} && "
                  f"exec bash --rcfile {shlex.quote(rc_file)} -i")
    return [*openssh_shell_argv(spec), remote_cmd]


def _copy_new_log(conn, job: ledger_mod.Job, path: Path) -> None:
    """What the host's log has beyond the local copy, appended there and printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as out:
        while True:
            answer = conn.agent("read-log", job.id, "--offset", str(out.tell()), "--wait", "0")
            chunk = base64.b64decode(answer["data"])
            if not chunk:
                return
            _append_log(out, chunk)


def _append_log(out, chunk: bytes) -> None:
    """Log bytes from the host: into the local copy (its size is the next offset), and shown."""
    out.write(chunk)
    out.flush()
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
