"""The launcher seam: where a prepared job starts.

A runtime turns a job plan into a LaunchSpec on a target; a launcher starts that spec:

- `ForegroundLauncher`: here, now, task after task, output to the terminal (`cube run`);
- `AgentLauncher`: under the host's agent, detached from the SSH session (`cube remote run`).

What later issues add (a slot queue, several hosts at once, Slurm's sbatch) are launchers too:
they receive the same spec and never touch runtimes, sync or provisioning. Every launcher
answers with the job's state as the agent reports it: {state, exit_code?, task?, ...}.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from controller import slurm
from controller.plan import JobPlan, TaskPlan
from controller.runner import run_process, task_log_path
from controller.runtimes.base import LaunchSpec, TaskLaunch
from controller.target import Target
from controller.taskargs import check_inputs

Log = Callable[[str], None]


class Launcher(Protocol):
    def launch(self, target: Target, job_id: str, name: str | None,
               spec: LaunchSpec) -> dict: ...


@dataclass
class SlotRequest:
    """What a job asks of its host's slots (agent/leases.py): `slots` of the host's
    `total_slots`, granted host-wide through `lease_dir`; on a GPU host slot i is GPU
    `slot_gpus[i]`. With `no_queue` a busy host refuses the job instead of queueing it."""
    slots: int
    total_slots: int
    lease_dir: str
    slot_gpus: list[int] = field(default_factory=list)
    no_queue: bool = False
    after: list[str] = field(default_factory=list)  # enter the queue once these jobs are final

    def spec_fields(self) -> dict:
        return {"slots": self.slots, "total_slots": self.total_slots,
                "lease_dir": self.lease_dir, "slot_gpus": self.slot_gpus,
                "no_queue": self.no_queue, **({"after": self.after} if self.after else {})}


class AgentLauncher:
    """The host's agent starts the job under a detached supervisor and answers once it runs,
    or once it waits in the host's queue (state "queued") when it asks for slots."""

    def __init__(self, slots: SlotRequest | None = None):
        self.slots = slots

    def launch(self, target: Target, job_id: str, name: str | None, spec: LaunchSpec) -> dict:
        agent_spec = spec.agent_spec(job_id, name)
        agent_spec["env_key"] = spec.env_key  # what `prune` keeps while the job is kept
        if self.slots is not None:
            agent_spec.update(self.slots.spec_fields())
        return target.agent("launch", input=json.dumps(agent_spec).encode())


def launcher_for(target: Target, slots: SlotRequest | None = None) -> Launcher:
    """The launcher for a host: its agent, with the job's slot request when it has one (the
    agent's queue then grants it). Multi-host jobs and Slurm will be chosen here too."""
    on_slurm = slurm.launcher_for(target)
    if on_slurm is not None:  # a Slurm login node: Slurm places the job, not the host's slots
        return on_slurm
    return AgentLauncher(slots)


class ForegroundLauncher:
    """Runs the tasks in order on this machine, each in its own process group with its log
    teed to a file; stops at the first failure. Inputs are checked just before each task,
    since an earlier task may write them."""

    def __init__(self, plan: JobPlan, log: Log, grace: float = 10.0):
        self.plan, self.log, self.grace = plan, log, grace

    def launch(self, target: Target, job_id: str, name: str | None, spec: LaunchSpec) -> dict:
        for folder in spec.mkdirs:
            os.makedirs(folder, exist_ok=True)
        for task in spec.tasks:
            planned = self.plan.task(task.name)
            check_inputs(self.plan.cube, planned.name, planned.params)
            code = self._run(target, spec, task, planned)
            if code != 0:
                return {"state": "failed", "task": task.name, "exit_code": code}
            self.log(f"task {task.name} finished")
        return {"state": "succeeded", "exit_code": 0}

    def _run(self, target: Target, spec: LaunchSpec, task: TaskLaunch, planned: TaskPlan) -> int:
        log_file = task_log_path(self.plan.cube, planned.params, task.name)
        where = f"in container {task.container} " if task.container else ""
        self.log(f"running {task.name} {where}(log {log_file})")
        try:
            return run_process(task.argv, cwd=task.cwd, log_file=log_file,
                               env=task_environment(task), grace=self.grace)
        finally:
            if task.container and spec.engine:
                stop_leftover_container(target, spec.engine, task.container, self.grace)


def task_environment(task: TaskLaunch) -> dict[str, str]:
    """This process's environment, the task's own on top, its PATH entries first."""
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env.update(task.env)
    if task.path_prepend:
        env["PATH"] = os.pathsep.join([*task.path_prepend, env.get("PATH", "")])
    return env


def stop_leftover_container(target: Target, engine: str, name: str, grace: float) -> None:
    """A container still running after its CLI ended (the CLI was killed) is stopped; one that
    was created but never started (no GPU driver, say) is not removed by --rm, so remove it."""
    running = target.sh(shlex.join([engine, "ps", "-q", "--filter", f"name=^/?{name}$"]))
    if running.stdout.strip():
        target.sh(shlex.join([engine, "stop", "-t", str(int(grace)), name]), timeout=grace + 60)
    target.sh(shlex.join([engine, "rm", "-f", name]) + " >/dev/null 2>&1")


def check_job_inputs(plan: JobPlan) -> None:
    """Before anything is provisioned: every input that no earlier task of the job writes
    must exist now (those an earlier task writes are checked again just before their task)."""
    written: set[str] = set()
    for task in plan.tasks:
        ready = [p for p in task.params if p.io != "input" or str(p.path) not in written]
        check_inputs(plan.cube, task.name, ready)
        written.update(str(p.path) for p in task.outputs)


def failure_hint(plan: JobPlan, failed: str, code: int) -> str:
    """What `cube run` says under a failed task: its log, the signal, the tasks not run."""
    names = plan.task_names
    rest = names[names.index(failed) + 1:]
    skipped = f" Not run: {', '.join(rest)}." if rest else ""
    stopped = ""
    if code > 128:
        try:
            stopped = f" It was stopped by {signal.Signals(code - 128).name}."
        except ValueError:
            pass
    return f"See the task's output above and its log file.{stopped}{skipped}"
