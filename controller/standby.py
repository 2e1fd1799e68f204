"""A stream process kept ready on the host: each bulk push or pull of a warm connection starts
without waiting for the host's login shell and Python (0.2-0.3 s each time here, as much as the
rest of a 10,000-file push's scan).

After a bulk stream of a connection ends, one `python3 AGENT --root ROOT standby` is started in
the background on the connection's OpenSSH master (see agent.__main__): it imports the sync
modules and waits. The next bulk stream writes its request line, {"verb", "args"}, and from
then on it is an ordinary `receive` or `send` stream. A spare whose process has exited is
dropped and the stream starts as before; the connection's close ends the spare (EOF). There is
at most one spare, and none before the connection's first bulk stream, so a connection that
never moves many bytes never starts one.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable

from controller.streams import ProcessStream, Stream


class Standby:
    """command(): the standby's command line (asked in the thread that refills: it may talk to
    the agent session); open(command): a new stream running it (a ProcessStream over OpenSSH),
    or None where there is no OpenSSH path to keep one on (run in the background)."""

    def __init__(self, command: Callable[[], str],
                 open: Callable[[str], ProcessStream | None]):
        self._command, self._open = command, open
        self._lock = threading.Lock()
        self._spare: ProcessStream | None = None
        self._filling: threading.Thread | None = None
        self._closed = False
        self._unavailable = False   # open() gave None: this connection's streams use paramiko

    def take(self, verb: str, args) -> Stream | None:
        """The spare, now running `verb args`; None when there is none ready."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        if spare.proc.poll() is not None:   # its connection or host went: start afresh
            end_gently(spare)
            return None
        spare.write(json.dumps({"verb": verb, "args": [str(a) for a in args]}).encode() + b"\n")
        return spare

    def refill(self) -> None:
        """Start a spare in the background unless one is there or on its way."""
        with self._lock:
            if self._closed or self._unavailable or self._spare is not None or (
                    self._filling is not None and self._filling.is_alive()):
                return
        try:
            command = self._command()
        except Exception:   # noqa: BLE001 (a later stream starts as before, and reports it)
            return
        with self._lock:
            self._filling = threading.Thread(target=self._fill, args=(command,),
                                             name="cube-standby", daemon=True)
            self._filling.start()

    def _fill(self, command: str) -> None:
        try:
            stream = self._open(command)
        except Exception:   # noqa: BLE001 (a later stream starts as before, and reports it)
            return
        with self._lock:
            self._unavailable = stream is None
            keep = stream is not None and not self._closed and self._spare is None
            if keep:
                self._spare = stream
        if stream is not None and not keep:
            end_gently(stream)

    def wait(self, timeout: float | None = None) -> None:
        """Until a spare being started is there (benchmarks: nothing runs beside a timing)."""
        filling = self._filling
        if filling is not None:
            filling.join(timeout)

    def close(self) -> None:
        """End the spare (its host process reads EOF and exits); start no other."""
        with self._lock:
            self._closed = True
        self.wait()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            end_gently(spare)

    def reopen(self) -> None:
        """After a reconnect: the old spare went with the old master; keep spares again."""
        self.close()
        with self._lock:
            self._closed = self._unavailable = False


def end_gently(stream: ProcessStream, grace: float = 2.0) -> None:
    """End a stream by EOF and let its host process leave by itself: killed while the host's
    login shell still starts, a shell rc may leave a lock behind (pyenv's rehash lock made every
    later login on a host wait 60 s). Killed only if it is still there after `grace`."""
    try:
        stream.close_stdin()
        stream.proc.wait(grace)
    except (OSError, subprocess.TimeoutExpired):
        pass
    stream.close()


class RefillOnClose:
    """A bulk stream that asks for the next spare once it is closed."""

    def __init__(self, stream: Stream, standby: Standby):
        self.stream, self.standby = stream, standby

    def write(self, data: bytes) -> int:
        return self.stream.write(data)

    def close_stdin(self) -> None:
        self.stream.close_stdin()

    def read(self, n: int = -1) -> bytes:
        return self.stream.read(n)

    def wait(self) -> int:
        return self.stream.wait()

    def stderr_text(self) -> str:
        return self.stream.stderr_text()

    def close(self) -> None:
        self.stream.close()
        self.standby.refill()
