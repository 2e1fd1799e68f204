"""Bulk byte streams over an SSH channel (paramiko): the `Stream` of controller.streams on a
channel of cube's own connection.

Sync moves gigabytes through one command's stdin/stdout, which paramiko's defaults handle
badly: its packetizer starts a re-key every 512 MiB, and in a trial a re-key in the middle of a
busy channel stalled ("Key-exchange timed out waiting for key negotiation"); and its default
2 MiB receive window with 32 KiB packets makes pulls far slower than pushes. `tune_transport`
fixes both on our side of a connection (OpenSSH's own re-key limit for AES ciphers is 64 GiB).
It also moves the connection to AES-GCM once: paramiko's default aes128-ctr + hmac-sha2-256
costs a Python-level HMAC per 32 KiB packet; GCM measured 1.6x (push) to 2.2x (pull) faster
with 40% less CPU against OpenSSH 9.2.
"""

from __future__ import annotations

import weakref

import paramiko

from controller.streams import CHUNK

WINDOW = 16 << 20          # receive window: the server may send this much before waiting
MAX_PACKET = 1 << 18       # biggest SSH packet we accept from the server (RFC 4254 allows it)
NO_REKEY = 1 << 62         # our side never asks for a re-key by volume
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


_CIPHER_TRIED: weakref.WeakSet[paramiko.Transport] = weakref.WeakSet()  # re-keyed once each


def tune_transport(transport: paramiko.Transport) -> paramiko.Transport:
    """Large windows and packets for new channels; no volume-triggered re-key from our side."""
    transport.default_window_size = WINDOW
    transport.default_max_packet_size = MAX_PACKET
    packetizer = transport.packetizer
    packetizer.REKEY_BYTES = packetizer.REKEY_PACKETS = NO_REKEY
    packetizer.REKEY_BYTES_OVERFLOW_MAX = packetizer.REKEY_PACKETS_OVERFLOW_MAX = NO_REKEY
    if transport not in _CIPHER_TRIED:
        _CIPHER_TRIED.add(transport)
        _prefer_gcm(transport)
    return transport


def _prefer_gcm(transport: paramiko.Transport) -> None:
    """Re-key once, idle, to AES-GCM when the connection uses something slower."""
    if transport.local_cipher in FAST_CIPHERS:
        return
    options = transport.get_security_options()
    ours = [c for c in FAST_CIPHERS if c in options.ciphers]
    if not ours:
        return
    options.ciphers = tuple(ours) + tuple(c for c in options.ciphers if c not in ours)
    try:
        transport.renegotiate_keys()   # the server picks the first of our ciphers it knows
    except paramiko.SSHException:
        pass   # the old keys stay in use


def exec_stream(client_or_transport, command: str) -> ChannelStream:
    """Run a (quoted) command on the host; its stdin/stdout become a byte stream."""
    transport = client_or_transport
    if isinstance(client_or_transport, paramiko.SSHClient):
        transport = client_or_transport.get_transport()
    tune_transport(transport)
    channel = transport.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET)
    channel.exec_command(command)
    return ChannelStream(channel)


class ChannelStream:
    def __init__(self, channel: paramiko.Channel):
        self.channel = channel
        self._pending, self._pos = b"", 0

    def write(self, data) -> int:
        # Channel.sendall re-slices the remaining bytes after every packet (quadratic for
        # large buffers): hand it one packet's worth at a time instead. A packet carries at
        # most max_packet - 64 bytes of data; a piece one byte more costs a second packet.
        view, piece = memoryview(data), max(self.channel.out_max_packet_size - 64, 1 << 14)
        for start in range(0, len(view), piece):
            self.channel.sendall(bytes(view[start:start + piece]))
        return len(view)

    def close_stdin(self) -> None:
        self.channel.shutdown_write()

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all of them when n < 0); b"" only at end of stream."""
        if n < 0:
            rest = self._pending[self._pos:]
            self._pending = b""
            return rest + b"".join(iter(lambda: self.channel.recv(WINDOW), b""))
        if self._pos >= len(self._pending):
            # Take everything paramiko has buffered: a partial read makes it memmove the rest.
            self._pending, self._pos = self.channel.recv(WINDOW), 0
        out = self._pending[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def wait(self) -> int:
        return self.channel.recv_exit_status()

    def stderr_text(self) -> str:
        self.channel.recv_exit_status()   # stderr is complete once the command has exited
        parts = iter(lambda: self.channel.recv_stderr(CHUNK), b"")
        return b"".join(parts).decode(errors="replace")

    def close(self) -> None:
        self.channel.close()
