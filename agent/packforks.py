"""Landing packs in forked processes: the host's `receive` of many small files.

Landing a small file is mostly system calls (create, write, set times, rename) with a little
Python around each; threads share one interpreter lock and, on a 2-core host, 10,000 files
took 0.95-1.15 s on two threads where two processes took 0.55-0.6 s, using less CPU. So a
receive that need not be durable forks LANDERS processes at its first pack. The stream's reader
(the parent) still reads every member, checks every path and makes every folder, in stream
order; a child only verifies, writes and renames the files of the packs it is handed, and
answers with what it landed. Each child has one pack at a time: the parent hands a child its
next pack only once the child answered for its last (memory stays bounded, no pipe can fill up
both ways), and waits for every child before any member that is not a pack, as PackLander
does with threads.

A child never touches the stream, stdout or anything the parent holds; it leaves with
os._exit, and leaves when its pipe from the parent closes, so a killed parent takes its
children with it once their pack is done. Used only where forking is safe: in a process with
one thread (the agent's `receive`), never in the controller.
"""

from __future__ import annotations

import marshal
import os
import struct
import threading

from .landing import widen_pipe, write_all
from .manifest import cache_key
from .packs import PackLander, current_umask, land_pack
from .protocol import AgentError

LANDERS = 2
_HEAD = struct.Struct("!QQ")   # a message: marshal length, then data length


def can_fork():
    return hasattr(os, "fork") and threading.active_count() == 1


class _Child:
    def __init__(self, pid, to_child, from_child):
        self.pid, self.to_child, self.from_child = pid, to_child, from_child
        self.busy = False


class ForkedPackLander:
    """PackLander's interface (land, drain, close) over LANDERS forked processes; over
    PackLander's threads where the process has other threads by its first pack."""

    def __init__(self, finisher):
        self.finisher, self.umask = finisher, current_umask()
        self.children: list = []
        self.turn = 0
        self.results: list = []   # (cache rows, bytes, error) answers not yet drained
        self.threads = None
        self.processes = 0   # how many landing processes this receive forked
        # {rel: hash-cache row} of what the children landed: rows built by them, from the stat
        # of each landed file (agent.manifest.cache_key's fields) and its verified digest
        self.cache_rows: dict = {}

    def _start(self):
        for _ in range(LANDERS):
            task_r, task_w = os.pipe()
            result_r, result_w = os.pipe()
            pid = os.fork()
            if pid == 0:   # the child: nothing of the parent's beyond its own two pipes
                os.close(task_w)
                os.close(result_r)
                for other in self.children:
                    os.close(other.to_child)
                    os.close(other.from_child)
                code = 1
                try:
                    _serve(task_r, result_w, self.umask)
                    code = 0
                finally:
                    os._exit(code)
            os.close(task_r)
            os.close(result_w)
            widen_pipe(task_w)
            self.children.append(_Child(pid, task_w, result_r))
        self.processes = len(self.children)

    def land(self, rows, dests, data):
        if not self.children and self.threads is None:
            if not can_fork():
                self.threads = PackLander(self.finisher, None)
            else:
                self._start()
        if self.threads is not None:
            return self.threads.land(rows, dests, data)
        child = self.children[self.turn % len(self.children)]
        self.turn += 1
        if child.busy:
            self.results.append(self._answer(child))
        _send(child.to_child, (rows, dests), data)
        child.busy = True

    def _answer(self, child):
        child.busy = False
        try:
            answer, _ = _receive(child.from_child)
        except EOFError:
            raise AgentError("A landing process of this receive died.",
                             "Run the sync again; files already received are kept.") from None
        rows, size, error = answer
        return rows, size, _error(error)

    def drain(self, verified, report, raise_failure=True):
        if self.threads is not None:
            return self.threads.drain(verified, report, raise_failure)
        first = None
        try:
            for child in self.children:
                if child.busy:
                    self.results.append(self._answer(child))
        finally:
            for rows, size, err in self.results:
                self.cache_rows.update(rows)
                report["files"] += len(rows)
                report["bytes"] += size
                first = first or err
            self.results = []
        if first is not None and raise_failure:
            raise first

    def close(self, verified, report):
        """Wait for every child's last pack, then end them."""
        if self.threads is not None:
            return self.threads.close(verified, report)
        try:
            self.drain(verified, report, raise_failure=False)
        finally:
            for child in self.children:
                os.close(child.to_child)
                os.close(child.from_child)
                os.waitpid(child.pid, 0)
            self.children = []


def _serve(task_r, result_w, umask):
    """The child: land each pack it is handed, answer with what landed, until its pipe closes."""
    while True:
        try:
            task, data = _receive(task_r)
        except EOFError:
            return
        rows, dests = task
        done, size, landed, err = land_pack(rows, dests, data, umask, None)
        cache_rows = {rel: cache_key(landed[dest]) + [sha, None]
                      for (rel, (sha, _)), dest in zip(done.items(), dests)}
        _send(result_w, (cache_rows, size, _error_record(err)), b"")


def _send(fd, message, data):
    head = marshal.dumps(message)   # between a process and its own fork: quicker than JSON
    write_all(fd, _HEAD.pack(len(head), len(data)) + head)
    if data:
        write_all(fd, data)


def _receive(fd):
    """(message, data) from a pipe; EOFError when it closed between messages or inside one."""
    size, data_size = _HEAD.unpack(_read_exact(fd, _HEAD.size))
    return marshal.loads(_read_exact(fd, size)), _read_exact(fd, data_size)


def _read_exact(fd, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        count = os.readv(fd, [view[got:]])
        if not count:
            raise EOFError("pipe closed")
        got += count
    return buf


def _error_record(err):
    if err is None:
        return None
    if isinstance(err, AgentError):
        return {"agent": [err.message, err.hint]}
    if isinstance(err, OSError):
        return {"os": [err.errno, err.strerror, err.filename]}
    return {"other": "%s: %s" % (type(err).__name__, err)}


def _error(record):
    """The exception a child's error record stands for, raised in the parent as it was there."""
    if not record:
        return None
    if "agent" in record:
        return AgentError(*record["agent"])
    if "os" in record:
        code, text, filename = record["os"]
        return OSError(code, text, filename) if filename else OSError(code, text)
    return AgentError("A landing process failed: %s." % record["other"],
                      "Run the sync again; files already received are kept.")


