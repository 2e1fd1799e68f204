"""The agent's job and probe verbs, run as a real subprocess against a temp ROOT: real processes,
real signals, real files. The agent runs as hosts run it: the zipapp controller.agent_bundle
builds from the package."""

from __future__ import annotations

import ast
import getpass
import glob
import hashlib
import io
import json
import os
import py_compile
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from controller import agent_bundle
from tests.conftest import REPO, require

PACKAGE = REPO / "agent"
# Written once per agent version, outside any test's temp dir: supervisors outlive tests.
AGENT = agent_bundle.cached_file(Path(tempfile.gettempdir()) / "cube-test-agent")
PY = sys.executable
WAIT_S = 60.0  # a safety net against hangs, never a speed assertion


def agent(root, *args, stdin=None, python=PY, env=None, check=True):
    """Run one verb; its JSON answer (or raw stdout for logs) plus the process."""
    proc = subprocess.run([python, "-X", "dev", str(AGENT), "--root", str(root), *args],
                          input=stdin, capture_output=True, timeout=WAIT_S, env=env)
    assert proc.stderr == b"", proc.stderr.decode()  # -X dev: no warnings, no tracebacks
    if check:
        assert proc.returncode == 0, proc.stdout.decode()
    return proc


def call(root, *args, **kwargs):
    """A verb's result: the answer must be {"ok": true, "result": ...}."""
    answer = json.loads(agent(root, *args, **kwargs).stdout)
    assert answer["ok"] is True and set(answer) == {"ok", "result"}, answer
    return answer["result"]


def launch(root, job_id, code=None, tasks=None, name="job", python=PY, **extra):
    spec = {"job_id": job_id, "name": name, "env": {"CUBE_TEST": "1"}, **extra}
    if tasks is not None:
        spec["tasks"] = tasks
    else:
        spec["argv"] = [PY, "-c", code]
    return call(root, "launch", stdin=json.dumps(spec).encode(), python=python)


def wait_final(root, job_id, python=PY):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        state = call(root, "status", job_id, python=python)
        if state["state"] in ("succeeded", "failed", "cancelled", "lost"):
            return state
        time.sleep(0.05)
    raise AssertionError("job %s did not end" % job_id)


def wait_for(predicate, what):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


def live_members(pgid):
    """Pids of non-zombie processes in a process group."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.split("/")[2]))
    return pids


def log_of(root, job_id):
    return (Path(root) / "jobs" / job_id / "output.log").read_bytes()


@pytest.fixture
def root(tmp_path):
    yield tmp_path / "cube-root"
    # Leave nothing running: kill every job's task group and supervisor still alive.
    for state_file in glob.glob(str(tmp_path / "cube-root" / "jobs" / "*" / "state.json")):
        state = json.loads(Path(state_file).read_text())
        for pgid in (state.get("task_pgid"), state.get("pgid")):
            if pgid:
                for pid in live_members(pgid):
                    os.kill(pid, signal.SIGKILL)


# -- the package itself

@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py")))
def test_agent_compiles_and_is_stdlib_only_for_python_3_8(tmp_path, module):
    source = PACKAGE / module
    py_compile.compile(str(source), cfile=str(tmp_path / "agent.pyc"), doraise=True)
    tree = ast.parse(source.read_text(), feature_version=(3, 8))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    newer_than_3_8 = {"zoneinfo", "graphlib", "tomllib"}
    assert imported <= set(sys.stdlib_module_names) - newer_than_3_8, imported
    names = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert len(names) == len(set(names)), "a top-level name is defined twice"
    assert len(source.read_text().splitlines()) <= 700, "split the module"


def test_two_builds_of_the_same_source_give_byte_identical_archives(tmp_path):
    first, second = agent_bundle.build(), agent_bundle.build()  # fresh builds, not the cache
    assert first.data == second.data and first.digest == second.digest
    assert first.digest == hashlib.sha256(first.data).hexdigest()[:16]
    assert first.filename == first.digest + ".pyz"
    # A copy elsewhere, with new mtimes and bytecode beside it, still gives the same bytes.
    copy = tmp_path / "agent"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for path in copy.glob("*.py"):
        os.utime(path, (1e9, 1e9))
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "jobs.cpython-311.pyc").write_bytes(b"stale")
    assert agent_bundle.build(copy).data == first.data
    with zipfile.ZipFile(io.BytesIO(first.data)) as archive:
        names = archive.namelist()
        assert names == sorted(names) and names[0] == "__main__.py"
        assert "agent/__main__.py" in names and "agent/protocol.py" in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.external_attr >> 16 for i in archive.infolist()} == {0o100644}
    assert agent_bundle.bundle() is agent_bundle.bundle()  # built once per process


def test_the_archive_unpacks_beside_itself_so_that_python_caches_its_bytecode(tmp_path):
    """A zipapp recompiles every module at every start; the first start unpacks the package to
    <digest>.pyz.d and every start imports from there, where __pycache__ can live."""
    bundle = agent_bundle.build()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def list_jobs(archive: Path) -> None:
        proc = subprocess.run([PY, str(archive), "--root", str(tmp_path / "root"), "list-jobs"],
                              capture_output=True, env=env, timeout=WAIT_S)
        assert json.loads(proc.stdout) == {"ok": True, "result": {"jobs": []}}, proc.stderr

    archive = tmp_path / bundle.filename
    archive.write_bytes(bundle.data)
    list_jobs(archive)
    unpacked = tmp_path / (bundle.filename + ".d")
    assert sorted(p.relative_to(unpacked / "agent").as_posix()
                  for p in (unpacked / "agent").rglob("*.py")) == sorted(
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts)
    assert list((unpacked / "agent" / "__pycache__").glob("protocol.*.pyc"))  # imported there
    assert not list(tmp_path.glob("*.tmp-*"))   # the temp folder became the real one
    list_jobs(archive)   # later starts use the folder as it is
    # Where the folder cannot be made (here a file holds its name), the archive still runs.
    blocked = tmp_path / "blocked" / bundle.filename
    blocked.parent.mkdir()
    blocked.write_bytes(bundle.data)
    Path(str(blocked) + ".d").write_text("not a folder")
    list_jobs(blocked)
    assert not list(blocked.parent.glob("*.tmp-*"))


def test_every_answer_has_one_shape(root):
    assert call(root, "list-jobs") == {"jobs": []}
    proc = agent(root, "status", "nope", check=False)
    assert proc.returncode == 1
    assert set(json.loads(proc.stdout)) == {"ok", "error", "hint"}
    assert json.loads(proc.stdout)["ok"] is False


def test_the_supervisor_runs_from_the_archive(root):
    launch(root, "boxed", "import time; print('up', flush=True); time.sleep(600)")
    wait_for(lambda: b"up" in log_of(root, "boxed"), "the task to start")
    state = call(root, "status", "boxed")
    argv = Path("/proc/%d/cmdline" % state["pid"]).read_bytes().split(b"\0")
    assert argv[1] == str(AGENT).encode() and b"supervise" in argv, argv  # the .pyz itself
    assert agent_processes("supervise", "boxed") == [state["pid"]]
    assert call(root, "cancel", "boxed", "--grace", "5")["state"] == "cancelled"


@pytest.mark.parametrize("minor", [8, 13])
def test_agent_runs_on_old_and_new_pythons(root, minor):
    name = "python3.%d" % minor
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.%d*/bin/%s" % (minor, name))))
    python38 = found[0] if found else shutil.which(name)
    if python38 is None:
        pytest.skip("no %s on this machine" % name)
    probe = call(root, "probe", python=python38)
    assert probe["agent_version"] >= 1
    assert launch(root, "py38", "print('hi')", python=python38)["state"] != "pending"
    state = wait_final(root, "py38", python=python38)
    assert state["state"] == "succeeded" and log_of(root, "py38") == b"hi\n"
    assert (Path(root) / "jobs" / "py38" / "supervisor.log").read_bytes() == b""


# -- probe

def test_probe_reports_the_host(root):
    probe = call(root, "probe")
    assert probe["hostname"] == os.uname().nodename
    assert probe["os"]["system"] == os.uname().sysname
    assert probe["cpu_count"] == os.cpu_count()
    assert probe["disk_free_bytes"] > 0 and probe["mem_total_bytes"] > 0
    assert len(probe["load"]) == 3
    versions = {entry["version"] for entry in probe["python"]}
    assert "%d.%d.%d" % sys.version_info[:3] in versions
    assert len({os.path.realpath(e["path"]) for e in probe["python"]}) == len(probe["python"])
    docker = probe["docker"]
    assert docker["cli"] == bool(shutil.which("docker"))
    assert docker["reachable"] == (docker["error"] is None)
    if docker["reachable"]:
        assert docker["server_version"]
    else:
        assert docker["hint"]
    assert isinstance(probe["gpus"], list)
    if not shutil.which("nvidia-smi"):
        assert probe["gpus"] == [] and probe["gpu_error"] is None
    assert probe["running_jobs"] == []


def test_probe_distinguishes_a_missing_docker_cli(root, tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    env = dict(os.environ, PATH=str(bare))
    docker = call(root, "probe", env=env)["docker"]
    assert docker["cli"] is False and docker["reachable"] is False
    assert "no docker CLI" in docker["error"]


def test_probe_remembers_interpreter_versions(root):
    root.mkdir()
    first = call(root, "probe")["python"]
    cache_file = root / "probe-cache.json"
    cache = json.loads(cache_file.read_text())
    assert sorted(cache.values()) == sorted(entry["version"] for entry in first)
    # A remembered answer is used as is while the interpreter file is unchanged.
    key = next(k for k in cache if k.startswith(os.path.realpath(PY) + ":"))
    cache[key] = "9.9.9"
    cache_file.write_text(json.dumps(cache))
    assert "9.9.9" in {entry["version"] for entry in call(root, "probe")["python"]}


def test_probe_lists_running_jobs(root):
    launch(root, "sleeper", "import time; time.sleep(60)")
    running = call(root, "probe")["running_jobs"]
    assert [job["job_id"] for job in running] == ["sleeper"]
    assert call(root, "cancel", "sleeper", "--grace", "5")["state"] == "cancelled"


# -- launch, state and logs

def test_failed_job_records_exit_code_and_exact_log(root):
    code = "import sys\nfor i in range(5): print('line', i)\nsys.stderr.write('oops\\n')\nsys.exit(3)"
    started = launch(root, "j1", code)
    assert started["state"] in ("running", "failed") and started["pid"]
    state = wait_final(root, "j1")
    assert state["state"] == "failed" and state["exit_code"] == 3
    assert state["started_at"].endswith("Z") and state["ended_at"] >= state["started_at"]
    assert state["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    expected = b"".join(b"line %d\n" % i for i in range(5)) + b"oops\n"
    assert log_of(root, "j1") == expected
    assert agent(root, "logs", "j1").stdout == expected
    assert state["log_bytes"] == len(expected)
    job = Path(root) / "jobs" / "j1"
    assert not [p.name for p in job.iterdir() if p.name.startswith(".tmp")]
    assert json.loads((job / "spec.json").read_text())["job_id"] == "j1"


def test_task_environment_and_success(root):
    launch(root, "env", "import os; print(os.environ['CUBE_TEST'], os.getcwd())")
    state = wait_final(root, "env")
    assert state["state"] == "succeeded" and state["exit_code"] == 0
    workspace = (Path(root) / "jobs" / "env" / "workspace").resolve()
    assert log_of(root, "env") == ("1 %s\n" % workspace).encode()


def test_logs_in_two_pieces_lose_and_double_nothing(root, tmp_path):
    gate = tmp_path / "gate"
    code = ("import os, time\n"
            "for i in range(200): print('first', i)\n"
            "while not os.path.exists(%r): time.sleep(0.01)\n"
            "for i in range(2000): print('second', i)\n" % str(gate))
    launch(root, "follow", code)
    wait_for(lambda: log_of(root, "follow").count(b"\n") >= 200, "the first lines")
    first = agent(root, "logs", "follow", "--offset", "0").stdout
    gate.touch()
    rest = agent(root, "logs", "follow", "--offset", str(len(first)), "--follow",
                 "--poll", "0.01").stdout
    expected = "".join("first %d\n" % i for i in range(200))
    expected += "".join("second %d\n" % i for i in range(2000))
    assert first + rest == expected.encode()
    assert wait_final(root, "follow")["state"] == "succeeded"


def test_logs_rejects_an_offset_past_the_end(root):
    launch(root, "short", "print('x')")
    wait_final(root, "short")
    proc = agent(root, "logs", "short", "--offset", "99", check=False)
    assert proc.returncode == 1 and "offset 99" in json.loads(proc.stdout)["error"]


def test_file_errors_answer_json(root):
    launch(root, "gone", "print('x')")
    wait_final(root, "gone")
    (Path(root) / "jobs" / "gone" / "output.log").unlink()
    proc = agent(root, "logs", "gone", check=False)
    answer = json.loads(proc.stdout)
    assert proc.returncode == 1 and "output.log" in answer["error"] and answer["hint"]


def test_logs_exit_quietly_when_the_reader_goes_away(root):
    launch(root, "big", "import sys\nfor i in range(200000): print('x' * 100)")
    wait_final(root, "big")
    proc = subprocess.run("%s -X dev %s --root %s logs big --follow | head -c 10"
                          % (PY, AGENT, root), shell=True, capture_output=True, timeout=WAIT_S)
    assert proc.stdout == b"x" * 10
    assert proc.stderr == b""


def test_a_follower_of_a_quiet_job_ends_when_its_reader_goes_away(root):
    launch(root, "quiet", "import time; print('up', flush=True); time.sleep(600)")
    wait_for(lambda: b"up" in log_of(root, "quiet"), "the task to start")
    follower = subprocess.Popen([PY, "-X", "dev", str(AGENT), "--root", str(root), "logs",
                                 "quiet", "--follow"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    assert follower.stdout.read(3) == b"up\n"
    follower.stdout.close()  # like an SSH session that died: nothing more will be written
    assert follower.wait(timeout=WAIT_S) == 0
    assert follower.stderr.read() == b""
    follower.stderr.close()
    assert call(root, "status", "quiet")["state"] == "running"
    assert call(root, "cancel", "quiet", "--grace", "5")["state"] == "cancelled"


def test_job_survives_its_launcher_session_being_killed(root, tmp_path):
    gate = tmp_path / "gate"
    code = ("import os, time\nprint('started', flush=True)\n"
            "while not os.path.exists(%r): time.sleep(0.01)\nprint('done')\n" % str(gate))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"job_id": "survivor", "name": "s", "argv": [PY, "-c", code]}))
    # Like an SSH session: a session leader whose whole group dies after the launch.
    launcher = subprocess.Popen(
        "%s %s --root %s launch < %s; echo launched; sleep 600" % (PY, AGENT, root, spec),
        shell=True, start_new_session=True, stdout=subprocess.PIPE)
    assert launcher.stdout.readline().startswith(b"{")
    assert launcher.stdout.readline() == b"launched\n"
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    launcher.stdout.close()
    assert call(root, "status", "survivor")["state"] == "running"
    gate.touch()
    state = wait_final(root, "survivor")
    assert state["state"] == "succeeded"
    assert log_of(root, "survivor") == b"started\ndone\n"


def test_cancel_kills_a_task_that_ignores_sigterm(root, tmp_path):
    code = ("import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(\"child\", flush=True); "
            "time.sleep(600)'])\n"
            "time.sleep(600)\n")
    launch(root, "stubborn", code)
    wait_for(lambda: b"child" in log_of(root, "stubborn"), "the child to start")
    running = call(root, "status", "stubborn")
    pgid = running["task_pgid"]
    assert len(live_members(pgid)) == 2
    state = call(root, "cancel", "stubborn", "--grace", "0.5")
    assert state["state"] == "cancelled"
    assert state["exit_code"] == 128 + signal.SIGKILL  # the grace passed: SIGKILL did it
    assert live_members(pgid) == []
    assert live_members(running["pgid"]) == []  # the supervisor is gone too
    assert call(root, "status", "stubborn")["state"] == "cancelled"
    assert call(root, "cancel", "stubborn")["state"] == "cancelled"  # idempotent


def test_cancel_a_task_that_obeys_sigterm_within_the_grace(root):
    launch(root, "polite", "import time; print('up', flush=True); time.sleep(600)")
    wait_for(lambda: b"up" in log_of(root, "polite"), "the task to start")
    state = call(root, "cancel", "polite", "--grace", "30")
    assert state["state"] == "cancelled" and state["exit_code"] == 128 + signal.SIGTERM


def test_killed_supervisor_means_lost(root):
    launch(root, "orphan", "import time; print('up', flush=True); time.sleep(600)")
    wait_for(lambda: b"up" in log_of(root, "orphan"), "the task to start")
    running = call(root, "status", "orphan")
    os.kill(running["pid"], signal.SIGKILL)
    wait_for(lambda: running["pid"] not in live_members(running["pgid"]), "the supervisor to die")
    state = call(root, "status", "orphan")
    assert state["state"] == "lost" and "supervisor" in state["error"]
    persisted = json.loads((Path(root) / "jobs" / "orphan" / "state.json").read_text())
    assert persisted["state"] == "lost"
    # logs --follow ends on a lost job; cancel stops the task the supervisor left behind.
    assert agent(root, "logs", "orphan", "--follow").stdout == b"up\n"
    assert live_members(running["task_pgid"])
    assert call(root, "cancel", "orphan", "--grace", "5")["state"] == "cancelled"
    assert live_members(running["task_pgid"]) == []


def test_multi_task_job_stops_at_the_first_failure(root):
    tasks = [{"name": "prepare", "argv": [PY, "-c", "print('prepare')"]},
             {"name": "train", "argv": [PY, "-c", "print('train'); raise SystemExit(5)"]},
             {"name": "evaluate", "argv": [PY, "-c", "print('evaluate')"]}]
    launch(root, "multi", tasks=tasks)
    state = wait_final(root, "multi")
    assert state["state"] == "failed" and state["exit_code"] == 5
    assert state["task"] == "train" and state["tasks"] == ["prepare", "train", "evaluate"]
    assert log_of(root, "multi") == b"prepare\ntrain\n"


def test_a_command_that_cannot_start_fails_the_job(root):
    tasks = [{"name": "missing", "argv": ["/nonexistent/cube-tool"]}]
    launch(root, "nostart", tasks=tasks)
    state = wait_final(root, "nostart")
    assert state["state"] == "failed" and state["exit_code"] == 127
    assert b"cannot start task 'missing'" in log_of(root, "nostart")


def test_duplicate_job_id_is_refused(root):
    launch(root, "dup", "print(1)")
    proc = agent(root, "launch", stdin=json.dumps(
        {"job_id": "dup", "name": "x", "argv": [PY, "-c", "print(2)"]}).encode(), check=False)
    assert proc.returncode == 1
    answer = json.loads(proc.stdout)
    assert "already exists" in answer["error"] and answer["hint"]
    wait_final(root, "dup")
    assert log_of(root, "dup") == b"1\n"


@pytest.mark.parametrize("spec, words", [
    ({"job_id": "../escape", "argv": ["true"]}, "job id"),
    ({"job_id": "ok", "argv": []}, "argv"),
    ({"job_id": "ok", "argv": ["true"], "env": {"A": 1}}, "env"),
    ({"job_id": "ok", "tasks": [{"name": "t"}]}, "tasks[0].argv"),
])
def test_bad_specs_are_refused_before_anything_is_created(root, spec, words):
    proc = agent(root, "launch", stdin=json.dumps(spec).encode(), check=False)
    assert proc.returncode == 1 and words in json.loads(proc.stdout)["error"]
    assert not (Path(root) / "jobs" / "ok").exists()


def test_status_by_name_all_and_unknown(root):
    for job_id in ("a1", "a2"):
        launch(root, job_id, "print(%r)" % job_id, name="nightly")
        wait_final(root, job_id)
    assert call(root, "status", "--name", "nightly")["job_id"] == "a2"
    assert [s["job_id"] for s in call(root, "status", "--all")["jobs"]] == ["a1", "a2"]
    assert call(root, "list-jobs", "--name", "other")["jobs"] == []
    proc = agent(root, "status", "nope", check=False)
    assert proc.returncode == 1 and "no job 'nope'" in json.loads(proc.stdout)["error"]


def test_supervisor_runs_without_warnings_under_dev_mode(root):
    env = dict(os.environ, PYTHONDEVMODE="1", PYTHONWARNINGS="error")
    spec = {"job_id": "dev", "name": "d", "argv": [PY, "-c", "print('ok')"]}
    agent(root, "launch", stdin=json.dumps(spec).encode(), env=env)
    assert wait_final(root, "dev")["state"] == "succeeded"
    assert (Path(root) / "jobs" / "dev" / "supervisor.log").read_bytes() == b""


def test_jobs_on_one_root_are_independent(root):
    for job_id in ("left", "right"):
        launch(root, job_id, "import time\nfor i in range(20): print(%r, i, flush=True); "
                             "time.sleep(0.01)" % job_id)
    for job_id in ("left", "right"):
        assert wait_final(root, job_id)["state"] == "succeeded"
        expected = "".join("%s %d\n" % (job_id, i) for i in range(20))
        assert log_of(root, job_id) == expected.encode()


def test_a_job_from_before_a_reboot_is_lost(root):
    launch(root, "rebooted", "import time; time.sleep(600)")
    state_file = Path(root) / "jobs" / "rebooted" / "state.json"
    state = json.loads(state_file.read_text())
    state["boot_id"] = "a-previous-boot"
    state_file.write_text(json.dumps(state))
    lost = call(root, "status", "rebooted")
    assert lost["state"] == "lost" and "rebooted" in lost["error"]


@pytest.mark.integration
def test_cancel_stops_the_docker_container(root, docker_engine):
    from tests.fixtures.docker import BASE_IMAGE

    name = "cube-agent-test-%d" % os.getpid()
    # sleep as the container's PID 1 ignores SIGTERM: only `docker stop` (its SIGKILL) ends it.
    argv = ["docker", "run", "--rm", "--name", name, BASE_IMAGE, "sleep", "600"]
    launch(root, "boxed", tasks=[{"name": "boxed", "argv": argv}], docker_container=name)
    running = lambda: subprocess.run(  # noqa: E731
        ["docker", "inspect", "-f", "{{.State.Running}}", name],
        capture_output=True, text=True).stdout.strip() == "true"
    try:
        wait_for(running, "the container to run")
        assert call(root, "cancel", "boxed", "--grace", "1")["state"] == "cancelled"
        assert not running()  # stopped (--rm then removes it in the background)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def agent_processes(*words):
    """Pids of live agent processes whose command line has all these words."""
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv = Path(cmdline).read_bytes().split(b"\0")
        except OSError:
            continue
        if str(AGENT).encode() in argv and all(w.encode() in argv for w in words):
            pids.append(int(cmdline.split("/")[2]))
    return pids


@pytest.mark.integration
def test_over_real_ssh_the_job_outlives_its_sessions(lab, tmp_path):
    require(shutil.which("ssh") is not None, "the OpenSSH client (ssh) is not installed")
    host = lab.hosts[0]
    ssh = ["ssh", "-i", str(lab.home / "lab" / "id_ed25519"), "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=%s" % lab.known_hosts,
           "-p", str(host.port), "%s@%s" % (getpass.getuser(), host.address)]

    def remote(*args):
        return ssh + [shlex.join([PY, str(AGENT), "--root", host.root, *args])]

    job_id, gate = "ssh-%d-%d" % (os.getpid(), time.monotonic_ns()), tmp_path / "gate"
    code = ("import os, time\nprint('started', flush=True)\n"
            "while not os.path.exists(%r): time.sleep(0.01)\nprint('done')\n" % str(gate))
    spec = {"job_id": job_id, "name": "ssh", "argv": [PY, "-c", code]}
    try:
        # ssh returns: the supervisor holds none of the channel's pipes.
        proc = subprocess.run(remote("launch"), input=json.dumps(spec).encode(),
                              capture_output=True, timeout=WAIT_S)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["result"]["state"] == "running"
        follower = subprocess.Popen(remote("logs", job_id, "--follow"), stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
        assert follower.stdout.readline() == b"started\n"
        assert lab.kill_ssh_sessions(host.name) >= 1
        follower.wait(timeout=WAIT_S)
        follower.stdout.close()
        wait_for(lambda: not agent_processes("logs", job_id), "the remote follower to end")
        status = subprocess.run(remote("status", job_id), capture_output=True, timeout=WAIT_S)
        assert json.loads(status.stdout)["result"]["state"] == "running"
        gate.touch()
        rest = subprocess.run(remote("logs", job_id, "--offset", "8", "--follow"),
                              capture_output=True, timeout=WAIT_S)
        assert rest.stdout == b"done\n"
        status = subprocess.run(remote("status", job_id), capture_output=True, timeout=WAIT_S)
        assert json.loads(status.stdout)["result"]["state"] == "succeeded"
    finally:
        gate.touch()
