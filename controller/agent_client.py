"""The controller's side of a host's cube agent: make sure the zipapp is there, keep one
long-lived session to it, and call its verbs.

The agent lives at ROOT/agent/<digest>.pyz, where <digest> is the content hash of the archive
controller.agent_bundle builds. It is uploaded only when absent (the session's start script
says so by exiting 97), so a version is uploaded once per host and never overwritten.
"""

from __future__ import annotations

import logging
import shlex

from controller import agent_bundle
from controller.agent_session import AgentMissing, AgentSession, SessionLost
from controller.errors import CubeError
from controller.ssh import ConnectionLost, SSHConnection

log = logging.getLogger("cube.transport")


class AgentClient:
    def __init__(self, ssh: SSHConnection, spec_root: str):
        self.ssh = ssh
        self.spec_root = spec_root     # as configured: may start with ~ (expanded on the host)
        self.uploaded = False          # whether the last ensure() had to upload
        self._root: str | None = None
        self._session: AgentSession | None = None

    @property
    def host(self) -> str:
        return self.ssh.spec.name

    @property
    def root(self) -> str:
        """The cube root on the host, with `~` expanded there (asked once)."""
        if self._root is None:
            root = self.spec_root
            if root == "~" or root.startswith("~/"):
                home = self.ssh.exec(shlex.join(["sh", "-c", 'printf %s "$HOME"']), timeout=30)
                if home.code != 0:
                    raise CubeError(f"Cannot read $HOME on host '{self.host}': "
                                    f"{home.stderr.strip()}", "Check the host's login shell.")
                root = home.stdout + root[1:]
            self._root = root.rstrip("/") or "/"
        return self._root

    @property
    def path(self) -> str:
        """Where this controller's agent lives on the host."""
        return f"{self.root}/agent/{agent_bundle.bundle().filename}"

    def ensure(self) -> str:
        """Upload the zipapp to ROOT/agent/<digest>.pyz unless it is already there; its path."""
        path, folder = self.path, f"{self.root}/agent"
        # One round trip: exists -> 0; else create the folder and answer 1.
        script = 'test -f "$1" || { mkdir -p "$2" && exit 1; }'
        probe = self.ssh.exec(shlex.join(["sh", "-c", script, "sh", path, folder]), timeout=60)
        self.uploaded = probe.code != 0
        if self.uploaded:
            if probe.code != 1:
                raise CubeError(f"Cannot create {folder} on host '{self.host}': "
                                f"{probe.stderr.strip()}", "Check the host's cube root setting.")
            self.ssh.put(agent_bundle.bundle().data, path)
            log.debug("uploaded agent to %s:%s", self.host, path)
        return path

    def session(self) -> AgentSession:
        """The connection's agent process; started (and the agent uploaded) on first use."""
        if self._session is not None and self._session.alive:
            return self._session
        digest, timeout = agent_bundle.bundle().digest, self.ssh.connect_timeout
        try:
            session = AgentSession.start(self.ssh.open_channel(), self.host, self.spec_root,
                                         digest, timeout)
        except AgentMissing:
            self.ensure()
            session = AgentSession.start(self.ssh.open_channel(), self.host, self.spec_root,
                                         digest, timeout)
        self._root = session.greeting["root"]
        self._session = session
        return session

    def agent(self, verb: str, *args: str, input: bytes | None = None,
              timeout: float | None = None) -> dict:
        """Run a verb in the session: its result; an agent error is a CubeError, a dead channel
        ConnectionLost."""
        return self._in_session(verb, lambda s: s.request(verb, list(args), input, timeout))

    def exchange(self, message: dict, timeout: float | None = None) -> dict:
        """One raw session request ({"verb", "args", ...}); the whole answer, errors included."""
        return self._in_session(message.get("verb"), lambda s: s.exchange(message, timeout))

    def agent_argv(self, verb: str, *args: str) -> list[str]:
        """The argv that runs one verb in a process of its own (bulk streams); the agent is
        made present first. It runs under the interpreter the session found (an absolute path:
        `python3` may be a shim, e.g. pyenv's, that costs a shell and 0.06 s per start) with
        -S: the agent imports only the standard library, and site-packages' .pth files cost
        another 0.05 s per start. Both matter on every push and pull."""
        python = self.session().greeting.get("python") or "python3"
        return [python, "-S", self.path, "--root", self.root, verb, *map(str, args)]

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session = None

    def _in_session(self, verb, call):
        try:
            return call(self.session())
        except SessionLost as err:
            raise ConnectionLost(f"Lost the connection to host '{self.host}' during "
                                 f"'{verb}' ({err}).", "Reconnect and retry.") from None
