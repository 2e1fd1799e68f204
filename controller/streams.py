"""Bulk byte streams to a command: the `Stream` interface, over a local process or inside the
agent's session. Its SSH-channel form is controller.channels (kept apart so that a local
`cube run` never imports paramiko).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import tempfile
from collections.abc import Callable
from typing import Protocol

CHUNK = 1 << 20
# Up to this size a stream to a host's agent verb rides inside the agent session (base64 in one
# request) instead of a new SSH command, which costs a login shell and a Python start on the
# host (0.2-0.5 s).
SESSION_STREAM_MAX = 8 << 20


class Stream(Protocol):
    def write(self, data: bytes) -> int: ...
    def close_stdin(self) -> None: ...
    def read(self, n: int = -1) -> bytes: ...
    def wait(self) -> int: ...
    def stderr_text(self) -> str: ...
    def close(self) -> None: ...


class ProcessStream:
    """The same interface over a local process (the local side of a sync, and tests)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None  # PIPEs above
        self._stdin, self._stdout = self.proc.stdin, self.proc.stdout

    def write(self, data) -> int:
        self._stdin.write(data)
        return len(data)

    def close_stdin(self) -> None:
        self._stdin.close()

    def read(self, n: int = -1) -> bytes:
        return self._stdout.read(n)

    def wait(self) -> int:
        return self.proc.wait()

    def stderr_text(self) -> str:
        self.proc.wait()
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f and not f.closed:
                try:
                    f.close()
                except BrokenPipeError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._err.close()


class SessionStream:
    """The same interface, carried inside the agent session: what is written becomes one
    request's stdin when stdin closes, and the answer is what reads return: a `send` verb's tar,
    or the JSON answer line that the verb would print on its own. For small transfers only:
    both ends are held in memory. `exchange(message) -> answer` is the session's
    (controller.agent_client.AgentClient.exchange)."""

    def __init__(self, exchange: Callable[[dict], dict], verb_args: list[str]):
        self._exchange, self._verb_args = exchange, [str(a) for a in verb_args]
        self._in, self._out = io.BytesIO(), io.BytesIO()
        self._err, self._code = "", None   # type: str, int | None

    def write(self, data) -> int:
        return self._in.write(data)

    def close_stdin(self) -> None:
        verb, *args = self._verb_args
        capture = verb == "send"
        answer = self._exchange({
            "verb": verb, "args": args, "capture": capture,
            "input_b64": base64.b64encode(self._in.getvalue()).decode("ascii")})
        if not answer.get("ok"):
            self._err, self._code = json.dumps(answer), 1
            return
        body = base64.b64decode(answer["result"]["stdout_b64"]) if capture \
            else json.dumps(answer).encode()
        self._out, self._code = io.BytesIO(body), 0

    def read(self, n: int = -1) -> bytes:
        return self._out.read(n)

    def wait(self) -> int:
        if self._code is None:
            self.close_stdin()
        return self._code or 0

    def stderr_text(self) -> str:
        return self._err

    def close(self) -> None:
        self._in.close()
