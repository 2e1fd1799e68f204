"""Following the ranks of a multi-node job: every rank's log, each line prefixed with its rank.

One thread per rank long-polls its host's `read-log` (a short window, so a cancel sent on the
same agent session waits at most that long) and appends the bytes to the rank's own local log
(`$CUBE_HOME/jobs/<job>/rank-<i>.log`, whose size is the next offset). Whole lines go to the
output sink as `[i] line` and into the job's combined log (`output.log`), under one lock so
that lines of different ranks never interleave. The first rank to end not succeeded is
reported at once (`Followers.wait_first_failure`), so the controller can cancel the others.

Several followers of one job (the run's controller, `cube remote attach`, `logs -f`) may share
the local logs: each appends to a rank's log under a lock only if the file has not grown
meanwhile (as controller.remote does), and writes to `output.log` only the lines of bytes it
appended itself, so neither file gets a chunk twice; every follower shows every line.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from controller import remote
from controller.sinks import Sinks
from controller.transport import HostTarget

WINDOW_S = 2.0            # one read-log long poll; also the most a cancel waits for the session
FINAL = ("succeeded", "failed", "cancelled", "lost")


@dataclass
class RankLog:
    index: int
    host: str
    job_id: str
    target: HostTarget
    path: Path                          # the rank's full log here
    final: dict | None = None           # its final state, once it ended
    error: BaseException | None = None  # why following it stopped, if not its end
    partial: bytes = b""                # a line begun but not yet ended
    wrote: bool = True                  # whether this follower appended its last chunk


@dataclass
class Followers:
    ranks: list[RankLog]
    combined: Path
    sinks: Sinks
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def start(self) -> None:
        self.combined.parent.mkdir(parents=True, exist_ok=True)
        for rank in self.ranks:
            thread = threading.Thread(target=self._follow, args=(rank,), daemon=True,
                                      name=f"rank-{rank.index}")
            thread.start()
            self.threads.append(thread)

    def wait_first_failure(self) -> RankLog | None:
        """Block until a rank ends not succeeded (that rank), or every rank succeeded (None)."""
        with self.changed:
            while True:
                bad = [r for r in self.ranks if r.error is not None or (
                    r.final is not None and r.final.get("state") != "succeeded")]
                if bad:
                    return bad[0]
                if all(r.final is not None for r in self.ranks):
                    return None
                self.changed.wait(1.0)

    def wait_all(self) -> None:
        """Block until every rank's follower ended (each rank final, or its follow failed)."""
        for thread in self.threads:
            while thread.is_alive():
                thread.join(1.0)  # a bounded join keeps Ctrl-C working

    def catch_up(self) -> None:
        """Once, without waiting: what each rank's host log has beyond its local copy."""
        self.combined.parent.mkdir(parents=True, exist_ok=True)
        for rank in self.ranks:
            copy_new(rank, functools.partial(self._show, rank))
            with self.lock:
                self._show_locked(rank, b"", flush=True)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _follow(self, rank: RankLog) -> None:
        try:
            rank.final = follow_rank(rank, lambda chunk: self._show(rank, chunk), self.sinks.log)
        except BaseException as err:  # reported to the waiting controller, never lost
            rank.error = err
        with self.changed:
            self._show_locked(rank, b"", flush=True)
            self.changed.notify_all()

    def _show(self, rank: RankLog, chunk: bytes) -> None:
        with self.lock:
            self._show_locked(rank, chunk)

    def _show_locked(self, rank: RankLog, chunk: bytes, flush: bool = False) -> None:
        data = rank.partial + chunk
        cut = len(data) if flush else data.rfind(b"\n") + 1
        rank.partial = data[cut:]
        if not data[:cut]:
            return
        lines = data[:cut].splitlines(keepends=True)
        text = b"".join(b"[%d] " % rank.index + (line if line.endswith(b"\n") else line + b"\n")
                        for line in lines)
        if rank.wrote:  # another follower that appended these bytes writes their lines
            with open(self.combined, "ab") as out:
                out.write(text)
        self.sinks.output(text)


def follow_rank(rank: RankLog, show: Callable[[bytes], None],
                log: Callable[[str], None]) -> dict:
    """The rank's log from where its local copy ends until it is final; its final state."""
    rank.path.parent.mkdir(parents=True, exist_ok=True)
    with open(rank.path, "ab") as out:
        while True:
            offset = os.fstat(out.fileno()).st_size
            try:
                answer = rank.target.agent("read-log", rank.job_id, "--offset", str(offset),
                                           "--wait", str(WINDOW_S), timeout=WINDOW_S + 30)
            except remote.CONNECTION_ERRORS as err:
                log(f"rank {rank.index}: connection to {rank.host} lost "
                    f"({type(err).__name__}: {err}); reconnecting")
                remote.reconnect(rank.target, log)
                continue
            _append(rank, out, offset, base64.b64decode(answer["data"]), show)
            if answer["done"]:
                return answer["state"]


def copy_new(rank: RankLog, show: Callable[[bytes], None]) -> None:
    """What the rank's host log has beyond its local copy, appended there and shown."""
    rank.path.parent.mkdir(parents=True, exist_ok=True)
    with open(rank.path, "ab") as out:
        while True:
            offset = os.fstat(out.fileno()).st_size
            answer = rank.target.agent("read-log", rank.job_id, "--offset", str(offset),
                                       "--wait", "0")
            chunk = base64.b64decode(answer["data"])
            if not chunk:
                return
            _append(rank, out, offset, chunk, show)


def _append(rank: RankLog, out: BinaryIO, offset: int, chunk: bytes,
            show: Callable[[bytes], None]) -> None:
    """Append `chunk`, read from `offset`, unless another follower appended meanwhile; show it."""
    if not chunk:
        return
    fcntl.flock(out.fileno(), fcntl.LOCK_EX)
    try:
        rank.wrote = os.fstat(out.fileno()).st_size == offset
        if rank.wrote:
            out.write(chunk)
            out.flush()
    finally:
        fcntl.flock(out.fileno(), fcntl.LOCK_UN)
    show(chunk)
