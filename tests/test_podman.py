"""The podman runtime (controller/runtimes/podman.py) against real podman: the hello-docker cube
rootful and rootless, on this machine and on a lab host, outputs owned by the user who ran the
job, the ulimits setting, and cancel stopping the container."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from controller.errors import ConfigError, CubeError
from controller.plan import HostLayout, LocalLayout, plan_job
from controller.runtimes import docker as rt
from controller.runtimes import get_runtime
from controller.runtimes.base import ProbedFacts
from controller.runtimes.podman import PodmanRuntime
from tests.conftest import REPO
from tests.fixtures.docker import EngineTarget, load_hello
from tests.fixtures.podman import LIMIT_ARGS, LIMITS
from tests.test_docker import cube_cli, owners, run_local, wait_for

integration = pytest.mark.integration


def podman_hello(root, image, **docker):
    return load_hello(root, image, runtime="podman", **docker)


# ---- argv and settings: no engine needed -------------------------------------------------------

def test_the_registry_gives_podman_with_podmans_cli(hello_cube):
    cube = podman_hello(hello_cube, "x/y:1", ulimits=LIMITS)
    assert isinstance(get_runtime("podman"), PodmanRuntime)
    argv = rt.container_argv(cube, "greet", None, image="x/y:1", job_name="j", uid=0, gid=0,
                             engine="podman", limits=rt.ulimits(cube))
    assert argv[:2] == ["podman", "run"] and "--init" in argv
    assert argv[argv.index("--user") + 1] == "0:0"
    ulimits = [argv[i + 1] for i, a in enumerate(argv) if a == "--ulimit"]
    assert ulimits == ["nproc=4096:4096", "nofile=1024:1024"]


def test_podman_gpus_are_cdi_devices(hello_cube):
    from controller.cube import load_cube

    gpu = load_cube(hello_cube, config_overrides={"platform.accelerator_count": "2"},
                    requested_runtime="podman")
    argv = rt.container_argv(gpu, "greet", None, image="i", job_name="j", uid=1, gid=1,
                             engine="podman", gpus=[2, 3])
    assert "--gpus" not in argv
    assert argv[argv.index("--device"):argv.index("--device") + 4] == [
        "--device", "nvidia.com/gpu=2", "--device", "nvidia.com/gpu=3"]
    assert "CUDA_VISIBLE_DEVICES=0,1" in argv


def test_a_bad_ulimit_names_the_field(hello_cube):
    with pytest.raises(ConfigError, match=r"docker.ulimits.nofile"):
        rt.ulimits(podman_hello(hello_cube, "x/y:1", ulimits={"nofile": "lots"}))
    with pytest.raises(ConfigError, match=r"docker.ulimits"):
        rt.ulimits(podman_hello(hello_cube, "x/y:1", ulimits="nofile=1"))


def test_rootless_runs_as_container_root_rootful_as_the_user():
    facts = ProbedFacts({"uid": 1001, "gid": 1001})
    assert PodmanRuntime().user(rt.EngineInfo("podman", "4", rootless=True), facts) == (0, 0)
    assert PodmanRuntime().user(rt.EngineInfo("podman", "4"), facts) == (1001, 1001)


def test_a_missing_podman_says_how_to_install_it(tmp_path):
    no_cli = EngineTarget()
    no_cli.env["PATH"] = str(tmp_path)
    with pytest.raises(CubeError, match="Podman CLI is not installed") as err:
        rt.check_engine(no_cli, engine="podman")
    assert "apt-get install podman" in err.value.hint


def test_a_host_whose_probe_says_podman_is_unreachable_is_refused(hello_cube, tmp_path):
    cube = podman_hello(hello_cube, "x/y:1")
    plan = plan_job(cube, ["greet"], {})
    facts = ProbedFacts({"uid": 0, "gid": 0, "podman": {
        "reachable": False, "error": "podman info failed", "hint": "apt-get install podman"}})
    layout = HostLayout.for_plan(str(tmp_path), plan, "job-1")
    with pytest.raises(CubeError, match="podman runtime cannot run on this machine") as err:
        PodmanRuntime().prepare(plan, EngineTarget(), layout, facts, lambda _m: None)
    assert err.value.hint == "apt-get install podman"


# ---- this machine --------------------------------------------------------------------------------

@integration
def test_rootful_podman_needs_the_ulimits_setting_on_this_vm(podman_engine, hello_cube,
                                                            podman_image):
    """The measured fact behind docker.ulimits: without it rootful podman cannot start a
    container here; with it the same cube runs, outputs owned by the invoking user."""
    messages: list[str] = []
    cube = podman_hello(hello_cube, podman_image, ulimits=LIMITS)
    assert run_local(cube, "greet,count", messages.append, target=podman_engine) == 0
    ws = hello_cube / "workspace"
    assert (ws / "greetings" / "grace.txt").read_text() == "Hello, grace!\n"
    assert (ws / "report" / "summary.txt").read_text() == "3 greetings\n"
    assert owners(ws / "greetings") == {(os.getuid(), os.getgid())}
    assert any("built image" in m for m in messages)
    assert any("in container cube-hello-docker-count-" in m for m in messages)


@integration
def test_rootful_podman_runs_containers_as_the_targets_user(podman_engine, hello_cube,
                                                            podman_image):
    """A host user other than root: the container runs as that uid:gid (--user)."""
    cube = podman_hello(hello_cube, podman_image, ulimits=LIMITS)
    plan = plan_job(cube, ["greet"], {})
    out = hello_cube / "workspace" / "greetings"
    out.mkdir()
    out.chmod(0o777)
    facts = ProbedFacts({"uid": 1234, "gid": 1234})
    layout = LocalLayout(cube.root, cube.root)
    spec = PodmanRuntime().prepare(plan, podman_engine, layout, facts, lambda _m: None)
    assert spec.engine == "podman" and spec.env_key.startswith("sha256:")
    proc = subprocess.run(spec.tasks[0].argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert owners(out) - {out.stat()[4:6]} == {(1234, 1234)}


@integration
def test_cube_run_with_rootful_podman(podman_engine, hello_cube, podman_image):
    args = ["run", str(hello_cube), "--task", "greet,count", "--runtime", "podman",
            "-P", f"docker.image={podman_image}", *LIMIT_ARGS]
    first = cube_cli(*args)
    assert first.returncode == 0, first.stderr
    assert (hello_cube / "workspace" / "report" / "summary.txt").read_text() == "3 greetings\n"
    second = cube_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "present, skipping build" in second.stderr and "built image" not in second.stderr


@integration
def test_cube_run_with_rootless_podman_as_a_non_root_user(rootless_user, hello_cube,
                                                          podman_image):
    """`cube run` by a user who is not root and not in the docker group: rootless podman,
    outputs owned by that user, no ulimits needed."""
    folder = rootless_user.folder()
    try:
        cube_dir = folder / "hello-docker"
        shutil.copytree(hello_cube, cube_dir)
        (folder / "cube-home").mkdir()
        rootless_user.give(folder)
        env = {"PATH": os.environ["PATH"], "HOME": str(rootless_user.home),
               "CUBE_HOME": str(folder / "cube-home")}
        proc = subprocess.run(
            ["setpriv", f"--reuid={rootless_user.uid}", f"--regid={rootless_user.gid}",
             "--init-groups", sys.executable, "-m", "controller.cli", "run", str(cube_dir),
             "--task", "greet,count", "--runtime", "podman", "-P", f"docker.image={podman_image}"],
            capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ws = cube_dir / "workspace"
        assert (ws / "report" / "summary.txt").read_text() == "3 greetings\n"
        me = (rootless_user.uid, rootless_user.gid)
        assert owners(ws / "greetings") == {me} and owners(ws / "report") == {me}
        # Container root is the user outside: the task saw uid 0, the files are the user's.
        assert json.loads((ws / "greetings" / "_run.json").read_text())["uid"] == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- lab hosts ---------------------------------------------------------------------------------

@integration
def test_remote_run_with_rootful_podman(podman_engine, lab_home, hello_cube, podman_image):
    args = ["remote", "run", str(hello_cube), "--host", "lab1", "--task", "greet,count",
            "--runtime", "podman", "-P", f"docker.image={podman_image}", *LIMIT_ARGS]
    first = cube_cli(*args)
    assert first.returncode == 0, first.stderr
    ws = hello_cube / "workspace"
    assert (ws / "report" / "summary.txt").read_text() == "3 greetings\n"
    assert owners(ws / "greetings") == {(os.getuid(), os.getgid())}
    second = cube_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "present, skipping build" in second.stderr and "built image" not in second.stderr


@integration
def test_remote_run_with_rootless_podman(rootless_host, rootless_user, hello_cube,
                                         podman_image):
    """A lab host logged into as a non-root user: rootless podman there; on the host the
    job's outputs belong to that user, and they come back to the workspace here."""
    result = cube_cli("remote", "run", str(hello_cube), "--host", rootless_host, "--task",
                      "greet,count", "--runtime", "podman", "-P", f"docker.image={podman_image}")
    assert result.returncode == 0, result.stderr
    ws = hello_cube / "workspace"
    assert (ws / "report" / "summary.txt").read_text() == "3 greetings\n"
    assert (ws / "greetings" / "grace.txt").read_text() == "Hello, grace!\n"
    job_outputs = list(rootless_user.home.glob("t-*/jobs/*/workspace/greetings"))
    assert job_outputs, "the job's outputs on the host"
    me = (rootless_user.uid, rootless_user.gid)
    assert all(owners(folder) == {me} for folder in job_outputs)


@integration
@pytest.mark.parametrize("rootless", [False, True], ids=["rootful", "rootless"])
def test_remote_cancel_stops_the_podman_container(request, podman_engine, lab_home, hello_cube,
                                                  podman_image, rootless):
    host, engine, extra = "lab1", podman_engine, LIMIT_ARGS
    if rootless:
        host = request.getfixturevalue("rootless_host")
        engine, extra = request.getfixturevalue("rootless_user").target(), []
    started = cube_cli("remote", "run", str(hello_cube), "--host", host, "--task", "idle",
                       "--runtime", "podman", "-P", f"docker.image={podman_image}", *extra,
                       "--detach")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip().splitlines()[-1]
    name = rt.host_job_name(job_id)
    wait_for(lambda: rt.container_running(engine, name, "podman"), limit=120)
    cancelled = cube_cli("remote", "cancel", job_id, "--grace", "2")
    assert cancelled.returncode == 0, cancelled.stderr
    wait_for(lambda: not rt.container_running(engine, name, "podman"))
