"""The runtime seam: how a job's tasks run on a target.

Every runtime (python, docker, podman) implements one method:

    prepare(plan, target, layout, facts, log) -> LaunchSpec

It makes the target ready (a venv built, an image present) idempotently, and returns a typed
launch spec: each task's argv, cwd and environment as the target will run them. Where the
prepared job then starts is a launcher's business (controller.launchers): the same spec runs in
the foreground for `cube run` and under the host's agent for `cube remote run`.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from controller.plan import JobLayout, JobPlan
from controller.target import Target

Log = Callable[[str], None]


@dataclass
class TaskLaunch:
    name: str
    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)   # on top of the target's environment
    path_prepend: list[str] = field(default_factory=list)  # folders put first on PATH
    container: str | None = None                        # stopped by name on cancel


@dataclass
class LaunchSpec:
    runtime: str
    tasks: list[TaskLaunch]
    env_key: str = ""                # what the environment is: env hash, or image id
    mkdirs: list[str] = field(default_factory=list)      # folders made before the first task
    engine: str | None = None        # container CLI (docker, podman) for stopping containers

    @property
    def container(self) -> str | None:
        names = {t.container for t in self.tasks if t.container}
        return names.pop() if len(names) == 1 else None

    def agent_spec(self, job_id: str, name: str | None) -> dict:
        """The agent's `launch` input (docs/INTERNALS.md, "Job spec")."""
        return {"job_id": job_id, "name": name, "env": {}, "mkdirs": self.mkdirs,
                "tasks": [{"name": t.name, "argv": t.argv, "cwd": t.cwd, "env": t.env,
                           "path_prepend": t.path_prepend} for t in self.tasks],
                "docker_container": self.container, "container_engine": self.engine}


class HostFacts(Protocol):
    """What a runtime needs to know about the target. Hosts answer from the agent's probe;
    this machine lazily, so a warm `cube run` does not pay for a full probe."""

    @property
    def pythons(self) -> Iterable: ...      # {path, version} dicts or Interpreters, best first

    @property
    def uid_gid(self) -> tuple[int, int]: ...

    @property
    def gpus(self) -> list[int]: ...

    def engine(self, name: str) -> dict: ...  # {cli, reachable, server_version, error, hint}


@dataclass
class ProbedFacts:
    """A host's facts from its agent's `probe` answer."""

    probe: dict

    @property
    def pythons(self) -> Iterable:
        return self.probe.get("python") or []

    @property
    def uid_gid(self) -> tuple[int, int]:
        return int(self.probe["uid"]), int(self.probe["gid"])

    @property
    def gpus(self) -> list[int]:
        return [int(g["index"]) for g in self.probe.get("gpus") or []
                if g.get("index") is not None]

    def engine(self, name: str) -> dict:
        return self.probe.get(name) or {}


class LocalFacts:
    """This machine, asked only for what a runtime uses (each answer computed once)."""

    @property
    def pythons(self) -> Iterable:
        # Imported here: the python runtime imports this module (a cycle at the top).
        from controller.runtimes.python import local_interpreters  # noqa: PLC0415

        return local_interpreters()

    @property
    def uid_gid(self) -> tuple[int, int]:
        return os.getuid(), os.getgid()

    @functools.cached_property
    def gpus(self) -> list[int]:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [int(x) for x in out.stdout.split() if x.isdigit()] if out.returncode == 0 else []

    def engine(self, name: str) -> dict:
        return {}   # a local engine is checked by the runtime itself, with a clear error


class Runtime(Protocol):
    name: str

    def prepare(self, plan: JobPlan, target: Target, layout: JobLayout, facts: HostFacts,
                log: Log, *, dry_run: bool = False) -> LaunchSpec: ...
