"""Run one task process on this machine: its own process group, output streamed to the
terminal and a log file as it arrives, Ctrl-C / SIGTERM passed on as SIGTERM to the whole group
and SIGKILL after a grace period, so nothing the task started outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from controller.cube import Cube, Param
from controller.errors import CubeError

CHUNK = 65536
LINGER_S = 1.0  # how long a finished task's leftovers may keep writing
FORWARDED = (signal.SIGINT, signal.SIGTERM)


def task_log_path(cube: Cube, params: Sequence[Param], task: str) -> Path:
    """`<log_dir>/cube-<task>-<UTC time>.log` when the task has a `log_dir` output, else
    `<workspace>/logs/`; an existing name (same second) gets a numeric suffix. `params` are
    the task's parameters with the run's overrides applied (controller.plan.TaskPlan)."""
    folder = cube.workspace / "logs"
    for p in params:
        if p.name == "log_dir" and p.io == "output":
            folder = p.path if p.type == "directory" else p.path.parent
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, n = folder / f"cube-{task}-{stamp}.log", 1
    while path.exists():
        path, n = folder / f"cube-{task}-{stamp}-{n}.log", n + 1
    return path


class _GroupStopper:
    """On a forwarded signal: SIGTERM to the task's group now, SIGKILL after `grace`."""

    def __init__(self, pgid: int, grace: float):
        self.pgid, self.grace = pgid, grace
        self.signum: int | None = None
        self._timer: threading.Timer | None = None

    def __call__(self, signum, _frame) -> None:
        if self.signum is not None:
            self._kill(signal.SIGKILL)  # a second Ctrl-C: no more waiting
            return
        self.signum = signum
        self._kill(signal.SIGTERM)
        self._start_kill_timer()

    def stop_leftovers(self) -> None:
        self._kill(signal.SIGTERM)
        if self._timer is None:  # after a Ctrl-C the SIGKILL is already scheduled
            self._start_kill_timer()

    def _start_kill_timer(self) -> None:
        self._timer = threading.Timer(self.grace, self._kill, (signal.SIGKILL,))
        self._timer.daemon = True
        self._timer.start()

    def _kill(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self) -> None:
        if self._timer:
            self._timer.cancel()


def run_process(argv: list[str], *, cwd: Path | str, log_file: Path, env: dict | None = None,
                grace: float = 10.0, out: BinaryIO | None = None) -> int:
    """Run argv to completion and return its exit code (128+N when killed by signal N, or
    when cube stopped it on signal N)."""
    out = out if out is not None else sys.stdout.buffer
    try:
        proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as err:
        raise CubeError(f"Cannot start the task command {argv[0]}: {err.strerror}.",
                        "Check that the cube's entry point exists; `cube run --plan` shows "
                        "the command.") from None
    stopper = _GroupStopper(proc.pid, grace)
    previous = _install(stopper)
    stdout = proc.stdout
    assert stdout is not None  # stdout=PIPE above
    try:
        with open(log_file, "ab") as log:
            pump = threading.Thread(target=_pump, args=(stdout.fileno(), out, log),
                                    daemon=True)
            pump.start()
            code = proc.wait()
            _reap_group(pump, stopper)
    finally:
        stopper.cancel()
        _restore(previous)
        stdout.close()
    if stopper.signum is not None:
        return 128 + stopper.signum
    return 128 - code if code < 0 else code


def _reap_group(pump: threading.Thread, stopper: _GroupStopper) -> None:
    """The task has exited; if something it started still holds the output pipe open, stop
    that group too (SIGTERM, SIGKILL after the grace) rather than wait for it forever."""
    pump.join(LINGER_S)
    if pump.is_alive():
        stopper.stop_leftovers()
        # A holdout that left the group (setsid) is out of reach: stop reading after that.
        pump.join(stopper.grace + 5)


def _pump(fd: int, out: BinaryIO, log: BinaryIO) -> None:
    # Raw chunks rather than lines: progress bars that redraw with '\r' still show at once.
    while True:
        try:
            data = os.read(fd, CHUNK)
        except InterruptedError:
            continue
        if not data:
            return
        log.write(data)
        log.flush()
        try:
            out.write(data)
            out.flush()
        except (BrokenPipeError, ValueError):
            pass  # terminal gone: keep logging


def _install(handler) -> dict | None:
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers can only be set from the main thread
    return {sig: signal.signal(sig, handler) for sig in FORWARDED}


def _restore(previous: dict | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)
