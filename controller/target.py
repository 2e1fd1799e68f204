"""Where commands run and files land: this machine or an SSH host, behind one protocol.

pyinfra's connectors share one interface so that operations never ask which kind of host they
talk to; cube's runtimes, provisioning and sync do the same with `Target`. `HostTarget`
(controller.transport) and `LocalTarget` (here) implement it; so does the tests' local stand-in
for sync.

A target runs shell commands (`sh`, bash -c, timeout -> exit 124), runs an argv (`run`, quoted
for the remote shell), writes a file atomically (`put`), opens a byte stream to a command
(`open_stream`, for sync and `docker save | docker load`), and talks to the cube agent that
lives under its cube root (`agent`, `agent_argv`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from controller.streams import Stream


@dataclass
class ExecResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        if self.stdout and self.stderr:
            return self.stdout + ("" if self.stdout.endswith("\n") else "\n") + self.stderr
        return self.stdout or self.stderr


class Executor(Protocol):
    """The one thing provisioning needs: run a shell command line."""

    def sh(self, command: str, *, timeout: float | None = None) -> ExecResult: ...


@runtime_checkable
class Target(Executor, Protocol):
    @property
    def name(self) -> str:
        """How messages name it: "this machine" or "host 'gpu01'"."""
        ...

    @property
    def root(self) -> str:
        """The cube root on the target, absolute (`~` expanded there)."""
        ...

    def run(self, argv: Sequence[str], *, input: bytes | None = None,
            timeout: float | None = None, check: bool = True) -> ExecResult: ...

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        """Write `data` to `path` on the target: temp name, then rename."""
        ...

    def open_stream(self, argv: Sequence[str]) -> Stream:
        """A command whose stdin and stdout carry bulk bytes."""
        ...

    def agent(self, verb: str, *args: str, input: bytes | None = None,
              timeout: float | None = None) -> dict:
        """One agent verb's `result`; an agent error is a CubeError."""
        ...

    def agent_argv(self, verb: str, *args: str) -> list[str]:
        """The argv that runs one agent verb on the target (for bulk streams)."""
        ...
