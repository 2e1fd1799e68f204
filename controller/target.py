"""Where commands run and files land: this machine or an SSH host, behind one protocol.

pyinfra's connectors share one interface so that operations never ask which kind of host they
talk to; cube's runtimes, provisioning and sync do the same with `Target`. `HostTarget`
(controller.transport) and `LocalTarget` (here) implement it; so does the tests' local stand-in
for sync.

A target runs shell commands (`sh`, bash -c), runs an argv (`run`, quoted for the remote
shell), writes a file atomically (`put`), opens a byte stream to a command (`open_stream`, for
`docker save | docker load`), and talks to the cube agent that lives under its cube root
(`agent`, `agent_argv`, and `agent_stream` for sync). `sh` and `run` time out alike: exit code
124 with the output written so far (`timed_out` set); `run(check=True)` raises CubeError on any
non-zero code.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from controller import agent_bundle, paths
from controller.errors import CubeError
from controller.streams import ProcessStream, Stream


@dataclass
class ExecResult:
    code: int
    stdout: str
    stderr: str
    timed_out: bool = False   # the timeout passed: code 124, the output written until then

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

    def agent_stream(self, verb: str, *args: str, size: int | None = None) -> Stream:
        """A byte stream to one agent verb (sync's `receive` and `send`); `size`, when known,
        lets a small one ride inside the agent session."""
        ...


class LocalTarget:
    """This machine as a Target: root = CUBE_HOME (or `root`), commands via subprocess, the
    agent by running the same zipapp hosts run (cached under CUBE_HOME/agent/)."""

    name = "this machine"

    def __init__(self, root: str | Path | None = None, *, shell: str | None = None):
        self._root = str(root) if root is not None else None
        # bash where there is one, else /bin/sh (why the built-in playbooks stick to POSIX sh)
        self.shell = shell or shutil.which("bash") or "/bin/sh"

    def __repr__(self):
        return f"<LocalTarget {self.root}>"

    @property
    def root(self) -> str:
        return os.path.abspath(self._root or str(paths.cube_home()))

    def sh(self, command: str, *, timeout: float | None = None) -> ExecResult:
        return self._subprocess([self.shell, "-c", command], None, timeout)

    def run(self, argv: Sequence[str], *, input: bytes | None = None,
            timeout: float | None = None, check: bool = True) -> ExecResult:
        result = self._subprocess(list(argv), input, timeout)
        if check and result.code != 0:
            what = "did not finish within %s s" % timeout if result.timed_out \
                else "exited with code %d" % result.code
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise CubeError(f"Command `{shlex.join(argv)}` on {self.name} {what}."
                            + (f" stderr: {tail}" if tail else ""),
                            "See the command's error output above.")
        return result

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.write_bytes(data)
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise CubeError(f"Cannot write {path}: {err}", "Check permissions and free disk.") \
                from None

    def open_stream(self, argv: Sequence[str]) -> Stream:
        return ProcessStream(list(argv))

    def agent(self, verb: str, *args: str, input: bytes | None = None,
              timeout: float | None = None) -> dict:
        try:
            proc = subprocess.run(self.agent_argv(verb, *args), input=input or b"",
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CubeError(f"The cube agent on {self.name} did not answer '{verb}' within "
                            f"{timeout} s.", "Raise the timeout.") from None
        return agent_result(proc.stdout, proc.stderr, self.name, verb)

    def agent_argv(self, verb: str, *args: str) -> list[str]:
        pyz = agent_bundle.cached_file(paths.local_agent_dir())
        return [sys.executable, str(pyz), "--root", self.root, verb, *map(str, args)]

    def agent_stream(self, verb: str, *args: str, size: int | None = None) -> Stream:
        return self.open_stream(self.agent_argv(verb, *args))

    def _subprocess(self, argv: list[str], input: bytes | None,
                    timeout: float | None) -> ExecResult:
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            return ExecResult(124, _text(err.stdout), _text(err.stderr)
                              + f"\ntimed out after {timeout:g} s", timed_out=True)
        return ExecResult(proc.returncode, _text(proc.stdout), _text(proc.stderr))


def agent_result(stdout: bytes, stderr: bytes, where: str, verb: str) -> dict:
    """The result of an agent's answer line ({"ok", "result" | "error", "hint"}); an error
    answer, or no answer at all, is a CubeError."""
    lines = stdout.decode(errors="replace").strip().splitlines() \
        or stderr.decode(errors="replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise CubeError(f"The cube agent on {where} gave no answer to '{verb}': "
                        f"{stderr.decode(errors='replace')[-500:]}",
                        "Check its Python (>= 3.8).") from None
    if not answer.get("ok"):
        raise CubeError(f"{where}: {answer.get('error')}", answer.get("hint"))
    return answer["result"]


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
