"""Bulk byte streams through OpenSSH's client, beside cube's paramiko connection.

paramiko encrypts every packet in Python; OpenSSH's client does it in C, in its own process, so
the controller's Python only reads, hashes and writes to a pipe while another core encrypts
(measured: 1 GiB to `cat > /dev/null` in 3.5-4.4 s against paramiko's 4.5-6.4 s on the loaded
2-core machine). One OpenSSH master per connection carries every stream of that connection
(ControlMaster over a socket in a private 0700 folder): a stream then costs a local fork, not
a handshake.

Host keys, exactly as strict as paramiko's connection: the master accepts ONLY the key that
paramiko verified for this very connection against cube's known_hosts (written to a private
pinned file under a fixed alias, StrictHostKeyChecking=yes, no global file, no key updates).
A host that shows OpenSSH any other key is refused with the same "CHANGED" error and is never
used; there is no fallback around a key mismatch. Other failures to start the master (no `ssh`
binary, a ProxyJump host, CUBE_BULK=paramiko) leave bulk streams on paramiko's channel.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time

import paramiko

from agent.landing import widen_pipe
from controller.errors import CubeError
from controller.hosts import HostSpec
from controller.streams import ProcessStream

log = logging.getLogger("cube.transport")

ALIAS = "cube-pinned-host"
# AES-GCM first: with AES-NI it costs a fraction of chacha20-poly1305 (OpenSSH's default).
CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
           "aes128-ctr,aes192-ctr,aes256-ctr")
KEY_ALGORITHMS = {"ssh-rsa": "rsa-sha2-512,rsa-sha2-256,ssh-rsa"}
KEY_REFUSED = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED",
               "Host key for", "No matching host key")


def usable(spec: HostSpec) -> bool:
    """Whether bulk streams to this host may go through OpenSSH."""
    return (os.environ.get("CUBE_BULK", "openssh") != "paramiko" and not spec.proxy_jump
            and shutil.which("ssh") is not None)


class OpenSSHBulk:
    """An OpenSSH master pinned to `host_key`; `open_stream(command)` runs one command over it."""

    def __init__(self, spec: HostSpec, host_key: paramiko.PKey, connect_timeout: float):
        self.spec, self.key, self.timeout = spec, host_key, connect_timeout
        self.dir = tempfile.mkdtemp(prefix="cube-ssh-")   # 0700: socket and pinned key
        self.socket = os.path.join(self.dir, "master")
        self.master: subprocess.Popen | None = None
        with open(os.path.join(self.dir, "known_hosts"), "w") as f:
            f.write(f"{ALIAS} {host_key.get_name()} {host_key.get_base64()}\n")

    def argv(self, *extra: str, command: str) -> list[str]:
        """ssh options every connection of this host uses: the pinned key, no prompts."""
        spec, name = self.spec, self.key.get_name()
        argv = ["ssh", "-T", "-p", str(spec.port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlias={ALIAS}",
                "-o", f"UserKnownHostsFile={os.path.join(self.dir, 'known_hosts')}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no",
                "-o", "CheckHostIP=no", "-o", f"HostKeyAlgorithms={KEY_ALGORITHMS.get(name, name)}",
                "-o", f"Ciphers={CIPHERS}", "-o", "Compression=no",
                "-o", f"ConnectTimeout={max(1, int(self.timeout))}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=4",
                "-o", f"ControlPath={self.socket}", "-o", "LogLevel=ERROR"]
        if spec.identity_files:
            argv += ["-o", "IdentitiesOnly=yes"]
            for identity in spec.identity_files:
                argv += ["-i", str(identity)]
        if spec.user:
            argv += ["-l", spec.user]
        return [*argv, *extra, "--", spec.hostname, command]

    def start(self) -> bool:
        """Start the master; False when OpenSSH cannot be used (then paramiko carries the
        bytes). A key other than the pinned one is a CubeError."""
        # The master's own session reads our pipe: if this process dies, the pipe closes, the
        # session ends and the master exits once its streams have (no orphaned connection).
        self.master = subprocess.Popen(
            self.argv("-M", "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
                      command="cat > /dev/null"),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.timeout + 5
        while time.monotonic() < deadline:
            if os.path.exists(self.socket):
                return True
            if self.master.poll() is not None:
                return self._failed(self.master.stderr.read().decode(errors="replace")
                                    if self.master.stderr else "")
            time.sleep(0.01)
        return self._failed("timed out")

    def _failed(self, why: str) -> bool:
        self.close()
        if any(marker in why for marker in KEY_REFUSED):
            raise CubeError(
                f"The host key of host '{self.spec.name}' ({self.spec.address}) has CHANGED since "
                "this connection verified it, or OpenSSH was shown another key. Someone may be "
                f"intercepting the connection. OpenSSH said: {why.strip()[-300:]}",
                "Check the host; if it was reinstalled, delete its old line from cube's "
                "known_hosts and connect again with --accept-new-host-key.")
        log.debug("OpenSSH bulk streams unavailable for %s (%s); using paramiko",
                  self.spec.name, why.strip()[-300:])
        return False

    def open_stream(self, command: str) -> ProcessStream:
        """Run a (quoted) command over the master; its stdin/stdout carry the bytes."""
        stream = ProcessStream(self.argv("-o", "ControlMaster=no", command=command))
        for pipe in (stream.proc.stdin, stream.proc.stdout):
            if pipe is not None:
                widen_pipe(pipe.fileno())
        return stream

    def close(self) -> None:
        if self.master is not None and self.master.stdin is not None:
            self.master.stdin.close()
        if self.master is not None and self.master.poll() is None:
            self.master.terminate()
            try:
                self.master.wait(5)
            except subprocess.TimeoutExpired:
                self.master.kill()
                self.master.wait()
        self.master = None
        shutil.rmtree(self.dir, ignore_errors=True)
