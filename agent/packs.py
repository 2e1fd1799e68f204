"""Small files travel in `pack` members: one pax header whose CUBE.index lists each file
([path, size, mode, mtime_ns, sha256], JSON) before their data, back to back. Per file that
saves two tar headers (1 KiB or more on the wire) and most of the work of writing and parsing
them, which cost more than a small file's own bytes.

`Pack` fills them on the sending side. On the receiving side agent.tarstream checks every path
of a pack (in stream order, on its own thread) and hands the pack to a `PackLander`, whose
worker threads verify, write and land its files while the reader goes on reading and checking
the next pack (Python releases the GIL around each system call and around hashing).
"""

from __future__ import annotations

import hashlib
import json
import os

from .landing import SWAP_MIN, check_sha, new_temp_file, unlink_quiet, write_all
from .protocol import AgentError
from .tarformat import Member

SMALL_FILE = 1 << 20   # read whole and hashed before it is sent: never a `commit` member
MAX_PACK = 64 << 20    # a received pack is held in memory whole; ours are about 4 MiB


class Pack:
    """The sending side: collects small files and writes them as one member when full."""

    MAX_BYTES, MAX_FILES = 4 << 20, 2048

    def __init__(self, tar, hashed):
        self.tar, self.index, self.data, self.size = tar, [], [], 0
        self.hashed = hashed   # {rel: hash-cache row} of the files hashed here

    def add(self, top, rel, entry):
        """Read one small file into the pack (hashing it unless its digest is known, and then
        adding its hash-cache row to `hashed`). Sends the pack once it is full."""
        fd = os.open(top + "/" + rel, os.O_RDONLY)   # no file object: 10,000s of small files
        try:
            data = os.read(fd, entry["size"] + 1)
        finally:
            os.close(fd)
        if len(data) != entry["size"]:
            raise AgentError("'%s' changed size while it was being sent." % rel,
                             "Run the sync again once the file is no longer being written.")
        sha = entry["sha256"]
        if sha is None:
            sha = hashlib.sha256(data).hexdigest()   # small: no block digests
            key = entry.get("key")
            if key:
                self.hashed[rel] = key + [sha, None]
        self.index.append([rel, len(data), entry["mode"], entry["mtime_ns"], sha])
        self.data.append(data)
        self.size += len(data)
        if self.size >= self.MAX_BYTES or len(self.index) >= self.MAX_FILES:
            self.send()

    def send(self):
        if self.index:
            records = {"CUBE.op": "pack", "CUBE.index": json.dumps(self.index)}
            # One piece: written as it is (TarWriter copies smaller pieces into its buffer).
            self.tar.addfile(Member(self.index[0][0], self.size, records), [b"".join(self.data)])
            self.index, self.data, self.size = [], [], 0


def pack_index(member):
    """The rows of a received pack, refused unless they are rows Pack writes and their sizes
    add up to the member's data."""
    try:
        index = json.loads(member.pax_headers.get("CUBE.index", ""))
        if all(type(rel) is str and type(sha) is str and all(
                type(n) is int and n >= 0 for n in (size, mode, mtime))
               for rel, size, mode, mtime, sha in index) \
                and sum(row[1] for row in index) == member.size <= MAX_PACK:
            return index
    except (ValueError, TypeError):
        pass
    raise AgentError("Refusing tar member '%s': its pack index is not a cube sync index, or "
                     "does not match its data." % member.name,
                     "The other side sent a stream cube did not make; do not trust it.")


def current_umask():
    """The process's umask, read from /proc where it can be (setting it to read it, as
    os.umask does, would touch files that other threads create in that instant)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


class PackLander:
    """Lands the files of received packs on worker threads. `land` queues one pack whose paths
    were already checked; `drain` waits for every queued pack, adds what landed to `verified`
    and `report`, and raises the first failure. The stream's reader drains before any member
    that is not a pack (a link, delete or rmdir could otherwise change a folder under a file
    still being written) and at the end."""

    WORKERS = 2      # on 2 cores 1 and 2 measured alike and 3 worse: the kernel work contends
    IN_FLIGHT = 6    # packs queued at most (about 4 MiB each)

    def __init__(self, finisher, progress):
        self.finisher, self.progress = finisher, progress
        # Imported here: start-up time that only receivers need (see agent.landing.Finisher).
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415
        self.pool = ThreadPoolExecutor(self.WORKERS)
        self.futures: list = []
        self.umask = current_umask()
        self.processes = 0   # threads only (agent.packforks forks)
        self.cache_rows: dict = {}   # (agent.packforks): here, what landed is in the Finisher

    def land(self, rows, dests, data):
        if len(self.futures) >= self.IN_FLIGHT:   # bound the memory held by queued packs
            self.futures[-self.IN_FLIGHT].result()
        self.futures.append(self.pool.submit(land_pack, rows, dests, data, self.umask,
                                             self.finisher, self.progress))

    def drain(self, verified, report, raise_failure=True):
        first = None
        for future in self.futures:
            done, size, landed, err = future.result()
            with self.finisher.lock:
                self.finisher.landed.update(landed)
            verified.update(done)
            report["files"] += len(done)
            report["bytes"] += size
            first = first or err
        self.futures = []
        if first is not None and raise_failure:
            raise first

    def close(self, verified, report):
        """Wait for every queued pack (after a failure elsewhere: theirs is not raised)."""
        self.drain(verified, report, raise_failure=False)
        self.pool.shutdown(wait=True)


def land_pack(rows, dests, data, umask, finisher, progress=None):
    """Land one pack's files: (done {rel: (sha256, None)}, bytes landed, landed {dest: stat},
    the exception that stopped it or None; what landed before a failure still counts).
    Without durability (or a Finisher) each file is renamed here and its stat taken through its
    descriptor (no path lookup, and surely our file); else the Finisher renames, durably."""
    view, offset, done = memoryview(data), 0, {}
    landed: dict = {}
    direct = landed if finisher is None or not finisher.durable else None
    try:
        for (rel, size, mode, mtime, sha), dest in zip(rows, dests):
            done[rel] = _land_one(view[offset:offset + size], dest, rel, sha, mode, mtime,
                                  umask, direct, finisher)
            offset += size
            if progress:
                progress(size)
    except BaseException as err:
        return done, offset, landed, err
    return done, offset, landed, None


def _land_one(data, dest, rel, want_sha, mode, mtime, umask, landed, finisher):
    """Verified before anything is written; the temp file gets its data, mode and mtime
    through one descriptor (created with its mode where the umask allows, else chmod)."""
    sha = hashlib.sha256(data).hexdigest()   # under BLOCK_THRESHOLD: no block digests
    if sha != want_sha:
        check_sha(rel, want_sha, sha)
    perm = mode & 0o7777
    tmp, fd = new_temp_file(dest, perm & 0o777)
    try:
        try:
            write_all(fd, data)
            if perm != perm & 0o777 & ~umask:
                os.fchmod(fd, perm)
            os.utime(fd, ns=(mtime, mtime))
            # A file of SWAP_MIN or more replacing another goes through Finisher._rename.
            if landed is not None and (finisher is None or len(data) < SWAP_MIN):
                os.replace(tmp, dest)
                tmp = None
                landed[dest] = os.fstat(fd)   # the ctime the rename set, as lstat sees it
        finally:
            os.close(fd)
        if tmp is not None:
            finisher.submit(tmp, dest, len(data))
    except BaseException:
        if tmp is not None:
            unlink_quiet(tmp)
        raise
    return sha, None
