"""The docker runtime (controller/runtimes/docker.py) against a real engine: images by
strategy, containers as the invoking user, read-only inputs, errors, cancel and ship."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from controller.cube import load_cube
from controller.errors import ConfigError, CubeError
from controller.launchers import ForegroundLauncher
from controller.plan import HostLayout, LocalLayout, plan_job
from controller.runtimes import docker as rt
from controller.runtimes import get_runtime
from controller.runtimes.base import LocalFacts, ProbedFacts
from controller.taskargs import prepare_outputs
from tests.fixtures.docker import EngineTarget, load_hello

integration = pytest.mark.integration


def params(cube, task: str, **overrides: str):
    """The task's parameters as the job plan resolves them (overrides applied once)."""
    return plan_job(cube, [task], overrides).tasks[0].params


def run_local(cube, tasks: str, log, target=None, **overrides) -> int:
    """`cube run` through the seams: plan, the runtime's prepare on this machine, then the
    foreground launcher; the first failing task's exit code, else 0."""
    target = target or EngineTarget()
    plan = plan_job(cube, tasks, overrides)
    layout = LocalLayout(cube.root, cube.root / "envs-unused")
    spec = get_runtime(plan.runtime).prepare(plan, target, layout, LocalFacts(), log)
    state = ForegroundLauncher(plan, log, grace=5).launch(target, "", None, spec)
    return int(state.get("exit_code") or 0)


def run_greet(cube, log, **kwargs) -> int:
    return run_local(cube, "greet", log, **kwargs)


def cube_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def owners(folder: Path) -> set[tuple[int, int]]:
    return {(p.stat().st_uid, p.stat().st_gid) for p in [folder, *folder.rglob("*")]}


# ---- argv and mounts: no engine needed --------------------------------------------------------

def test_names_registry_follows_dockers_rule():
    assert rt.names_registry("ghcr.io/org/cube:1")
    assert rt.names_registry("localhost/cube")
    assert rt.names_registry("host:5000/cube")
    assert not rt.names_registry("cube/hello-docker:0.1")
    assert not rt.names_registry("ubuntu:22.04")


def test_default_strategy_pulls_registry_images_and_builds_local_ones(hello_cube):
    assert rt.build_strategy(load_hello(hello_cube, "ghcr.io/x/y:1", build_strategy="")) == \
        ("pull", "the image names a registry")
    (hello_cube / "Dockerfile").unlink()
    assert rt.build_strategy(load_hello(hello_cube, "x/y:1", build_strategy=""))[0] == "pull"


def test_unknown_build_strategy_names_the_field(hello_cube):
    cube = load_hello(hello_cube, "x/y:1", build_strategy="sometimes")
    with pytest.raises(ConfigError, match=r"docker.build_strategy.*sometimes"):
        rt.build_strategy(cube)


def test_each_folder_is_mounted_once_and_files_mount_their_parent(hello_cube):
    cube = load_hello(hello_cube, "x/y:1")
    shared = str(hello_cube / "workspace" / "input")
    mounts, inside = rt.plan_mounts(params(cube, "greet", out_dir=shared))
    assert [m.host for m in mounts] == [str(hello_cube / "workspace" / "input")]
    assert inside == {"names": "/mnt/cube/io0/names.txt", "out_dir": "/mnt/cube/io0"}
    # The ro input shares its folder with an output: read-write wins (the writer needs it).
    assert mounts[0].readonly is False and mounts[0].params == ["names", "out_dir"]


def test_container_argv_rewrites_paths_and_runs_as_the_user(hello_cube):
    cube = load_hello(hello_cube, "x/y:1")
    argv = rt.container_argv(cube, "greet", params(cube, "greet"), image="x/y:1",
                             job_name="job-1", uid=1234, gid=99, env={"EXTRA": "1"}, cpus=1.5,
                             memory="512m")
    ws = hello_cube / "workspace"
    assert argv[:2] == ["docker", "run"] and "--rm" in argv
    assert argv[argv.index("--name") + 1] == "job-1"
    assert argv[argv.index("--user") + 1] == "1234:99"
    assert "GREETING=Hello" in argv and "EXTRA=1" in argv
    assert argv[argv.index("--cpus") + 1] == "1.5" and argv[argv.index("--memory") + 1] == "512m"
    assert f"type=bind,source={ws}/input,target=/mnt/cube/io0,readonly" in argv
    assert f"type=bind,source={ws}/greetings,target=/mnt/cube/io1" in argv
    assert argv[-4:] == ["x/y:1", "greet", "--names=/mnt/cube/io0/names.txt",
                         "--out_dir=/mnt/cube/io1"]


def test_gpus_only_when_the_cube_wants_them_and_the_host_has_them(hello_cube):
    cpu = load_hello(hello_cube, "x/y:1")
    gpu = load_cube(hello_cube, config_overrides={"platform.accelerator_count": "2"})
    assert rt.choose_gpus(cpu, [0, 1, 2]) is None
    assert rt.choose_gpus(gpu, []) is None
    assert rt.choose_gpus(gpu, [0, 1, 2]) == [0, 1]
    argv = rt.container_argv(gpu, "greet", None, image="i", job_name="j", uid=1, gid=1,
                             gpus=[2, 3])
    assert argv[argv.index("--gpus") + 1] == '"device=2,3"'
    assert "CUDA_VISIBLE_DEVICES=0,1" in argv  # renumbered from 0 inside the container
    assert "--gpus" not in rt.container_argv(cpu, "greet", None, image="i", job_name="j",
                                             uid=1, gid=1, gpus=[0])


def test_remote_paths_come_from_the_path_map_and_must_be_absolute(hello_cube):
    cube = load_hello(hello_cube, "x/y:1")
    ws = hello_cube / "workspace"
    argv = rt.container_argv(cube, "greet", None, image="i", job_name="j", uid=1, gid=1,
                             path_map={ws: "/home/u/.cube/jobs/j1/workspace"})
    assert "type=bind,source=/home/u/.cube/jobs/j1/workspace/input,target=/mnt/cube/io0," \
           "readonly" in argv
    with pytest.raises(CubeError, match="not an absolute path"):
        rt.container_argv(cube, "greet", None, image="i", job_name="j", uid=1, gid=1,
                          path_map={ws: "~/.cube/jobs/j1/workspace"})


def test_mount_spec_quotes_paths_with_commas():
    spec = rt.Mount("/data/a,b", "/mnt/cube/io0").spec()
    assert spec == 'type=bind,"source=/data/a,b",target=/mnt/cube/io0,readonly'


# ---- engine errors ------------------------------------------------------------------------------

@integration
def test_engine_errors_say_which_and_how_to_fix(docker_engine, tmp_path):
    down = EngineTarget(f"unix://{tmp_path}/none.sock")
    with pytest.raises(CubeError, match="not running") as err:
        rt.check_engine(down)
    assert "docker-up.sh" in err.value.hint
    no_cli = EngineTarget()
    no_cli.env["PATH"] = str(tmp_path)
    with pytest.raises(CubeError, match="CLI is not installed"):
        rt.check_engine(no_cli)
    assert rt.check_engine(docker_engine)


@integration
def test_a_user_outside_the_docker_group_is_told_to_join_it(docker_engine):
    require_root()
    with pytest.raises(CubeError, match="permission denied") as err:
        rt.check_engine(EngineTarget(user=(65534, 65534)))
    assert "usermod -aG docker" in err.value.hint


def require_root():
    from tests.conftest import require
    require(os.geteuid() == 0, "switching to an unprivileged user needs root")


# ---- images -------------------------------------------------------------------------------------

@integration
def test_second_run_reuses_the_image_and_a_changed_context_rebuilds(docker_engine, hello_cube,
                                                                    hello_image):
    messages: list[str] = []
    cube = load_hello(hello_cube, hello_image, build_strategy="build")
    first = rt.ensure_image(docker_engine, cube, messages.append)
    again = rt.ensure_image(docker_engine, cube, messages.append)
    assert again == first
    assert messages[-1] == f"image {rt.short(first)} present, skipping build"
    (hello_cube / "hello.py").write_text((hello_cube / "hello.py").read_text() + "\n# changed\n")
    changed = rt.ensure_image(docker_engine, load_hello(hello_cube, hello_image,
                                                       build_strategy="build"), messages.append)
    assert changed != first and messages[-1] == f"built image {rt.short(changed)}"
    # Outputs in the workspace are not part of the context: running does not force rebuilds.
    (hello_cube / "workspace" / "new-output.txt").write_text("x")
    cube = load_hello(hello_cube, hello_image, build_strategy="build")
    assert rt.ensure_image(docker_engine, cube, messages.append) == changed
    assert "skipping build" in messages[-1]


@integration
def test_build_failure_shows_the_last_lines_of_the_build(docker_engine, hello_cube, hello_image):
    (hello_cube / "Dockerfile").write_text(
        "FROM cube-base:bookworm\nRUN echo cube-build-marker-7f3 && exit 3\n")
    cube = load_hello(hello_cube, hello_image + "-broken", build_strategy="build")
    with pytest.raises(CubeError, match="failed") as err:
        rt.ensure_image(docker_engine, cube, lambda _m: None)
    assert "cube-build-marker-7f3" in err.value.message
    assert str(hello_cube / "Dockerfile") in err.value.message


@integration
def test_pull_without_a_reachable_registry_is_a_clear_error(docker_engine, hello_cube):
    cube = load_hello(hello_cube, "registry.invalid:5000/cube/absent:1", build_strategy="pull")
    with pytest.raises(CubeError, match="could not be pulled") as err:
        rt.ensure_image(docker_engine, cube, lambda _m: None)
    assert "registry.invalid" in err.value.message and "ship" in err.value.hint


@integration
def test_build_strategy_without_a_dockerfile_names_the_field(docker_engine, hello_cube):
    (hello_cube / "Dockerfile").unlink()
    cube = load_hello(hello_cube, "cube/absent:1", build_strategy="build")
    with pytest.raises(ConfigError, match="docker.build_file"):
        rt.ensure_image(docker_engine, cube, lambda _m: None)


# ---- running tasks ------------------------------------------------------------------------------

@integration
def test_task_runs_in_a_container_and_outputs_belong_to_the_invoking_user(docker_engine,
                                                                         hello_cube, hello_image):
    messages: list[str] = []
    cube = load_hello(hello_cube, hello_image)
    assert run_greet(cube, messages.append) == 0
    assert run_local(cube, "count", messages.append) == 0
    ws = hello_cube / "workspace"
    assert (ws / "greetings" / "grace.txt").read_text() == "Hello, grace!\n"
    assert (ws / "report" / "summary.txt").read_text() == "3 greetings\n"
    me = (os.getuid(), os.getgid())
    assert owners(ws / "greetings") == {me} and owners(ws / "report") == {me}
    assert json.loads((ws / "greetings" / "_run.json").read_text())["uid"] == me[0]
    # Reuse: the second task found the image the first one built.
    assert any("skipping build" in m for m in messages)
    names = [m.split(" in container ")[1].split()[0] for m in messages if " in container " in m]
    assert len(names) == 2
    for name in names:  # --rm: nothing left behind
        gone = docker_engine.sh(shlex.join(["docker", "ps", "-aq", "--filter", f"name=^/{name}$"]))
        assert gone.code == 0 and gone.stdout.strip() == ""


@integration
def test_outputs_of_a_non_root_user_are_not_owned_by_root(docker_engine, hello_cube, hello_image):
    cube = load_hello(hello_cube, hello_image)
    rt.ensure_image(docker_engine, cube, lambda _m: None)
    out = hello_cube / "workspace" / "greetings"
    out.mkdir()
    out.chmod(0o777)
    argv = rt.container_argv(cube, "greet", params(cube, "greet"), image=hello_image,
                             job_name=rt.job_name(cube, "greet"), uid=1234, gid=1234)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert owners(out) - {out.stat()[4:6]} == {(1234, 1234)}
    assert json.loads((out / "_run.json").read_text())["home"] == "/tmp"


@integration
def test_ro_input_is_read_only_inside_the_container(docker_engine, hello_cube, hello_image):
    cube = load_hello(hello_cube, hello_image)
    assert run_greet(cube, lambda _m: None) == 0
    run = json.loads((hello_cube / "workspace" / "greetings" / "_run.json").read_text())
    assert run["input_writable"] is False
    # Control: the same input declared rw is writable, so the probe can tell the difference.
    mlcube = hello_cube / "mlcube.yaml"
    mlcube.write_text(mlcube.read_text().replace("opts: ro}", "opts: rw}", 1))
    assert run_greet(load_hello(hello_cube, hello_image), lambda _m: None) == 0
    run = json.loads((hello_cube / "workspace" / "greetings" / "_run.json").read_text())
    assert run["input_writable"] is True


@integration
def test_a_missing_mount_folder_is_refused_and_never_created(docker_engine, hello_cube,
                                                             hello_image):
    cube = load_hello(hello_cube, hello_image)
    rt.ensure_image(docker_engine, cube, lambda _m: None)
    missing = hello_cube / "nowhere"
    moved = params(cube, "greet", names=f"{missing}/names.txt")
    with pytest.raises(CubeError, match=r"nowhere \(parameter names\).*does not exist"):
        rt.check_mount_sources(docker_engine, rt.plan_mounts(moved)[0])
    # The engine itself refuses too (with -v it would have made the folder, owned by root).
    argv = rt.container_argv(cube, "greet", moved, image=hello_image,
                             job_name=rt.job_name(cube, "greet"), uid=0, gid=0)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert not missing.exists()


@integration
def test_docker_stop_on_the_job_name_stops_the_container(docker_engine, hello_cube, hello_image):
    cube = load_hello(hello_cube, hello_image)
    rt.ensure_image(docker_engine, cube, lambda _m: None)
    prepare_outputs(params(cube, "idle"))
    name = rt.job_name(cube, "idle")
    argv = rt.container_argv(cube, "idle", None, image=hello_image, job_name=name,
                             uid=os.getuid(), gid=os.getgid())
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        marker = hello_cube / "workspace" / "idle" / "started.txt"
        wait_for(lambda: marker.exists() and rt.container_running(docker_engine, name))
        assert rt.stop_container(docker_engine, name, grace=5)
        assert proc.wait(timeout=60) != 0
        assert not rt.container_running(docker_engine, name)
    finally:
        proc.kill()
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def wait_for(condition, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)


# ---- ship -------------------------------------------------------------------------------------

@integration
def test_ship_sends_the_image_once_then_nothing(docker_engine, second_engine, hello_cube,
                                                hello_image):
    messages: list[str] = []
    cube = load_hello(hello_cube, hello_image, build_strategy="ship")
    local_id = rt.ensure_image(docker_engine, cube, messages.append, strategy="auto")
    assert rt.image_id(second_engine, hello_image) is None
    assert rt.ensure_ship_image(cube, docker_engine, second_engine, messages.append) == local_id
    assert messages[-1].startswith(f"shipped image {rt.short(local_id)}")
    assert rt.image_id(second_engine, hello_image) == local_id
    rt.ensure_ship_image(cube, docker_engine, second_engine, messages.append)
    assert messages[-1] == f"host already has image {rt.short(local_id)}, nothing to ship"
    # The shipped image runs on the other engine.
    out = second_engine.sh(shlex.join(["docker", "run", "--rm", hello_image, "count",
                                       "--greetings=/tmp", "--report=/tmp/r.txt"]))
    assert out.code == 0 and "counted 0 greetings" in out.stdout
    second_engine.sh(shlex.join(["docker", "rmi", "-f", hello_image]))


@integration
def test_ship_to_an_engine_that_cannot_load_says_so(docker_engine, tiny_image, tmp_path):
    dead = EngineTarget(f"unix://{tmp_path}/gone.sock")
    with pytest.raises(CubeError, match=r"`docker load` on lab9 failed") as err:
        rt.ship_image(tiny_image, docker_engine, dead, lambda _m: None, "lab9")
    assert "Cannot connect to the Docker daemon" in err.value.message


@integration
def test_ship_to_the_same_engine_sends_nothing(docker_engine, hello_cube, hello_image):
    messages: list[str] = []
    cube = load_hello(hello_cube, hello_image)
    image = rt.ensure_image(docker_engine, cube, messages.append)
    assert rt.ship_image(hello_image, docker_engine, docker_engine, messages.append) == image
    assert messages[-1] == f"host already has image {rt.short(image)}, nothing to ship"


# ---- cube run --runtime docker, plan, and cancel through the CLI process ----------------------

@integration
def test_cube_run_with_the_docker_runtime_runs_a_task_chain(docker_engine, hello_cube,
                                                            hello_image):
    args = ["run", str(hello_cube), "--task", "greet,count", "--runtime", "docker",
            "-P", f"docker.image={hello_image}"]
    first = cube_cli(*args)
    assert first.returncode == 0, first.stderr
    assert (hello_cube / "workspace" / "report" / "summary.txt").read_text() == "3 greetings\n"
    assert "greeted 3 names" in first.stdout
    assert "in container cube-hello-docker-greet-" in first.stderr
    second = cube_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "present, skipping build" in second.stderr and "built image" not in second.stderr


@integration
def test_cube_run_in_docker_exits_with_the_tasks_code(docker_engine, hello_cube, hello_image):
    empty = hello_cube / "workspace" / "input" / "empty.txt"
    empty.write_text("")
    result = cube_cli("run", str(hello_cube), "--task", "greet", "--runtime", "docker",
                      "-P", f"docker.image={hello_image}", f"names={empty}")
    assert result.returncode == 3, result.stderr
    assert "no names in /mnt/cube/io0/empty.txt" in result.stdout + result.stderr


@integration
def test_plan_reports_the_image_without_building_it(docker_engine, hello_cube):
    messages: list[str] = []
    tag = f"cube/hello-docker-plan:{os.getpid()}"
    cube = load_hello(hello_cube, tag)
    plan = plan_job(cube, ["greet"], {})
    spec = rt.DockerRuntime().prepare(plan, docker_engine, LocalLayout(cube.root, hello_cube),
                                      LocalFacts(), messages.append, dry_run=True)
    assert messages == [f"image {tag}: strategy auto (docker.build_strategy in mlcube.yaml); "
                        "absent on this machine"]
    argv = spec.tasks[0].argv
    assert argv[-3:] == ["greet", "--names=/mnt/cube/io0/names.txt", "--out_dir=/mnt/cube/io1"]
    assert spec.env_key == "" and spec.engine == "docker"
    assert rt.image_id(docker_engine, tag) is None


@integration
def test_sigterm_to_the_docker_cli_stops_its_container(docker_engine, hello_cube, hello_image):
    """How a job is cancelled when the agent signals the process group of `docker run`."""
    cube = load_hello(hello_cube, hello_image)
    rt.ensure_image(docker_engine, cube, lambda _m: None)
    prepare_outputs(params(cube, "idle"))
    name = rt.job_name(cube, "idle")
    argv = rt.container_argv(cube, "idle", None, image=hello_image, job_name=name,
                             uid=os.getuid(), gid=os.getgid())
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: rt.container_running(docker_engine, name))
        os.killpg(proc.pid, 15)
        assert proc.wait(timeout=60) != 0
        wait_for(lambda: not rt.container_running(docker_engine, name))
    finally:
        proc.kill()
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


# ---- remote: lab hosts over real SSH -------------------------------------------------------------

class EngineOverSSH:
    """A lab host whose commands talk to the second engine: the lab shares this machine's
    filesystem, so without this the "host" and the controller would share one engine."""

    def __init__(self, target, docker_host: str):
        self.target, self.name = target, target.name
        self.prefix = ["env", f"DOCKER_HOST={docker_host}"]

    def sh(self, command: str, *, timeout: float | None = None):
        return self.target.sh(f"{shlex.join(self.prefix)} bash -c {shlex.quote(command)}",
                              timeout=timeout)

    def open_stream(self, argv):
        return self.target.open_stream([*self.prefix, *argv])


@pytest.fixture
def tiny_image(docker_engine, tmp_path):
    """A one-file image (docker import of a small tar), so SSH tests move kilobytes, not the
    base image's 120 MB."""
    import tarfile

    tar = tmp_path / "tiny.tar"
    (tmp_path / "hello.txt").write_text("hello\n" * 1000)
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "hello.txt", arcname="hello.txt")
    tag = f"cube/tiny-test:{os.getpid()}-{tmp_path.name[-12:]}"
    with open(tar, "rb") as f:
        subprocess.run(["docker", "import", "-", tag], stdin=f, check=True, capture_output=True)
    yield tag
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


@integration
def test_ship_streams_the_image_over_ssh_once(docker_engine, second_engine, lab_home, tiny_image):
    from controller.transport import connect

    messages: list[str] = []
    local_id = rt.image_id(docker_engine, tiny_image)
    with connect("lab1") as conn:
        host = EngineOverSSH(conn, second_engine.env["DOCKER_HOST"])
        assert rt.image_id(host, tiny_image) is None
        assert rt.ship_image(tiny_image, docker_engine, host, messages.append, "lab1") == local_id
        assert messages[-1].startswith(f"shipped image {rt.short(local_id)} to lab1 (")
        rt.ship_image(tiny_image, docker_engine, host, messages.append, "lab1")
        assert messages[-1] == f"host already has image {rt.short(local_id)}, nothing to ship"
    assert rt.image_id(second_engine, tiny_image) == local_id
    second_engine.sh(shlex.join(["docker", "rmi", "-f", tiny_image]))


@integration
@pytest.mark.parametrize("strategy", ["build", "ship"])
def test_remote_run_in_docker_brings_outputs_back_and_reuses_the_image(
        docker_engine, lab_home, hello_cube, hello_image, strategy):
    args = ["remote", "run", str(hello_cube), "--host", "lab1", "--task", "greet,count",
            "--runtime", "docker", "-P", f"docker.image={hello_image}-{strategy}",
            "-P", f"docker.build_strategy={strategy}"]
    first = cube_cli(*args)
    assert first.returncode == 0, first.stderr
    ws = hello_cube / "workspace"
    assert (ws / "report" / "summary.txt").read_text() == "3 greetings\n"
    assert owners(ws / "greetings") == {(os.getuid(), os.getgid())}
    second = cube_cli(*args)
    assert second.returncode == 0, second.stderr
    reuse = "present, skipping build" if strategy == "build" else "nothing to ship"
    assert reuse in second.stderr, second.stderr
    assert "built image" not in second.stderr and "shipped image" not in second.stderr
    subprocess.run(["docker", "rmi", "-f", f"{hello_image}-{strategy}"], capture_output=True)


@integration
def test_remote_cancel_stops_the_container(docker_engine, lab_home, hello_cube, hello_image):
    started = cube_cli("remote", "run", str(hello_cube), "--host", "lab1", "--task", "idle",
                       "--runtime", "docker", "-P", f"docker.image={hello_image}", "--detach")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip().splitlines()[-1]
    name = f"cube-{job_id}"
    wait_for(lambda: rt.container_running(docker_engine, name))
    cancelled = cube_cli("remote", "cancel", job_id, "--grace", "2")
    assert cancelled.returncode == 0, cancelled.stderr
    wait_for(lambda: not rt.container_running(docker_engine, name))


def test_with_folders_makes_the_mount_folders_then_execs_the_command(tmp_path):
    folders = [str(tmp_path / "a b" / "out"), str(tmp_path / "c")]
    argv = rt.with_folders(folders, ["sh", "-c", 'echo "$$ $1"', "sh", "x y"])
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split(" ", 1)[1] == "x y\n"
    assert all(Path(f).is_dir() for f in folders)


@integration
def test_launch_spec_runs_the_job_through_the_agent(docker_engine, hello_cube, hello_image,
                                                   tmp_path):
    """A host's launch spec as the agent runs it (locally: the agent is the same zipapp on
    hosts): the image by its strategy, folders made, both tasks in job-named containers."""
    import shutil
    import sys
    import tempfile

    from controller import agent_bundle

    cube = load_hello(hello_cube, hello_image)
    plan = plan_job(cube, ["greet", "count"], {})
    layout = HostLayout.for_plan(str(tmp_path / "root"), plan, "job-1")
    (Path(layout.inputs_dir) / "input").mkdir(parents=True)
    shutil.copy(hello_cube / "workspace" / "input" / "names.txt", Path(layout.inputs_dir) / "input")
    shutil.copytree(hello_cube, layout.cube_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("workspace"))
    bundle = agent_bundle.cached_file(Path(tempfile.gettempdir()) / "cube-test-agent")
    agent = [sys.executable, str(bundle), "--root", layout.root]
    probe = json.loads(subprocess.run([*agent, "probe"], capture_output=True, text=True).stdout)
    probe = probe.get("result", probe)
    messages: list[str] = []
    spec = rt.DockerRuntime().prepare(plan, docker_engine, layout, ProbedFacts(probe),
                                      messages.append)
    assert spec.container == "cube-job-1" and spec.engine == "docker"
    assert spec.env_key == rt.image_id(docker_engine, hello_image)
    launched = subprocess.run([*agent, "launch"], input=json.dumps(spec.agent_spec("job-1", None)),
                              capture_output=True, text=True)
    assert launched.returncode == 0, launched.stdout + launched.stderr

    def status() -> dict:
        return agent_result(subprocess.run([*agent, "status", "job-1"], capture_output=True,
                                           text=True).stdout)

    wait_for(lambda: status()["state"] not in ("pending", "running"))
    assert status()["state"] == "succeeded"
    outputs = Path(layout.outputs_dir)
    assert (outputs / "report" / "summary.txt").read_text() == "3 greetings\n"
    assert owners(outputs / "greetings") == {(os.getuid(), os.getgid())}
    log = (Path(layout.job_dir) / "output.log").read_text()
    assert "greeted 3 names" in log and "counted 3 greetings" in log


@integration
def test_a_tasks_own_entrypoint_replaces_the_images(docker_engine, hello_cube, hello_image):
    """MLCube's per-task `entrypoint`: run instead of ENTRYPOINT, with no task name added."""
    mlcube = hello_cube / "mlcube.yaml"
    mlcube.write_text(mlcube.read_text() + (
        "  recount:\n"
        "    entrypoint: python3 /app/hello.py count\n"
        "    parameters:\n"
        "      inputs: {greetings: {type: directory, default: input/}}\n"
        "      outputs: {report: {type: file, default: recount/summary.txt}}\n"))
    cube = load_hello(hello_cube, hello_image)
    argv = rt.container_argv(cube, "recount", None, image=hello_image, job_name="j", uid=1,
                             gid=1)
    assert argv[argv.index("--entrypoint"):] == [
        "--entrypoint", "python3", hello_image, "/app/hello.py", "count",
        "--greetings=/mnt/cube/io0", "--report=/mnt/cube/io1/summary.txt"]
    assert run_local(cube, "recount", lambda _m: None) == 0
    # The input folder holds one .txt file (names.txt), and that is what `count` counts.
    assert (hello_cube / "workspace" / "recount" / "summary.txt").read_text() == "1 greetings\n"


@integration
def test_killed_ssh_sessions_do_not_stop_the_container(docker_engine, lab, lab_home, hello_cube,
                                                       hello_image):
    import sys

    follower = subprocess.Popen([sys.executable, "-m", "controller.cli", "remote", "run",
                                 str(hello_cube), "--host", "lab1", "--task", "idle",
                                 "--runtime", "docker", "-P", f"docker.image={hello_image}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: running_containers(docker_engine, "cube-hello-docker-"))
        [name] = running_containers(docker_engine, "cube-hello-docker-")
        assert lab.kill_ssh_sessions("lab1") > 0
        job_id = name.removeprefix("cube-")
        status = cube_cli("remote", "status", job_id, "--json")
        assert json.loads(status.stdout)["state"] == "running", status.stderr
        assert rt.container_running(docker_engine, name)
        assert cube_cli("remote", "cancel", job_id, "--grace", "2").returncode == 0
        wait_for(lambda: not rt.container_running(docker_engine, name))
    finally:
        follower.kill()
        follower.wait()


def running_containers(ex, prefix: str) -> list[str]:
    out = ex.sh(shlex.join(["docker", "ps", "--format", "{{.Names}}"])).stdout.split()
    return [n for n in out if n.startswith(prefix)]


def agent_result(stdout: str) -> dict:
    """A verb's answer: {ok, result} from the agent package (the result itself before it)."""
    answer = json.loads(stdout)
    return answer.get("result", answer) if "ok" in answer else answer
