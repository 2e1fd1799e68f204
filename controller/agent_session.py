"""One long-lived agent process per connection (`AGENT.pyz serve`), spoken to in JSON lines.

Every SSH command pays for a login shell and a Python start on the host: 0.5 s here, where the
user's ~/.bashrc runs `pyenv init`. A remote run makes a dozen small requests (probe, manifests,
playbook checks, launch, log polls, status), so they share one channel instead. Bulk byte
streams (sync) keep channels of their own.
"""

from __future__ import annotations

import json
import shlex
import threading

import paramiko

from controller.errors import CubeError

AGENT_MISSING = 97  # exit code of START_SCRIPT when this agent version is not on the host yet

# Expands a leading ~ of the root on the host, then starts the agent if this version is there:
# `sh -c START_SCRIPT sh ROOT DIGEST` runs `python3 ROOT/agent/DIGEST.pyz --root ROOT serve`.
START_SCRIPT = ('r="$1"; case "$r" in "~"|"~/"*) r="$HOME${r#?}";; esac; '
                'a="$r/agent/$2.pyz"; [ -f "$a" ] || exit 97; '
                'exec python3 "$a" --root "$r" serve')


class AgentMissing(Exception):
    """This agent version has not been uploaded to the host yet."""


class AgentSession:
    def __init__(self, channel: paramiko.Channel, host: str, timeout: float):
        self.host = host
        self._channel = channel
        self._reader = channel.makefile("rb")
        self._lock = threading.Lock()
        self._timeout = timeout
        self.greeting = self._read_greeting()

    @classmethod
    def start(cls, channel: paramiko.Channel, host: str, root: str, digest: str,
              timeout: float) -> AgentSession:
        """Start the agent of `digest` on a fresh channel; AgentMissing when it is absent."""
        channel.exec_command(shlex.join(["sh", "-c", START_SCRIPT, "sh", root, digest]))
        return cls(channel, host, timeout)

    def _read_greeting(self) -> dict:
        self._channel.settimeout(self._timeout)
        line = self._reader.readline()
        if not line:
            code = self._channel.recv_exit_status()
            stderr = self._channel.makefile_stderr("rb").read().decode(errors="replace")
            self.close()
            if code == AGENT_MISSING:
                raise AgentMissing()
            raise CubeError(f"The cube agent on host '{self.host}' did not start (exit {code}): "
                            f"{stderr.strip()[-500:]}", "Check that python3 >= 3.8 is installed "
                            "on the host.")
        try:
            return json.loads(line)
        except ValueError:
            self.close()
            raise CubeError(f"The cube agent on host '{self.host}' did not start: {line[:200]!r}",
                            "Check the host's python3 (>= 3.8).") from None

    def request(self, verb: str, args: list[str], input: bytes | None,
                timeout: float | None) -> dict:
        """The verb's answer; an agent error becomes a CubeError."""
        answer = self.exchange({"verb": verb, "args": [str(a) for a in args],
                                "input": input.decode() if input is not None else None},
                               timeout)
        if not answer.get("ok"):
            raise CubeError(f"host '{self.host}': {answer.get('error')}", answer.get("hint"))
        return answer["result"]

    def exchange(self, message: dict, timeout: float | None) -> dict:
        """Send one request, return the agent's whole answer ({"ok": ...})."""
        verb = message.get("verb")
        with self._lock:
            self._channel.settimeout(timeout)
            try:
                self._channel.sendall((json.dumps(message) + "\n").encode())
                line = self._reader.readline()
            except (TimeoutError, OSError, EOFError, paramiko.SSHException) as err:
                self.close()
                raise SessionLost(f"{type(err).__name__}: {err}") from None
        if not line:
            self.close()
            raise SessionLost("the agent session ended")
        try:
            answer = json.loads(line)
        except ValueError:
            self.close()
            raise CubeError(f"The cube agent on host '{self.host}' gave no JSON answer to "
                            f"'{verb}': {line[:200]!r}", "Check the host's python3 (>= 3.8).") \
                from None
        return answer

    @property
    def alive(self) -> bool:
        return not self._channel.closed

    def close(self) -> None:
        try:
            self._channel.close()
        except Exception:  # closing a dead channel may raise; it is gone either way
            pass


class SessionLost(ConnectionError):
    """The channel to the agent died (dropped link, killed sshd session, dead host)."""
