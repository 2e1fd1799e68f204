"""A host as a Target: one SSH connection (controller.ssh) and the agent client on top of it
(controller.agent_client), reused for every step of a run.

`connect(name)` returns a HostTarget: `sh` (through the agent session: no login shell per
command), `run` (an argv on its own SSH channel), `put` (SFTP), `open_stream` (a tuned bulk
channel), `agent`/`agent_argv`/`agent_stream`. `sh` and `run` time out alike: exit code 124
with the partial output (`run(check=True)` raises CubeError on any non-zero code).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

import paramiko

from controller import streams
from controller.agent_client import AgentClient
from controller.errors import CubeError
from controller.hosts import HostSpec, resolve_host
from controller.ssh import ConnectionLost, SSHConnection, connect_ssh, openssh_shell_argv, store_host_key
from controller.standby import RefillOnClose, Standby
from controller.target import ExecResult

__all__ = ["ConnectionLost", "HostTarget", "connect", "openssh_shell_argv", "store_host_key"]



def connect(spec: HostSpec | str, *, accept_new_host_key: bool = False,
            connect_timeout: float = 10, retries: int = 8) -> HostTarget:
    """Open the connection a run reuses for every step (see controller.ssh for the budget)."""
    if isinstance(spec, str):
        spec = resolve_host(spec)
    return HostTarget(connect_ssh(spec, accept_new_host_key=accept_new_host_key,
                                  connect_timeout=connect_timeout, retries=retries))


class HostTarget:
    """controller.target.Target for an SSH host."""

    def __init__(self, ssh: SSHConnection):
        self.ssh = ssh
        self.agent_client = AgentClient(ssh, ssh.spec.root)
        self.standby = Standby(lambda: shlex.join(self.agent_argv("standby")),
                               self.ssh.openssh_stream)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<HostTarget {self.spec.name} {self.spec.address}>"

    @property
    def spec(self) -> HostSpec:
        return self.ssh.spec

    @property
    def name(self) -> str:
        return f"host '{self.spec.name}'"

    @property
    def root(self) -> str:
        return self.agent_client.root

    @property
    def client(self) -> paramiko.SSHClient | None:
        """The paramiko client (for code that still opens its own channels)."""
        return self.ssh.client

    # -- lifecycle ------------------------------------------------------------------------------

    def reconnect(self, connect_timeout: float | None = None) -> None:
        self.standby.reopen()
        self.agent_client.close()
        self.ssh.reconnect(connect_timeout)

    def is_alive(self, probe_timeout: float | None = None) -> bool:
        return self.ssh.is_alive(probe_timeout)

    def close(self) -> None:
        self.standby.close()
        self.agent_client.close()
        self.ssh.close()

    # -- the Target protocol --------------------------------------------------------------------

    def sh(self, command: str, *, timeout: float | None = None) -> ExecResult:
        """bash -c COMMAND, run by the agent session's process (the login environment is
        already there); a timeout is exit code 124, as for `run`."""
        args = [command] + (["--timeout", str(timeout)] if timeout else [])
        answer = self.agent("sh", *args, timeout=timeout + 30 if timeout else None)
        return ExecResult(answer["code"], answer["stdout"], answer["stderr"],
                          timed_out=bool(answer.get("timed_out")))

    def run(self, argv: Sequence[str], *, input: bytes | None = None,
            timeout: float | None = None, check: bool = True) -> ExecResult:
        """Run argv (quoted with shlex.join) on its own channel."""
        command = shlex.join(argv)
        result = self.ssh.exec(command, input=input, timeout=timeout)
        if check and result.code != 0:
            raise _failed(command, self.name, result, timeout)
        return result

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        self.ssh.put(data, path, mode=mode)

    def open_stream(self, argv: Sequence[str]) -> streams.Stream:
        return self.ssh.open_stream(shlex.join(argv))

    def agent(self, verb: str, *args: str, input: bytes | None = None,
              timeout: float | None = None) -> dict:
        return self.agent_client.agent(verb, *args, input=input, timeout=timeout)

    def agent_argv(self, verb: str, *args: str) -> list[str]:
        return self.agent_client.agent_argv(verb, *args)

    def agent_stream(self, verb: str, *args: str, size: int | None = None) -> streams.Stream:
        """A byte stream to one agent verb; a small one (`size` known and <= 8 MiB) rides
        inside the agent session instead of costing a new SSH command."""
        if size is not None and size <= streams.SESSION_STREAM_MAX:
            return streams.SessionStream(self.agent_client.exchange, [verb, *args])
        stream = self.standby.take(verb, args) or self.open_stream(self.agent_argv(verb, *args))
        return RefillOnClose(stream, self.standby)   # the next one starts warm (controller.standby)

    # -- the agent's presence (tests and benchmarks) ---------------------------------------------

    def ensure_agent(self) -> str:
        return self.agent_client.ensure()

    @property
    def agent_uploaded(self) -> bool:
        return self.agent_client.uploaded


def _failed(command: str, where: str, result: ExecResult, timeout: float | None) -> CubeError:
    if result.timed_out:
        return CubeError(f"Command `{command}` on {where} did not finish within {timeout:g} s.",
                         "Raise the timeout or check the host.")
    tail = "\n".join(result.stderr.strip().splitlines()[-5:])
    return CubeError(f"Command `{command}` on {where} exited with code {result.code}."
                     + (f" stderr: {tail}" if tail else ""),
                     "See the command's error output above.")


# Kept for callers of the old name: a host target is what `connect` returns.
HostConnection = HostTarget
