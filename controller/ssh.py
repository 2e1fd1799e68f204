"""One SSH connection per host (paramiko): connect, reconnect, run a command, put a file, open a
bulk byte stream. It knows nothing of cube's agent (controller.agent_client speaks to that).

Host keys are checked against $CUBE_HOME/known_hosts (first) and ~/.ssh/known_hosts. An unknown
key is an error unless `accept_new_host_key` (then it is stored, like OpenSSH's accept-new); a
changed key is always an error. Network errors are retried with exponential backoff until the
connect budget is spent; auth and host-key errors are never retried.

Time budget of `connect_ssh`: attempts stop once `connect_timeout` seconds have passed since the
first one began, and each attempt's TCP/banner/auth timeouts are capped by what is left of it
(at least 1 s), so an unreachable host fails with HostUnreachable after roughly
`connect_timeout` (+ at most one last backoff wait of <= 2 s) — or sooner after `retries`
attempts.

Timeouts of commands follow ONE rule, the same as LocalTarget's: a command still running when
its timeout passes is abandoned and answers exit code 124 with the output it had written so far
(and `timed_out` set). A dead connection is ConnectionLost, never a timeout.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import socket
import threading
import time
from pathlib import Path

import paramiko
import tenacity

from controller import channels, paths, ssh_bulk, streams
from controller.errors import CubeError, HostUnreachable
from controller.hosts import HostSpec, atomic_write, file_lock, resolve_host
from controller.target import ExecResult

log = logging.getLogger("cube.transport")
# paramiko logs each failed attempt's traceback from its own thread; without a handler Python
# would print them to stderr between our retries. --debug (root handlers) still shows them.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

KEEPALIVE_S = 5          # SSH-level keepalive so idle connections carry traffic...
TCP_USER_TIMEOUT_MS = 20_000  # ...and unacked traffic on a cut link errors out within ~20 s


class ConnectionLost(HostUnreachable):
    """The connection dropped mid-command; `reconnect()` and retry."""


class _UnknownHostKey(Exception):
    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(hostname)
        self.hostname, self.key = hostname, key


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown key: store it when accepting new keys, else refuse (reported by `connect`)."""

    def __init__(self, accept_new: bool):
        self.accept_new = accept_new

    def missing_host_key(self, client, hostname, key):
        if not self.accept_new:
            raise _UnknownHostKey(hostname, key)
        store_host_key(hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)


def store_host_key(hostname: str, key: paramiko.PKey) -> None:
    """Append `hostname keytype base64` to $CUBE_HOME/known_hosts (atomic, locked)."""
    path = paths.known_hosts_file()
    with file_lock(path):
        text = path.read_text() if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        atomic_write(path, text + f"{hostname} {key.get_name()} {key.get_base64()}\n", 0o600)


def _fingerprint(key: paramiko.PKey) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


# ---- connecting -------------------------------------------------------------------------------

def _open_socket(spec: HostSpec, timeout: float, via: SSHConnection | None):
    if via is not None:
        try:
            return via.transport().open_channel(
                "direct-tcpip", (spec.hostname, spec.port), ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as err:  # the jump host could not reach the target
            raise ConnectionRefusedError(f"jump host {via.spec.name}: {err}") from err
    sock = socket.create_connection((spec.hostname, spec.port), timeout=timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)
    return sock


def _load_known_hosts(keys: paramiko.HostKeys, path: Path) -> None:
    """Like OpenSSH, skip lines that do not parse instead of failing on the whole file."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return
    for number, line in enumerate(lines, 1):
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
        except Exception as err:  # paramiko raises several types for malformed lines
            log.warning("%s:%d: ignoring unreadable known_hosts line (%s)", path, number, err)
            continue
        if entry is None:   # a comment or blank line
            continue
        for name in entry.hostnames:
            keys.add(name, entry.key.get_name(), entry.key)


def _attempt(spec: HostSpec, accept_new: bool, timeout: float,
             via: SSHConnection | None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    # cube's own file is loaded last so its entries replace ~/.ssh's for the same name.
    for path in (Path.home() / ".ssh" / "known_hosts", paths.known_hosts_file()):
        _load_known_hosts(client.get_host_keys(), path)
    client.set_missing_host_key_policy(_HostKeyPolicy(accept_new))
    sock = _open_socket(spec, timeout, via)
    try:
        client.connect(spec.hostname, port=spec.port, username=spec.user, sock=sock,
                       key_filename=spec.identity_files or None,  # type: ignore[arg-type]
                       look_for_keys=not spec.identity_files, allow_agent=not spec.identity_files,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       channel_timeout=timeout)
    except BaseException as err:
        t = client.get_transport()
        past_kex = t is not None and t.is_active() and t.remote_version  # host key accepted
        client.close()
        sock.close()
        if past_kex and isinstance(err, (OSError, EOFError, paramiko.SSHException)) \
                and not isinstance(err, (paramiko.AuthenticationException,
                                         paramiko.BadHostKeyException)):
            # e.g. an unreadable key file: an auth problem, retrying would not help
            raise paramiko.AuthenticationException(str(err) or type(err).__name__) from err
        raise
    transport = client.get_transport()
    assert transport is not None  # connect() succeeded
    transport.set_keepalive(KEEPALIVE_S)
    return client


def _network_error(err: BaseException) -> bool:
    if isinstance(err, (paramiko.AuthenticationException, paramiko.BadHostKeyException,
                        _UnknownHostKey, socket.gaierror)):
        return False
    return isinstance(err, (OSError, EOFError, paramiko.SSHException))


def _explain(spec: HostSpec, err: BaseException) -> CubeError:
    where = f"host '{spec.name}' ({spec.address})"
    if isinstance(err, _UnknownHostKey):
        return CubeError(
            f"The host key of {where} is not known ({err.key.get_name()} {_fingerprint(err.key)}).",
            "Run with --accept-new-host-key to trust and store it, or add it to "
            f"{paths.known_hosts_file()} (or ~/.ssh/known_hosts).")
    if isinstance(err, paramiko.BadHostKeyException):
        return CubeError(
            f"The host key of {where} has CHANGED (now {_fingerprint(err.key)}, known "
            f"{_fingerprint(err.expected_key)}). Someone may be intercepting the connection.",
            f"If the host was reinstalled, delete its old line from {paths.known_hosts_file()} "
            "or ~/.ssh/known_hosts and connect again with --accept-new-host-key.")
    if isinstance(err, paramiko.AuthenticationException):
        keys = ", ".join(spec.identity_files) or "your default keys and ssh-agent"
        return CubeError(f"Authentication as '{spec.user}' on {where} failed: {err}",
                         f"Check the user and identity file (tried {keys}); set identity_file in "
                         "the inventory or IdentityFile in ~/.ssh/config.")
    if isinstance(err, socket.gaierror):
        return HostUnreachable(f"Cannot resolve the hostname of {where}: {err}.",
                               "Check the hostname in the inventory or ~/.ssh/config.")
    return HostUnreachable(f"Cannot reach {where}: {err or type(err).__name__}.",
                           "Check that the host is up and reachable (network, VPN, ProxyJump).")


def _jump_for(spec: HostSpec, accept_new: bool, timeout: float) -> SSHConnection | None:
    """ProxyJump 'a,b' = reach b through a, then the target through b."""
    if not spec.proxy_jump:
        return None
    *before, last = [j.strip() for j in spec.proxy_jump.split(",")]
    jump = resolve_host(last, spec.inventory)
    if before:
        jump.proxy_jump = ",".join(before)
    return connect_ssh(jump, accept_new_host_key=accept_new, connect_timeout=timeout)


def _connect_client(spec: HostSpec, accept_new: bool, budget: float, retries: int,
                    via: SSHConnection | None) -> paramiko.SSHClient:
    start = time.monotonic()

    def attempt() -> paramiko.SSHClient:
        left = budget - (time.monotonic() - start)
        log.debug("connecting to %s (%s), attempt %d", spec.name, spec.address,
                  retrying.statistics.get("attempt_number", 1))
        return _attempt(spec, accept_new, max(1.0, left), via)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_network_error),
        stop=tenacity.stop_after_attempt(retries) | tenacity.stop_after_delay(budget),
        wait=tenacity.wait_exponential(multiplier=0.25, max=2.0),
        before_sleep=lambda rs: log.debug("attempt %d to %s failed (%s); retrying",
                                          rs.attempt_number, spec.name,
                                          rs.outcome.exception() if rs.outcome else None),
        reraise=True)
    try:
        return retrying(attempt)
    except (OSError, EOFError, paramiko.SSHException, _UnknownHostKey) as err:
        raise _explain(spec, err) from None


def connect_ssh(spec: HostSpec | str, *, accept_new_host_key: bool = False,
                connect_timeout: float = 10, retries: int = 8) -> SSHConnection:
    """An open connection to the host. See the module doc for the time budget."""
    if isinstance(spec, str):
        spec = resolve_host(spec)
    for key in spec.identity_files:
        if not Path(key).is_file():
            raise CubeError(f"The identity file {key} of host '{spec.name}' does not exist.",
                            "Fix identity_file in the inventory or IdentityFile in ~/.ssh/config.")
    conn = SSHConnection(spec, accept_new_host_key, connect_timeout, retries)
    conn.reconnect()
    return conn


class SSHConnection:
    def __init__(self, spec: HostSpec, accept_new: bool, connect_timeout: float, retries: int):
        self.spec = spec
        self.client: paramiko.SSHClient | None = None
        self.jump: SSHConnection | None = None   # the ProxyJump hop, when there is one
        self.connect_timeout = connect_timeout
        self._accept_new, self._retries = accept_new, retries
        self._sftp: paramiko.SFTPClient | None = None
        self._bulk: ssh_bulk.OpenSSHBulk | None = None   # OpenSSH master for bulk streams
        self._bulk_tried = False

    def __repr__(self):
        return f"<SSHConnection {self.spec.name} {self.spec.address}>"

    # -- lifecycle ------------------------------------------------------------------------------

    def reconnect(self, connect_timeout: float | None = None) -> None:
        """(Re-)establish the connection with the same retry policy (after a drop)."""
        self.close()
        budget = connect_timeout or self.connect_timeout
        if self.spec.proxy_jump:
            self.jump = _jump_for(self.spec, self._accept_new, budget)
        try:
            self.client = _connect_client(self.spec, self._accept_new, budget, self._retries,
                                          self.jump)
        except BaseException:
            self.close()  # don't leave the jump host's connection behind
            raise

    def close(self) -> None:
        if self._bulk is not None:
            self._bulk.close()
        self._bulk, self._bulk_tried = None, False
        for thing in (self._sftp, self.client, self.jump):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # closing a dead connection may raise; it is gone either way
                    pass
        self._sftp = self.client = self.jump = None

    def is_alive(self, probe_timeout: float | None = None) -> bool:
        """Transport still up; with `probe_timeout`, also a round trip (`true`) within it."""
        t = self.client.get_transport() if self.client else None
        if t is None or not t.is_active():
            return False
        if probe_timeout is None:
            return True
        try:
            return self.exec("true", timeout=probe_timeout).code == 0
        except CubeError:
            return False

    def transport(self) -> paramiko.Transport:
        """The live transport; ConnectionLost when the connection is down."""
        t = self.client.get_transport() if self.client else None
        if t is None or not t.is_active():
            raise ConnectionLost(f"The connection to host '{self.spec.name}' is closed.",
                                 "Reconnect and retry.")
        return t

    def open_channel(self, timeout: float | None = None) -> paramiko.Channel:
        """A new session channel (for one command)."""
        try:
            return self.transport().open_session(timeout=timeout or self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as err:
            raise ConnectionLost(f"Lost the connection to host '{self.spec.name}': {err}.",
                                 "Reconnect and retry.") from None

    # -- commands, files, streams ---------------------------------------------------------------

    def exec(self, command: str, *, input: bytes | None = None,
             timeout: float | None = None) -> ExecResult:
        """Run a command line (already quoted for the remote shell). `timeout` covers the whole
        command, from opening its channel to its exit status; see the module doc."""
        deadline = time.monotonic() + timeout if timeout else None
        chan = self.open_channel(timeout)
        out, err = bytearray(), bytearray()
        try:
            chan.exec_command(command)
            threads = [threading.Thread(target=_drain, args=(chan.recv_stderr, err), daemon=True)]
            if input is not None:
                threads.append(threading.Thread(target=_feed, args=(chan, input), daemon=True))
            else:
                chan.shutdown_write()
            for th in threads:
                th.start()
            while True:
                if deadline is not None:
                    chan.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = chan.recv(65536)
                if not chunk:
                    break
                out += chunk
            for th in threads:
                th.join(None if deadline is None else max(0.01, deadline - time.monotonic()))
            if not chan.exit_status_ready() and not chan.get_transport().is_active():
                raise ConnectionLost(f"Lost the connection to host '{self.spec.name}' while "
                                     f"running `{command}`.", "Reconnect and retry.")
            code = chan.recv_exit_status()
        except TimeoutError:
            note = f"\ntimed out after {timeout:g} s"
            return ExecResult(124, out.decode(errors="replace"),
                              err.decode(errors="replace") + note, timed_out=True)
        finally:
            chan.close()
        if code == -1:
            raise ConnectionLost(f"Lost the connection to host '{self.spec.name}' while running "
                                 f"`{command}` (no exit status).", "Reconnect and retry.")
        return ExecResult(code, out.decode(errors="replace"), err.decode(errors="replace"))

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        """Write a file over SFTP: a temp name in the same folder, then an atomic rename."""
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        try:
            with self.sftp.open(tmp, "wb") as f:
                f.set_pipelined(True)
                f.write(data)
            self.sftp.chmod(tmp, mode)
            self.sftp.posix_rename(tmp, path)
        except (OSError, EOFError, paramiko.SSHException) as err:
            raise CubeError(f"Cannot write {path} on host '{self.spec.name}': {err}",
                            "Check the host's cube root setting and free disk space.") from None

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self.transport().open_sftp_client()
        return self._sftp

    def open_stream(self, command: str) -> streams.Stream:
        """A command whose stdin/stdout carry bulk bytes: through OpenSSH's client (see
        controller.ssh_bulk) where it can, else on a paramiko channel tuned for throughput."""
        bulk = self._openssh_bulk()
        if bulk is not None:
            return bulk.open_stream(command)
        try:
            return channels.exec_stream(self.transport(), command)
        except (paramiko.SSHException, OSError, EOFError) as err:
            raise ConnectionLost(f"Lost the connection to host '{self.spec.name}': {err}.",
                                 "Reconnect and retry.") from None


    def openssh_stream(self, command: str) -> streams.ProcessStream | None:
        """open_stream through OpenSSH's client only; None where bulk streams use paramiko."""
        bulk = self._openssh_bulk()
        return bulk.open_stream(command) if bulk is not None else None

    def _openssh_bulk(self) -> ssh_bulk.OpenSSHBulk | None:
        """The OpenSSH master for bulk streams, started on first use, pinned to the host key
        this connection verified; None where OpenSSH cannot be used."""
        if self._bulk is None and not self._bulk_tried:
            self._bulk_tried = True
            if ssh_bulk.usable(self.spec):
                bulk = ssh_bulk.OpenSSHBulk(self.spec, self.transport().get_remote_server_key(),
                                            self.connect_timeout)
                self._bulk = bulk if bulk.start() else None
        return self._bulk


def openssh_shell_argv(spec: HostSpec) -> list[str]:
    """OpenSSH's client for an interactive session (a real TTY, which paramiko does not give
    a terminal), checking host keys against the same files as every other connection."""
    known = f"{paths.known_hosts_file()} {Path.home() / '.ssh' / 'known_hosts'}"
    argv = ["ssh", "-t", "-p", str(spec.port), "-o", f"UserKnownHostsFile={known}",
            "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]
    for identity in spec.identity_files or []:
        argv += ["-i", str(identity)]
    if spec.proxy_jump:  # the jump may be an inventory name, which OpenSSH does not know
        hops = [resolve_host(j.strip(), spec.inventory) for j in spec.proxy_jump.split(",")]
        argv += ["-J", ",".join(f"{h.user}@{h.hostname}:{h.port}" if h.user
                                else f"{h.hostname}:{h.port}" for h in hops)]
    return [*argv, f"{spec.user}@{spec.hostname}" if spec.user else spec.hostname]



def _drain(recv, into: bytearray) -> None:
    try:
        while chunk := recv(65536):
            into += chunk
    except (OSError, EOFError):
        pass


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except (OSError, EOFError):
        pass
