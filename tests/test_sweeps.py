"""Sweeps (controller/sweeps.py, sweepgrid.py, sweepresults.py, agent/after.py): the grid and
the sweep file, values keeping their key's type, bad input refused before anything is synced,
and real sweeps on lab hosts: --max-parallel chains, retry, and the mnist cube on 3 hosts."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from agent import after
from agent.jobstate import save_json_atomic, try_lock
from agent.protocol import AgentError
from controller import lab as labmod
from controller import sweepgrid, sweepresults, sweeps
from controller.cube import load_cube
from controller.errors import ConfigError, CubeError
from controller.jobs import SCHEMA_VERSION, Job, Ledger
from controller.sweepgrid import Variant, Vary
from tests.conftest import require
from tests.fixtures.lab import Lab, sshd_available
from tests.test_remote import copy_cube, cube

FINAL = {"succeeded", "failed", "cancelled", "lost"}


# ---- the grid, the sweep file and key paths ----------------------------------------------------

def test_vary_parses_param_key_path_and_values():
    assert sweepgrid.parse_vary("train_config:learning_rate.initial=0.01, 0.003") == Vary(
        "train_config", "learning_rate.initial", ("0.01", "0.003"))
    assert sweepgrid.parse_vary("epochs=5,10") == Vary(None, "epochs", ("5", "10"))
    for bad in ("train_config:epochs", "=1,2", ":epochs=1", "epochs=", "epochs=1,,2"):
        with pytest.raises(CubeError) as err:
            sweepgrid.parse_vary(bad)
        assert err.value.exit_code == 2


def test_grid_is_the_cartesian_product_first_vary_slowest():
    axes = [Vary("c", "lr", ("0.1", "0.01")), Vary("c", "epochs", ("5", "10", "20"))]
    points = sweepgrid.grid(axes)
    assert len(points) == 6
    assert points[0] == {"c": {"lr": "0.1", "epochs": "5"}}
    assert points[3] == {"c": {"lr": "0.01", "epochs": "5"}}
    with pytest.raises(CubeError, match="twice"):
        sweepgrid.grid([Vary("c", "lr", ("1",)), Vary("c", "lr", ("2",))])


def test_values_keep_the_type_of_their_key():
    doc = {"epochs": 5, "lr": {"initial": 0.01}, "shuffle": True, "opt": "adam",
           "layers": [8, 4], "note": None}
    assert sweepgrid.set_key(doc, "epochs", "10", "f") == 10 and type(doc["epochs"]) is int
    assert sweepgrid.set_key(doc, "lr.initial", "1", "f") == 1.0
    assert type(doc["lr"]["initial"]) is float
    assert sweepgrid.set_key(doc, "shuffle", "no", "f") is False
    assert sweepgrid.set_key(doc, "opt", "123", "f") == "123"
    assert sweepgrid.set_key(doc, "layers.1", "16", "f") == 16 and doc["layers"] == [8, 16]
    assert sweepgrid.set_key(doc, "note", "0.5", "f") == 0.5  # null: any YAML value
    assert sweepgrid.set_key(doc, "epochs", 7, "f") == 7       # a sweep file's typed value
    for key, value, message in (("epochs", "abc", "not an integer"),
                                ("epochs", "0.5", "not an integer"),
                                ("epochs", 2.5, "not an integer"),
                                ("lr.initial", "fast", "not a number"),
                                ("shuffle", "maybe", "not a boolean"),
                                ("layers", "8", "not a list"),
                                ("nope", "1", "has no key 'nope'"),
                                ("lr.final", "1", "Keys under lr: initial"),
                                ("epochs.x", "1", "epochs is a number"),
                                ("layers.7", "1", "a list of 2")):
        with pytest.raises(CubeError, match=message) as err:
            sweepgrid.set_key(doc, key, value, "f")
        assert err.value.exit_code == 2


def test_the_sweep_file_lists_variants_with_dotted_or_nested_keys(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("variants:\n"
                    "  - name: small\n"
                    "    config: {model.depth: 1, rate: 0.1}\n"
                    "  - config:\n"
                    "      model: {depth: 3}\n")
    listed = sweepgrid.load_sweep_file(path)
    assert listed == [Variant("small", {"config": {"model.depth": 1, "rate": 0.1}}),
                      Variant(None, {"config": {"model.depth": 3}})]
    crossed = sweepgrid.combine(listed, sweepgrid.grid([Vary("config", "steps", ("1", "2"))]))
    assert [v.values["config"] for v in crossed][:2] == [
        {"model.depth": 1, "rate": 0.1, "steps": "1"}, {"model.depth": 1, "rate": 0.1, "steps": "2"}]
    assert sweepgrid.variant_names(crossed) == ["small-01", "small-02", "v03", "v04"]
    with pytest.raises(CubeError, match="used twice"):
        sweepgrid.variant_names([Variant("a", {}), Variant("a", {})])
    with pytest.raises(CubeError, match="set by the sweep file and by --vary"):
        sweepgrid.combine(listed, sweepgrid.grid([Vary("config", "rate", ("1",))]))


@pytest.mark.parametrize("text, where", [
    ("grid: {}\n", "field 'grid'"),
    ("variants: []\n", "field 'variants'"),
    ("variants: [5]\n", "field 'variants.0'"),
    ("variants: [{name: 'a b', config: {x: 1}}]\n", "field 'variants.0.name'"),
    ("variants: [{config: 3}]\n", "field 'variants.0.config'"),
])
def test_a_bad_sweep_file_names_the_field_and_line(tmp_path, text, where):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=where) as err:
        sweepgrid.load_sweep_file(path)
    assert err.value.exit_code == 2 and err.value.line == 1


def test_variant_names_are_numbered_wide_enough_to_sort():
    names = sweepgrid.variant_names([Variant(None, {}) for _ in range(12)])
    assert names[:2] == ["v01", "v02"] and names[-1] == "v12" and sorted(names) == names


# ---- planning a sweep of a cube (no host) --------------------------------------------------------

@pytest.fixture
def tuner(tmp_path):
    return copy_cube("tuner", tmp_path)


def request(cube_dir: Path, *vary: str, **kw) -> sweeps.SweepRequest:
    return sweeps.SweepRequest(cube_path=cube_dir, host="lab1", tasks="tune", vary=list(vary), **kw)


def test_plan_writes_one_typed_copy_per_variant_and_moves_the_outputs(tuner):
    plan = sweeps.plan_sweep(request(tuner, "config:steps=1,2", "config:rate=1",
                                     "config:model.depth=3"))
    assert plan.keys == ["config:steps", "config:rate", "config:model.depth"]
    assert [v.name for v in plan.variants] == ["v01", "v02"]
    first = plan.variants[0]
    assert first.folder == f"sweeps/{plan.id}/v01"
    assert first.overrides == {"config": f"{first.folder}/config.yaml",
                               "result": f"{first.folder}/result/"}
    assert first.values == {"config:steps": 1, "config:rate": 1.0, "config:model.depth": 3}
    assert not (tuner / "workspace" / "sweeps").exists()  # planning writes nothing
    sweeps.write_files(plan)
    written = yaml.safe_load((tuner / "workspace" / first.overrides["config"]).read_text())
    assert written["steps"] == 1 and type(written["rate"]) is float
    assert written["model"] == {"layers": [8, 4], "depth": 3} and written["must_exist"] == "/"


def test_plan_starts_from_the_users_own_override_of_the_varied_file(tuner):
    (tuner / "workspace" / "other.yaml").write_text(
        (tuner / "workspace" / "config.yaml").read_text().replace("steps: 4", "steps: 40"))
    plan = sweeps.plan_sweep(request(tuner, "rate=2", overrides={"config": "other.yaml"}))
    assert plan.variants[0].docs[f"sweeps/{plan.id}/v01/other.yaml"]["steps"] == 40


@pytest.mark.parametrize("vary, message", [
    ("notes:x=1", "cannot be varied: it is not a YAML file"),
    ("result:x=1", "cannot be varied: it is an output"),
    ("nope:x=1", "no parameter 'nope'"),
    ("config:nope=1", "has no key 'nope'"),
    ("config:steps=abc", "'abc' is not an integer"),
])
def test_plan_refuses_bad_input_with_exit_2(tuner, vary, message):
    with pytest.raises(CubeError, match=message) as err:
        sweeps.plan_sweep(request(tuner, vary))
    assert err.value.exit_code == 2


def test_plan_needs_values_and_a_positive_max_parallel(tuner):
    with pytest.raises(CubeError, match="needs values"):
        sweeps.plan_sweep(request(tuner))
    with pytest.raises(CubeError, match="--max-parallel"):
        sweeps.plan_sweep(request(tuner, "steps=1", max_parallel=0))


def test_metadata_names_the_metrics_file_and_a_bad_value_is_a_config_error(tuner):
    meta = tuner / "metadata.yaml"
    meta.write_text(meta.read_text() + "metrics: result/metrics.json\n")
    assert load_cube(tuner).env.metrics_file == "result/metrics.json"
    for bad in ("/abs/m.json", "../m.json", "m.txt", "[1]"):
        meta.write_text(re.sub(r"metrics: .*", f"metrics: {bad}", meta.read_text()))
        with pytest.raises(ConfigError, match="field 'metrics'"):
            load_cube(tuner)
    assert load_cube(REPO_MNIST).env.metrics_file == "model/metrics.json"


REPO_MNIST = Path(__file__).resolve().parent.parent / "cubes" / "mnist"


def test_a_sweep_is_recorded_before_its_jobs_and_secret_looking_values_are_not(tuner):
    """The first variant's error is every variant's: it is raised, and kept in the ledger."""
    mlcube = tuner / "mlcube.yaml"
    mlcube.write_text(mlcube.read_text().replace(
        "        notes: {type: file, default: notes.txt}\n",
        "        notes: {type: file, default: notes.txt}\n"
        "        api_token: {type: file, default: notes.txt}\n"))
    req = request(tuner, "steps=1,2", overrides={"api_token": "notes.txt"})
    req.host = "nohost.invalid"
    with pytest.raises(CubeError) as err:
        sweeps.start(req, sweeps.Sinks())
    assert err.value.exit_code == 3
    with Ledger() as ledger:
        spec = ledger.sweeps()[0]
        assert ledger.sweep_jobs(spec["id"]) == []
    assert spec["overrides"] == {"api_token": "***"}
    assert spec["variants"][0]["overrides"]["api_token"] == "***"
    assert "nohost.invalid" in spec["variants"][0]["error"]
    with pytest.raises(CubeError, match="looks secret"):
        sweeps.retry(spec["id"], sweeps.Sinks())


# ---- results -----------------------------------------------------------------------------------

def test_metrics_are_top_level_numbers_of_the_declared_file_or_every_json(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "metrics.json").write_text(json.dumps(
        {"test_accuracy": 0.9, "epochs": [{"loss": 1}], "ok": True, "config": {"lr": 1}}))
    (tmp_path / "eval.json").write_text(json.dumps({"test_accuracy": 0.8, "f1": 0.7}))
    (tmp_path / "list.json").write_text("[1, 2]")
    assert sweepresults.read_metrics(tmp_path, "model/metrics.json") == {"test_accuracy": 0.9}
    assert sweepresults.read_metrics(tmp_path, None) == {
        "test_accuracy": 0.8, "f1": 0.7, "metrics.test_accuracy": 0.9}
    assert sweepresults.read_metrics(tmp_path / "absent", None) == {}


def test_rows_sort_by_a_metric_and_render_as_csv():
    table = [{"variant": f"v{i}", "job": f"j{i}", "host": "h", "state": "succeeded",
              "exit_code": 0, "values": {"c:lr": lr}, "metrics": m}
             for i, (lr, m) in enumerate([(0.1, {"acc": 0.5}), (0.01, {"acc": 0.9}), (1, {})])]
    assert [r["variant"] for r in sweepresults.sort_rows(table, "acc")] == ["v1", "v0", "v2"]
    assert [r["variant"] for r in sweepresults.sort_rows(table, "c:lr", ascending=True)] == [
        "v1", "v0", "v2"]
    with pytest.raises(CubeError, match="Sort by one of: acc, c:lr"):
        sweepresults.sort_rows(table, "loss")
    csv = sweepresults.to_csv(table, ["c:lr"]).splitlines()
    assert csv[0] == "variant,job,host,state,exit_code,c:lr,acc"
    assert csv[1] == "v0,j0,h,succeeded,0,0.1,0.5" and csv[3] == "v2,j2,h,succeeded,0,1,"


# ---- the ledger and the agent's `after` ----------------------------------------------------------

def test_the_ledger_keeps_sweeps_and_a_v4_ledger_migrates(cube_home):
    path = cube_home / "old.db"
    with Ledger(path) as ledger:
        ledger.save(Job(id="j1", cube="c", host="h", tasks=["t"]))
    db = sqlite3.connect(path)
    db.execute("DROP TABLE sweeps")
    db.execute("CREATE TABLE j2 AS SELECT * FROM jobs")
    db.execute("ALTER TABLE j2 DROP COLUMN sweep")
    db.execute("ALTER TABLE j2 DROP COLUMN variant")
    db.execute("DROP TABLE jobs")
    db.execute("ALTER TABLE j2 RENAME TO jobs")
    db.execute("PRAGMA user_version = 4")
    db.commit()
    db.close()
    with Ledger(path) as ledger:
        assert ledger.version == SCHEMA_VERSION == 5 and ledger.get("j1").sweep is None
        ledger.save(Job(id="j2", cube="c", host="h", tasks=["t"], sweep="s-1", variant="v01"))
        ledger.save_sweep({"id": "s-1", "cube": "c", "created_at": 1.0, "variants": []})
        assert ledger.sweep("s-").get("id") == "s-1" and ledger.sweeps()[0]["id"] == "s-1"
        assert [j.variant for j in ledger.sweep_jobs("s-1")] == ["v01"]
        with pytest.raises(CubeError, match="No sweep"):
            ledger.sweep("nope")


def test_after_waits_only_for_jobs_that_are_not_final(tmp_path):
    def job(job_id: str, state: str) -> Path:
        path = tmp_path / "jobs" / job_id
        path.mkdir(parents=True)
        save_json_atomic(str(path / "state.json"), {"job_id": job_id, "state": state})
        return path

    job("done", "failed")
    running = job("busy", "running")
    lock = try_lock(str(running / "supervisor.lock"))  # a live supervisor holds its lock
    try:
        assert after.pending(str(tmp_path), ["done", "busy", "never-launched"]) == ["busy"]
    finally:
        os.close(lock)
    assert after.pending(str(tmp_path), ["busy"]) == []  # its supervisor vanished: lost
    after.check_spec({"job_id": "a", "after": ["b"]})
    for bad in ({"job_id": "a", "after": "b"}, {"job_id": "a", "after": ["a"]},
                {"job_id": "a", "after": ["../x"]}):
        with pytest.raises(AgentError):
            after.check_spec(bad)


# ---- on lab hosts --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_labs(tmp_path_factory):
    """lab1..lab3 with one slot each, under their own CUBE_HOME, for this module's tests."""
    require(sshd_available(), "OpenSSH server (/usr/sbin/sshd) is not installed")
    the_lab = Lab(home=tmp_path_factory.mktemp("sweep-lab"))
    try:
        the_lab.hosts = the_lab._call(lambda: labmod.lab_up(3, slots=1))
        yield the_lab
    finally:
        the_lab._call(labmod.lab_down)


@pytest.fixture
def on_lab(three_labs, cube_home):
    for f in (three_labs.inventory, three_labs.known_hosts):
        shutil.copy(f, cube_home / f.name)
    return three_labs


def start_sweep(*args: str, timeout: float = 600):
    result = cube("remote", "sweep", *args, timeout=timeout)
    return (result.stdout.split() or [""])[0], result


def sweep_jobs(sweep_id: str) -> list[dict]:
    listed = cube("remote", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return sorted((j for j in json.loads(listed.stdout) if j["sweep"] == sweep_id),
                  key=lambda j: j["created_at"])


def host_state(lab: Lab, job: dict) -> dict:
    """A job's state.json read straight from its host's root: no controller involved."""
    return json.loads((Path(lab.host(job["host"]).root) / "jobs" / job["id"] / "state.json")
                      .read_text())


def wait_final(lab: Lab, jobs: list[dict], timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        states = [host_state(lab, j) for j in jobs]
        if all(s["state"] in FINAL for s in states):
            return states
        assert time.monotonic() < deadline, [s["state"] for s in states]
        time.sleep(0.3)


def results_json(sweep_id: str) -> list[dict]:
    out = cube("sweep", "results", sweep_id, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["rows"]


def never_overlap(spans: list[tuple[str, str]]) -> None:
    spans = sorted(spans)
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        assert end <= begin, spans


@pytest.mark.integration
def test_bad_input_is_exit_2_before_anything_is_synced_or_recorded(on_lab, tuner):
    name = f"tuner{secrets.token_hex(3)}"  # a name no other test synced to the hosts
    mlcube = tuner / "mlcube.yaml"
    mlcube.write_text(mlcube.read_text().replace("name: tuner", f"name: {name}"))
    for vary, message in (("config:nope=1", "has no key 'nope'"),
                          ("notes:x=1", "it is not a YAML file (notes.txt)"),
                          ("nope:x=1", "no parameter 'nope'"),
                          ("config:steps=abc", "'abc' is not an integer")):
        _, result = start_sweep(str(tuner), "--host", "@lab", "--task", "tune", "--vary", vary)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "hint:" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert json.loads(cube("remote", "list", "--json").stdout) == []
    assert json.loads(cube("sweep", "list", "--json").stdout) == []
    assert not (tuner / "workspace" / "sweeps").exists()
    for h in on_lab.hosts:
        assert not (Path(h.root) / "cubes" / name).exists()
        assert not list((Path(h.root) / "jobs").glob(f"{name}-*"))


@pytest.mark.integration
def test_max_parallel_1_chains_the_variants_on_one_host_without_a_controller(on_lab, tuner):
    sweep_id, started = start_sweep(str(tuner), "--host", "@lab", "--task", "tune",
                                    "--vary", "config:steps=1,2,3", "--vary", "config:seconds=2",
                                    "--max-parallel", "1")
    assert started.returncode == 0, started.stderr
    jobs = sweep_jobs(sweep_id)
    assert [j["variant"] for j in jobs] == ["v01", "v02", "v03"]
    assert len({j["host"] for j in jobs}) == 1  # one lane: one host
    states = wait_final(on_lab, jobs)  # the agents chain them: nothing runs here meanwhile
    assert [s["state"] for s in states] == ["succeeded"] * 3
    never_overlap([(s["started_at"], s["ended_at"]) for s in states])
    assert all(s.get("queued_at") for s in states[1:])  # each waited for the one before

    rows = results_json(sweep_id)
    assert [(r["variant"], r["values"]["config:steps"], r["metrics"]["score"]) for r in rows] == [
        ("v01", 1, 1.0), ("v02", 2, 2.0), ("v03", 3, 3.0)]
    pulled = json.loads((tuner / "workspace" / "sweeps" / sweep_id / "v02" / "result" /
                         "metrics.json").read_text())
    assert pulled["types"] == ["float", "int", "bool"]  # the variant file kept every type
    assert not (tuner / "workspace" / "result").exists()  # the user's own outputs untouched
    listed = json.loads(cube("sweep", "list", "--json").stdout)
    assert listed[0]["id"] == sweep_id and listed[0]["states"] == {"succeeded": 3}


@pytest.mark.integration
def test_a_failed_variant_fails_alone_and_retry_reruns_it_in_its_folder(on_lab, tuner, tmp_path):
    gate = tmp_path / "gate"  # lab hosts share this machine's files
    sweep_id, first = start_sweep(str(tuner), "--host", "@lab", "--task", "tune",
                                  "--vary", f"config:must_exist=/,{gate}", "--follow")
    assert first.returncode == 1, first.stderr
    assert re.search(r"v01: job \S+ succeeded", first.stderr), first.stderr
    assert re.search(r"v02: job \S+ failed on lab\d \(exit 3\)", first.stderr), first.stderr
    status = json.loads(cube("sweep", "status", sweep_id, "--json").stdout)
    assert [r["state"] for r in status["variants_detail"]] == ["succeeded", "failed"]

    gate.write_text("open")
    retried = cube("sweep", "retry", sweep_id[:-2], "--follow", timeout=600)  # a prefix works
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.split()[0] == "v02"
    rows = results_json(sweep_id)
    assert [r["state"] for r in rows] == ["succeeded", "succeeded"]
    assert rows[1]["metrics"]["score"] == 4.0 and rows[1]["folder"].endswith(f"{sweep_id}/v02")
    assert [j["variant"] for j in sweep_jobs(sweep_id)] == ["v01", "v02", "v02"]
    again = cube("sweep", "retry", sweep_id)
    assert again.returncode == 0 and again.stdout.strip() == "nothing to retry"


@pytest.mark.integration
@pytest.mark.slow
def test_a_mnist_sweep_on_three_hosts_brings_every_variants_metrics_back(on_lab, tmp_path):
    """4 variants of the mnist cube (2,000 images, one epoch) on lab1..lab3, one slot each."""
    mnist = copy_cube("mnist", tmp_path)
    sweep_id, result = start_sweep(
        str(mnist), "--host", "@lab", "--task", "download,train", "train_config=train-smoke.yaml",
        "--vary", "train_config:learning_rate.initial=0.01,0.003",
        "--vary", "train_config:batch_size=128,256", "--follow", timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
    ws = mnist / "workspace"
    for variant in ("v01", "v02", "v03", "v04"):
        metrics = json.loads((ws / "sweeps" / sweep_id / variant / "model" / "metrics.json")
                             .read_text())
        assert metrics["config"]["epochs"] == 1 and metrics["train_examples"] == 2000
    assert not (ws / "model").exists()  # the user's own outputs untouched

    rows = results_json(sweep_id)
    assert [(r["values"]["train_config:learning_rate.initial"],
             r["values"]["train_config:batch_size"]) for r in rows] == [
        (0.01, 128), (0.01, 256), (0.003, 128), (0.003, 256)]
    assert all(0.1 < r["metrics"]["test_accuracy"] <= 1.0 for r in rows), rows
    best = cube("sweep", "results", sweep_id, "--sort", "test_accuracy", "--csv")
    assert best.stdout.splitlines()[0].startswith("variant,job,host,state,exit_code,"
                                                  "train_config:learning_rate.initial")

    jobs = sweep_jobs(sweep_id)
    assert len({j["host"] for j in jobs}) == 3  # placement spread them
    states = [host_state(on_lab, j) for j in jobs]
    for host in ("lab1", "lab2", "lab3"):  # one slot each: never two at once on a host
        never_overlap([(s["started_at"], s["ended_at"]) for j, s in zip(jobs, states, strict=True)
                       if j["host"] == host])
