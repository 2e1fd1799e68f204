"""Runtimes: how a job's tasks run on a target (this machine or a host).

One registry serves `cube run` and `cube remote run`. Each entry names a class implementing
controller.runtimes.base.Runtime (`prepare(plan, target, layout, facts, log) -> LaunchSpec`).
Entries are "module:Class" strings imported on first use, so one runtime's imports stay out of
every other command's start-up time.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from controller.errors import CubeError

if TYPE_CHECKING:  # the registry stays import-free: the cube model reads its names
    from controller.runtimes.base import Runtime

RUNTIMES: dict[str, str] = {
    "python": "controller.runtimes.python:PythonRuntime",
    "docker": "controller.runtimes.docker:DockerRuntime",
    "podman": "controller.runtimes.podman:PodmanRuntime",
}


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise CubeError(f"Unknown runtime '{name}'.", f"Valid runtimes: {', '.join(RUNTIMES)}.")
    module, _, cls = RUNTIMES[name].partition(":")
    return getattr(import_module(module), cls)()
