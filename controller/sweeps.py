"""Sweeps: one cube run many times, each variant with other values in its YAML input files.

    plan_sweep(req)   everything checked, nothing written: the variants (controller.sweepgrid),
                      each value converted to its key's type, each variant's parameter overrides
    start(req, sinks) writes each variant's copy of the varied files under
                      workspace/sweeps/<sweep>/<variant>/, records the sweep in the ledger and
                      submits one detached job per variant through remote.run (placement and the
                      hosts' slot queues do the rest); returns at once
    retry(ref, sinks) submits again the variants whose job failed, was lost or never started
    follow(ref, sinks) waits for every variant, pulling each one's outputs as it ends

`--max-parallel N` without a daemon: the variants are dealt to N lanes; a lane's first variant
is placed like any job, and each later one goes to the same host with `after: [the lane's
previous job]`, so that host's agent starts it only once that job is final (agent/after.py).

A sweep whose host is a Slurm login node is ONE Slurm job array instead: each variant's job is
prepared as any (synced, provisioned, its folder written) but only staged (`slurm-stage`), then
one `slurm-array` submits them all with `--array=0-K%N` (N: --max-parallel); each variant keeps
its own cube job, and its ledger row the array task's Slurm id `<array>_<i>`.
"""

from __future__ import annotations

import copy
import getpass
import posixpath
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller import placement, remote, slurm, sweepgrid, sweepstate
from controller.cube import Cube, Param, load_cube
from controller.errors import CubeError
from controller.hosts import atomic_write, resolve_host
from controller.jobs import Job, Ledger, redact
from controller.plan import JobPlan, plan_job
from controller.selectors import select_hosts
from controller.sinks import Sinks

Log = Callable[[str], None]
YAML_SUFFIXES = (".yaml", ".yml")
RETRIED_STATES = ("failed", "lost")


@dataclass
class SweepRequest:
    cube_path: Path
    host: str
    tasks: str
    vary: list[str] = field(default_factory=list)        # --vary PARAM:KEY.PATH=V1,V2
    sweep_file: Path | None = None                       # --sweep FILE
    overrides: dict[str, str] = field(default_factory=dict)   # NAME=PATH, as for remote run
    config_overrides: list[str] = field(default_factory=list)
    workspace: Path | None = None
    runtime: str | None = None
    inventory: Path | None = None
    accept_new_host_key: bool = False
    gpus: int | None = None
    slots: int | None = None
    labels: list[str] = field(default_factory=list)
    max_parallel: int | None = None


@dataclass
class VariantPlan:
    name: str
    values: dict[str, Any]     # "param:key.path" -> the value set, converted
    folder: str                # workspace-relative: sweeps/<sweep>/<variant>
    docs: dict[str, Any]       # workspace-relative variant file -> its document
    overrides: dict[str, str]  # the job's parameter overrides


@dataclass
class SweepPlan:
    id: str
    cube: Cube
    tasks: list[str]
    keys: list[str]            # "param:key.path" of every value set, in column order
    variants: list[VariantPlan]


# ---- planning: every check before anything is written, synced or started --------------------

def plan_sweep(req: SweepRequest) -> SweepPlan:
    if req.max_parallel is not None and req.max_parallel < 1:
        raise CubeError(f"--max-parallel must be at least 1, not {req.max_parallel}.",
                        "e.g. --max-parallel 2")
    cube = load_cube(req.cube_path, workspace=req.workspace, requested_runtime=req.runtime,
                     config_overrides=[*req.config_overrides, *placement.gpu_overrides(req.gpus)])
    base = plan_job(cube, req.tasks, req.overrides)
    base.inputs_to_push()  # a missing input fails now, not once per variant
    listed = sweepgrid.load_sweep_file(req.sweep_file) if req.sweep_file else []
    variants = sweepgrid.combine(listed, sweepgrid.grid([sweepgrid.parse_vary(v)
                                                         for v in req.vary]))
    if not variants or not any(v.values for v in variants):
        raise CubeError("A sweep needs values to vary.",
                        "Give --vary PARAM:KEY.PATH=V1,V2 (repeatable) or --sweep FILE.yaml.")
    inputs = yaml_inputs(base)
    for v in variants:
        v.values = {_param_name(param, inputs, base): keys for param, keys in v.values.items()}
    select_hosts(req.host, req.labels, req.inventory)  # an empty selection fails here too
    sweep_id = new_sweep_id(cube.name)
    bases = {param: _read_yaml(inputs[param]) for v in variants for param in v.values}
    planned = [_plan_variant(cube, base, sweep_id, name, v.values, bases, inputs, req.overrides)
               for name, v in zip(sweepgrid.variant_names(variants), variants, strict=True)]
    keys = list(dict.fromkeys(k for p in planned for k in p.values))
    return SweepPlan(sweep_id, cube, base.task_names, keys, planned)


def new_sweep_id(cube_name: str) -> str:
    return f"{cube_name}-sweep-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-" \
           f"{secrets.token_hex(2)}"


def yaml_inputs(plan: JobPlan) -> dict[str, Param]:
    """The run's input files a sweep can vary: YAML files that no task of the run writes."""
    return {p.name: p for t in plan.tasks for p in t.inputs
            if p.type == "file" and p.path.suffix.lower() in YAML_SUFFIXES
            and not plan.is_produced(p)}


def _param_name(param: str, inputs: dict[str, Param], plan: JobPlan) -> str:
    listed = ", ".join(inputs) or "(none)"
    if not param:
        if len(inputs) == 1:
            return next(iter(inputs))
        raise CubeError(f"--vary without PARAM: needs one YAML input file, and task(s) "
                        f"{', '.join(plan.task_names)} have {len(inputs)}: {listed}.",
                        "Name the file parameter: --vary PARAM:KEY.PATH=V1,V2.")
    if param in inputs:
        return param
    found = [p for t in plan.tasks for p in t.params if p.name == param]
    if not found:
        raise CubeError(f"Task(s) {', '.join(plan.task_names)} of cube '{plan.cube.name}' have "
                        f"no parameter '{param}'.", f"YAML input files that can vary: {listed}.")
    p = found[0]
    what = ("an output" if plan.is_produced(p) else "a directory" if p.type == "directory"
            else f"not a YAML file ({p.path.name})")
    raise CubeError(f"Parameter '{param}' cannot be varied: it is {what}.",
                    f"A sweep varies keys inside YAML input files: {listed}.")


def _read_yaml(p: Param) -> dict:
    try:
        doc = yaml.safe_load(p.path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CubeError(f"Cannot read {p.name}'s file {p.path} as YAML: {err}",
                        "Fix the file, or point the parameter elsewhere with NAME=PATH.") from None
    if not isinstance(doc, dict):
        raise CubeError(f"{p.name}'s file {p.path} is not a YAML mapping, so it has no keys "
                        "to vary.", "A sweep varies KEY.PATH inside a mapping.")
    return doc


def _plan_variant(cube: Cube, base: JobPlan, sweep_id: str, name: str,
                  values: dict[str, dict[str, Any]], bases: dict[str, dict],
                  inputs: dict[str, Param], user: dict[str, str]) -> VariantPlan:
    folder = posixpath.join("sweeps", sweep_id, name)
    names = [inputs[param].path.name for param in values]
    docs, files, shown = {}, {}, {}
    for param, keys in values.items():
        doc = copy.deepcopy(bases[param])
        for key, value in keys.items():
            shown[f"{param}:{key}"] = sweepgrid.set_key(doc, key, value,
                                                        f"{param} ({inputs[param].path.name})")
        filename = inputs[param].path.name
        rel = posixpath.join(folder, filename if names.count(filename) == 1
                             else f"{param}-{filename}")
        docs[rel], files[param] = doc, rel
    overrides = {**user, **output_overrides(base, folder), **files}
    plan_job(cube, base.task_names, overrides)  # the overrides are valid for every task
    return VariantPlan(name, shown, folder, docs, overrides)


def output_overrides(plan: JobPlan, folder: str) -> dict[str, str]:
    """Every parameter a task of the run writes, moved under the variant's folder (keeping its
    own relative path), so variants never overwrite each other or the user's outputs."""
    out = {}
    for task in plan.tasks:
        for p in task.params:
            if p.io == "output" or plan.is_produced(p):
                rel = posixpath.join(folder, p.rel if p.rel is not None else p.name)
                out[p.name] = rel + "/" if p.type == "directory" else rel
    return out


# ---- starting --------------------------------------------------------------------------------

def start(req: SweepRequest, sinks: Sinks) -> dict:
    """Plan, write the variant files, record the sweep, submit every variant; the sweep."""
    plan = plan_sweep(req)
    write_files(plan)
    spec = _record(plan, req)
    with Ledger() as ledger:
        ledger.save_sweep(spec)
    lanes = f", at most {req.max_parallel} at once" if req.max_parallel else ""
    sinks.log(f"sweep {plan.id}: {len(plan.variants)} variants of {plan.cube.name} "
              f"({', '.join(plan.keys)}) on {req.host}{lanes}")
    submit(spec, [v.name for v in plan.variants], sinks, first_fatal=True,
           overrides={v.name: v.overrides for v in plan.variants})
    return spec


def write_files(plan: SweepPlan) -> None:
    for variant in plan.variants:
        for rel, doc in variant.docs.items():
            header = (f"# sweep {plan.id}, variant {variant.name}: "
                      + ", ".join(f"{k}={v}" for k, v in variant.values.items()) + "\n")
            text = header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True,
                                           default_flow_style=None)  # short lists stay [8, 4]
            path = plan.cube.workspace / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, text)


def _record(plan: SweepPlan, req: SweepRequest) -> dict:
    cube = plan.cube
    return {
        "id": plan.id, "cube": cube.name, "cube_path": str(cube.root),
        "workspace": str(cube.workspace), "host": req.host, "labels": list(req.labels),
        "tasks": plan.tasks, "overrides": redact(req.overrides),
        "config_overrides": list(req.config_overrides), "runtime": req.runtime,
        "inventory": str(req.inventory or ""), "gpus": req.gpus, "slots": req.slots,
        "accept_new_host_key": req.accept_new_host_key,
        "max_parallel": req.max_parallel, "created_at": time.time(), "user": getpass.getuser(),
        "keys": plan.keys, "metrics_file": cube.env.metrics_file,
        "lanes": [{"host": None, "tail": None} for _ in range(req.max_parallel or 0)],
        "variants": [{"name": v.name, "values": v.values, "folder": v.folder,
                      "files": sorted(v.docs), "overrides": redact(v.overrides), "error": None,
                      "lane": i % req.max_parallel if req.max_parallel else None}
                     for i, v in enumerate(plan.variants)],
    }


def submit(spec: dict, names: list[str], sinks: Sinks, *, first_fatal: bool,
           overrides: dict[str, dict[str, str]] | None = None) -> None:
    """One detached job per named variant, in order; a variant that cannot start fails only
    itself (its error is kept for `cube sweep status`), except the first of a new sweep, whose
    error (no host fits, say) would be every variant's. `overrides`: the variants' own, when
    the spec's are redacted."""
    variants = {v["name"]: v for v in spec["variants"]}
    array = _on_slurm(spec)
    staged: dict[str, str] = {}   # variant -> its staged job (a Slurm host's array)
    for i, name in enumerate(names):
        variant = variants[name]
        lane = spec["lanes"][variant["lane"]] if variant.get("lane") is not None and not array \
            else None
        params = (overrides or {}).get(name, variant["overrides"])
        try:
            request = _run_request(spec, variant, lane, params)
            request.slurm_stage = array
            result = remote.run(request, _prefixed(sinks, name))
        except CubeError as err:
            variant["error"] = str(err)
            _save(spec)
            if first_fatal and i == 0:
                raise
            sinks.log(f"{name}: did not start: {err}")
            continue
        variant["error"] = None
        if lane is not None:
            with Ledger() as ledger:
                lane.update(host=ledger.get(result.job_id).host, tail=result.job_id)
        _save(spec)
        if array:
            staged[name] = result.job_id
        else:
            sinks.log(f"{name}: job {result.job_id} {result.state}")
    if staged:
        _submit_array(spec, staged, sinks, first_fatal=first_fatal)


def _on_slurm(spec: dict) -> bool:
    """The sweep names one host (no selection) and it is a Slurm login node."""
    if placement.is_selection(spec["host"], spec["labels"]):
        return False
    try:
        host = resolve_host(spec["host"], Path(spec["inventory"]) if spec["inventory"] else None)
    except CubeError:
        return False
    return host.slurm is not None


def _submit_array(spec: dict, staged: dict[str, str], sinks: Sinks, *, first_fatal: bool) -> None:
    """The staged variants' jobs as ONE Slurm job array; each job's ledger row gets its array
    task's id `<array>_<i>`. A refusal fails every staged variant (its job is `failed`)."""
    jobs = list(staged.values())
    with Ledger() as ledger:
        first = ledger.get(jobs[0])
        try:
            with remote.connect_for(first, sinks.log) as target:
                answer = slurm.submit_array(target, first.host, spec["id"], jobs,
                                            spec.get("max_parallel"))
        except CubeError as err:
            for job_id in jobs:
                job = ledger.get(job_id)
                job.state, job.reason = "failed", str(err)
                ledger.save(job)
            if first_fatal:
                raise
            sinks.log(f"the job array did not start: {err}")
            return
        for name, job_id in staged.items():
            state = answer["jobs"].get(job_id, {})
            job = ledger.get(job_id)
            job.slurm_job_id = state.get("slurm_job_id")
            job.state = state.get("state", job.state)
            ledger.save(job)
            sinks.log(f"{name}: job {job_id} {job.state} (Slurm array task {job.slurm_job_id})")
    throttle = f"%{spec['max_parallel']}" if spec.get("max_parallel") else ""
    sinks.log(f"sweep {spec['id']}: {len(jobs)} variants submitted to Slurm on {first.host} as "
              f"job array {answer['array_job_id']} (0-{len(jobs) - 1}{throttle})")


def _prefixed(sinks: Sinks, name: str) -> Sinks:
    return Sinks(log=lambda message: sinks.log(f"{name}: {message}"))


def _run_request(spec: dict, variant: dict, lane: dict | None,
                 params: dict[str, str]) -> remote.RunRequest:
    """A variant's job: placed on the selection, or chained in its lane once the lane has a
    host (the same host, after the lane's previous job)."""
    lane = lane if lane is not None and lane.get("host") else None
    chained = lane is not None
    return remote.RunRequest(
        cube_path=Path(spec["cube_path"]), host=lane["host"] if lane else spec["host"],
        tasks=",".join(spec["tasks"]), overrides=dict(params),
        config_overrides=list(spec["config_overrides"]), workspace=Path(spec["workspace"]),
        runtime=spec["runtime"], detach=True,
        inventory=Path(spec["inventory"]) if spec["inventory"] else None,
        accept_new_host_key=bool(spec.get("accept_new_host_key")),
        gpus=spec["gpus"], slots=spec["slots"], labels=[] if chained else list(spec["labels"]),
        sweep=spec["id"], variant=variant["name"],
        after=[lane["tail"]] if lane and lane.get("tail") else [])


def _save(spec: dict) -> None:
    with Ledger() as ledger:
        ledger.save_sweep(spec)


# ---- later: retry and follow -------------------------------------------------------------------

def retry(ref: str, sinks: Sinks) -> list[str]:
    """Submit again, with the same values and folders, every variant whose latest job failed
    or was lost, or that never started. Returns their names."""
    with Ledger() as ledger:
        spec = ledger.sweep(ref)
    with sweepstate.HostPool(sinks.log) as pool:
        latest = sweepstate.refresh(spec["id"], pool, sinks.log, pull=True).latest
    names = [v["name"] for v in spec["variants"] if v["name"] not in latest
             or latest[v["name"]].state in RETRIED_STATES]
    for v in (v for v in spec["variants"] if v["name"] in names):
        missing = [f for f in v["files"] if not (Path(spec["workspace"]) / f).is_file()]
        if missing:
            raise CubeError(f"Variant {v['name']}'s file {missing[0]} is gone from "
                            f"{spec['workspace']}.", "Start a new sweep instead.")
        if "***" in v["overrides"].values():  # a secret-looking NAME=PATH was not stored
            raise CubeError(f"Variant {v['name']} had a parameter whose name looks secret; its "
                            "value was not stored, so it cannot be retried.",
                            "Start the sweep again with the value.")
    if names:
        sinks.log(f"sweep {spec['id']}: retrying {', '.join(names)}")
        submit(spec, names, sinks, first_fatal=False)
    return names


def follow(ref: str, sinks: Sinks, poll_s: float = 2.0) -> int:
    """Wait for every variant, saying when each ends and pulling its outputs: 0 when all
    succeeded, else 1. Ctrl-C leaves them running."""
    with Ledger() as ledger:
        spec = ledger.sweep(ref)
    with sweepstate.HostPool(sinks.log) as pool:
        while True:
            view = sweepstate.refresh(spec["id"], pool, sinks.log, pull=True)  # says each end
            if view.settled:
                break
            time.sleep(poll_s)
    states = [job.state for job in view.latest.values()]
    ok = len(states) == len(spec["variants"]) and all(s == "succeeded" for s in states)
    return 0 if ok else 1


def look(ref: str, log: Log, *, pull: bool) -> tuple[dict, dict[str, Job]]:
    """The sweep and each variant's newest job, as their hosts say now; with `pull`, the
    outputs of final variants not pulled yet come back first (`cube sweep results`)."""
    with Ledger() as ledger:
        spec = ledger.sweep(ref)
    with sweepstate.HostPool(log) as pool:
        return spec, sweepstate.refresh(spec["id"], pool, log, pull=pull).latest


def listing(limit: int = 50) -> list[tuple[dict, dict[str, Job]]]:
    """Recent sweeps with their variants' newest jobs, from the ledger alone (no host asked)."""
    with Ledger() as ledger:
        return [(spec, sweepstate.latest_jobs(ledger, spec["id"]))
                for spec in ledger.sweeps(limit)]
