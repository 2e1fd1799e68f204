"""`cube describe` and `cube validate`: what a cube is made of, and whether it loads.

`describe_cube` / `validate_cube` return plain data; the commands render it as text or --json.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import List, Optional

import typer

from controller.cli import app
from controller.cube import Cube, Param, load_cube
from controller.errors import CubeError
from controller.plan import TaskPlan, plan_job
from controller.runtimes.python import env_hash_for, local_interpreters, pick_interpreter
from controller.taskargs import parse_param_overrides, split_tasks, task_argv


def describe_cube(cube: Cube, tasks: list[str] | None = None,
                  overrides: dict[str, str] | None = None) -> dict:
    plan = plan_job(cube, tasks or list(cube.tasks), overrides or {})
    env = cube.env
    return {
        "name": cube.name, "description": cube.description, "root": str(cube.root),
        "workspace": str(cube.workspace),
        "files": {"mlcube": str(cube.mlcube_file),
                  "metadata": str(cube.metadata_file) if cube.metadata_file else None},
        "tasks": [_task_data(cube, t) for t in plan.tasks],
        "environment": {
            "runtime": env.runtime, "runtime_reason": env.runtime_reason,
            "interpreter": env.runtime_name, "python_version": env.python_version,
            "framework": env.framework, "requirements": env.requirements,
            "requirements_file": env.requirements_file, "entry": env.entry,
            "entry_source": env.entry_source, "playbooks": env.playbooks,
            "env_hash": _local_env_hash(cube),
        },
        "warnings": list(cube.warnings),
    }


def _task_data(cube: Cube, task: TaskPlan) -> dict:
    return {"name": task.name, "entrypoint": cube.tasks[task.name].entrypoint,
            "params": [_param_data(p) for p in task.params],
            "argv": task_argv(cube, task.name, task.params)}


def _local_env_hash(cube: Cube) -> str | None:
    """The env hash a local run would use (it is keyed on the interpreter found here)."""
    try:
        return env_hash_for(cube, pick_interpreter(cube.env.python_version, local_interpreters()))
    except CubeError:
        return None


def _param_data(p: Param) -> dict:
    return {"name": p.name, "io": p.io, "type": p.type, "path": str(p.path), "rel": p.rel,
            "opts": p.opts, "exists": p.path.exists()}


def validate_cube(cube: Cube) -> dict:
    return {"ok": True, "name": cube.name, "tasks": list(cube.tasks), "warnings": cube.warnings}


# ----------------------------------------------------------------------------------- render

def render_describe(d: dict) -> str:
    out = [f"cube {d['name']}" + (f": {d['description']}" if d["description"] else ""),
           f"  folder     {d['root']}", f"  workspace  {d['workspace']}"]
    for t in d["tasks"]:
        out += ["", f"task {t['name']}"]
        width = max((len(p["name"]) for p in t["params"]), default=0)
        for p in t["params"]:
            missing = p["io"] == "input" and not p["exists"]
            flags = " ".join(x for x in (p["opts"], "(missing)" if missing else "") if x)
            out.append(f"  {p['io']:<6}  {p['name']:<{width}}  {p['type']:<9}  {p['path']}"
                       + (f"  {flags}" if flags else ""))
        out.append(f"  command {shlex.join(t['argv'])}")
    e = d["environment"]
    fw = " ".join(str(x) for x in (e["framework"].get("name"), e["framework"].get("version")) if x)
    out += ["", "environment",
            f"  runtime       {e['runtime']} ({e['runtime_reason']})",
            f"  interpreter   {e['interpreter']} {e['python_version'] or '(any version)'}",
            f"  framework     {fw or '(none)'}",
            f"  requirements  {', '.join(e['requirements']) or '(none)'}",
            f"  entry         {shlex.join(e['entry']) or '(image default)'}"
            + (f"  from {e['entry_source']}" if e["entry_source"] else ""),
            f"  env hash      {e['env_hash']}"]
    if e["playbooks"]:
        out.append(f"  playbooks     {', '.join(e['playbooks'])}")
    return "\n".join(out + _render_warnings(d["warnings"]))


def _render_warnings(warnings: list[str]) -> list[str]:
    return (["", "warnings"] + [f"  {w}" for w in warnings]) if warnings else []


def _load(cube: Path, workspace: Path | None, config: list[str] | None,
          runtime: str | None) -> Cube:
    return load_cube(cube, workspace=workspace, config_overrides=config or [],
                     requested_runtime=runtime)


# ---------------------------------------------------------------------------------- commands

CUBE_ARG = typer.Argument(..., help="Cube folder (holds mlcube.yaml).")
WORKSPACE_OPT = typer.Option(None, "--workspace", help="Workspace folder (default CUBE/workspace).")
CONFIG_OPT = typer.Option(None, "-P", help="Config override KEY=VALUE, e.g. -P docker.image=x:1.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of text.")


@app.command()
def describe(
    cube: Path = CUBE_ARG,
    overrides: Optional[List[str]] = typer.Argument(None, help="Parameter overrides name=PATH."),
    task: Optional[str] = typer.Option(None, "--task", help="Only these tasks (a,b)."),
    workspace: Optional[Path] = WORKSPACE_OPT,
    config: Optional[List[str]] = CONFIG_OPT,
    runtime: Optional[str] = typer.Option(None, "--runtime", help="python or docker."),
    as_json: bool = JSON_OPT,
) -> None:
    """Show a cube's tasks, parameters (resolved paths) and environment."""
    loaded = _load(cube, workspace, config, runtime)
    tasks = split_tasks(task, loaded) if task else None
    data = describe_cube(loaded, tasks, parse_param_overrides(overrides or []))
    typer.echo(json.dumps(data, indent=2) if as_json else render_describe(data))


@app.command()
def validate(
    cube: Path = CUBE_ARG,
    workspace: Optional[Path] = WORKSPACE_OPT,
    config: Optional[List[str]] = CONFIG_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Check mlcube.yaml and metadata.yaml; exit 2 with the error when they are wrong."""
    data = validate_cube(_load(cube, workspace, config, None))
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for w in data["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"ok: {data['name']} ({len(data['tasks'])} tasks)")
