"""Run records: everything a job used, kept so a run can be found, compared and repeated.

A record is a JSON object in the ledger's `records` table; its large parts (the per-file
digests of the cube, the frozen packages, the output digests) are files beside the ledger in
`$CUBE_HOME/records/<job id>/`. It holds:

    cube        name, path, digest (sha256 over the sorted per-file digests), files (count)
    requirements, config (-P overrides), runtime {name, env_key, image_digests?}
    params      the run's overrides (secret-looking values as ***) and each task's resolved
                parameters, workspace-relative where they can be
    inputs      per input the job reads: sha256, and for small YAML/JSON files their content,
                so a diff can name the key that changed
    tasks       [{name, argv, exit_code}], the argv exactly as it ran
    host        name, hostname, os, python, cpus, memory, gpus, driver
    times, state, exit_code, outputs (digests of what came back, in outputs.json)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
from pathlib import Path
from typing import Any

import yaml

from controller import paths, sync
from controller.errors import CubeError
from controller.jobs import Job, Ledger, redact
from controller.plan import JobPlan
from controller.runtimes.base import LaunchSpec
from controller.target import Target

RECORD_VERSION = 1
STRUCTURED_INPUT_MAX = 64 * 1024     # YAML/JSON inputs up to this size are kept whole
STRUCTURED_SUFFIXES = (".yaml", ".yml", ".json")


def records_dir(job_id: str) -> Path:
    return paths.cube_home() / "records" / job_id


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """{rel: sha256} of a file, or of every file under a folder (rel "" for a single file).
    Folders are read through sync's hash cache, so an unchanged dataset is not read again."""
    if root.is_file():
        return {"": file_digest(root)}
    return sync.local_digests(root, ignore=False)


def digest_of(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{rel}\0{sha}\n" for rel, sha in sorted(files.items()))
                          .encode()).hexdigest()


# ---- what a job is made of ---------------------------------------------------------------------

def code_files(plan: JobPlan) -> dict[str, str]:
    """The cube's files as a push sends them: .cubeignore applied, the workspace left out."""
    cube = plan.cube
    try:
        exclude = [cube.workspace.relative_to(cube.root).as_posix()]
    except ValueError:
        exclude = []
    return sync.local_digests(cube.root, exclude=exclude)


def input_entries(plan: JobPlan) -> dict[str, dict]:
    """Each input the job reads from outside itself: its digest, and small structured files'
    content (what a sweep or a person edits: train.yaml's learning rate)."""
    entries: dict[str, dict] = {}
    for task in plan.tasks:
        for p in task.inputs:
            key = p.rel or str(p.path)
            if plan.is_produced(p) or key in entries or not p.path.exists():
                continue
            files = tree_digests(p.path)
            entry: dict[str, Any] = {"sha256": digest_of(files)}
            if p.path.is_file() and p.path.suffix in STRUCTURED_SUFFIXES \
                    and p.path.stat().st_size <= STRUCTURED_INPUT_MAX:
                entry["content"] = _structured(p.path)
            entries[key] = entry
    return dict(sorted(entries.items()))


def _structured(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None


def resolved_params(plan: JobPlan) -> dict[str, dict[str, str]]:
    return {t.name: {p.name: p.rel or str(p.path) for p in t.params} for t in plan.tasks}


def start_record(plan: JobPlan, job: Job, spec: LaunchSpec, host: dict,
                 config_overrides: list[str], target: Target, envs_dir: str) -> dict:
    """The record as the job starts; `finish_record` adds its end. Large parts go to files.
    `target` is asked for the env's frozen packages or the image's digests."""
    frozen, python = python_env(target, spec, envs_dir)
    files = code_files(plan)
    folder = records_dir(job.id)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "files.json", json.dumps(files, indent=1))
    if frozen is not None:
        _write(folder / "frozen.txt", frozen)
    cube = plan.cube
    return {
        "version": RECORD_VERSION, "job_id": job.id, "kind": job.launcher,
        "cube": {"name": cube.name, "path": str(cube.root), "digest": digest_of(files),
                 "files": len(files), "workspace": str(cube.workspace),
                 "requirements_file": cube.env.requirements_file},
        "requirements": sorted(cube.env.requirements),
        "config": list(config_overrides),
        "runtime": {"name": plan.runtime, "env_key": spec.env_key, "python": python,
                    "image_digests": image_digests(target, spec)},
        "params": {"overrides": redact(plan.overrides), "resolved": resolved_params(plan)},
        "inputs": input_entries(plan),
        "tasks": [{"name": t.name, "argv": t.argv, "exit_code": None} for t in spec.tasks],
        "host": host,
        "times": {"created": job.created_at, "started": job.started_at, "ended": None},
        "state": job.state, "exit_code": None,
    }


def finish_record(record: dict, job: Job, agent_state: dict, outputs: dict[str, str]) -> dict:
    """The end: state, exit codes (the failing task's, and 0 for those before it), times, and
    the digests of the outputs that came back (in outputs.json)."""
    failed = agent_state.get("task") if job.state == "failed" else None
    seen_failure = False
    for task in record["tasks"]:
        if seen_failure:
            continue
        if task["name"] == failed:
            task["exit_code"], seen_failure = job.exit_code, True
        elif job.state in ("succeeded", "failed"):
            task["exit_code"] = 0
    record.update(state=job.state, exit_code=job.exit_code)
    record["times"].update(started=job.started_at, ended=job.ended_at)
    folder = records_dir(job.id)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "outputs.json", json.dumps(outputs, indent=1))
    record["outputs"] = {"files": len(outputs), "digest": digest_of(outputs)}
    return record


def output_digests(workspace: Path, rels: list[str]) -> dict[str, str]:
    found = {}
    for rel in rels:
        path = workspace / rel
        if path.exists():
            for sub, sha in tree_digests(path).items():
                found[f"{rel}/{sub}" if sub else rel] = sha
    return dict(sorted(found.items()))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- where it ran ------------------------------------------------------------------------------

def host_from_probe(name: str, probe: dict) -> dict:
    gpus = probe.get("gpus") or []
    return {"name": name, "hostname": probe.get("hostname"),
            "os": (probe.get("os") or {}).get("pretty_name"),
            "python": sorted({str(p.get("version")) for p in probe.get("python") or []}),
            "cpus": probe.get("cpu_count"), "memory_bytes": probe.get("mem_total_bytes"),
            "gpus": [g.get("name") for g in gpus],
            "driver": next((g.get("driver_version") for g in gpus
                            if g.get("driver_version")), None)}


def local_host() -> dict:
    """This machine, without a full probe (a warm `cube run` must stay fast)."""
    return {"name": "local", "hostname": platform.node(), "os": _os_release(),
            "python": [platform.python_version()], "cpus": os.cpu_count(),
            "memory_bytes": _mem_total(), "gpus": [], "driver": None}


def _os_release() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _mem_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def python_env(target: Target, spec: LaunchSpec, envs_dir: str) -> tuple[str | None, str | None]:
    """(pip freeze, Python version) of the job's venv, from the files playbooks/python.yaml
    wrote when it built the env; (None, None) for other runtimes."""
    if spec.runtime != "python" or not spec.env_key:
        return None, None
    env = f"{envs_dir.rstrip('/')}/{spec.env_key}"
    freeze = target.sh(f"cat {shlex.quote(env + '/cube-freeze.txt')}")
    marker = target.sh(f"cat {shlex.quote(env + '/cube-env.json')}")
    try:
        version = json.loads(marker.stdout).get("python") if marker.code == 0 else None
    except ValueError:
        version = None
    return (freeze.stdout if freeze.code == 0 else None), version


def image_digests(target: Target, spec: LaunchSpec) -> list[str] | None:
    """A container image's repo digests (empty for one built or loaded locally)."""
    if not spec.engine or not spec.env_key:
        return None
    result = target.sh(shlex.join([spec.engine, "image", "inspect", "--format",
                                   "{{json .RepoDigests}}", spec.env_key]))
    try:
        return list(json.loads(result.stdout)) if result.code == 0 else None
    except ValueError:
        return None


# ---- reading records back ----------------------------------------------------------------------

def load(ledger: Ledger, ref: str) -> tuple[Job, dict]:
    """A job and its record, with its large parts read back in."""
    job = ledger.get(ref)
    record = ledger.record(job.id)
    if record is None:
        raise CubeError(f"Job {job.id} has no run record (it ran before cube kept records).",
                        "Records exist for jobs started by this version of cube.")
    folder = records_dir(job.id)
    record["files"] = _read_json(folder / "files.json")
    record["outputs_files"] = _read_json(folder / "outputs.json")
    frozen = folder / "frozen.txt"
    record["frozen"] = frozen.read_text() if frozen.exists() else None
    return job, record


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
