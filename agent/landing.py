"""Landing received files durably: verified temp files are renamed into place in batches, each
batch's data made durable first, by one syncfs or by fsyncs side by side (see Finisher);
agent.tarstream hands files over as they pass their check.
"""

from __future__ import annotations

import os
import threading

# Data reaches the disk before its rename. CUBE_SYNC_FSYNC=0 (benchmarks only) measures its cost.
FSYNC = os.environ.get("CUBE_SYNC_FSYNC", "1") != "0"


class Finisher:
    """Lands verified temp files by rename, durably, in batches, on a worker thread while the
    stream goes on. A batch's temp files are made durable, then renamed; at the end the folders
    they were renamed into are made durable. A crash therefore leaves every file its old or its
    complete new version (never a renamed file whose data is missing). A batch of many small
    files is made durable by one syncfs of its filesystem instead of one fsync each (each a
    journal commit); a few files (large ones fill a batch alone), or a batch arriving while
    other writers hold much unwritten data that syncfs would wait for, are fsynced side by side
    (concurrent fsyncs share journal commits). Without syncfs (not Linux) every file is
    fsynced."""

    BATCH_FILES, BATCH_BYTES = 4096, 256 << 20
    SYNCFS_MIN = 64   # fewer files (or folders) than this are fsynced side by side
    # Measured here: 10,000 small files took 1.3 s longer with fsyncs than with one syncfs;
    # at about 500 MB/s of writeback, the time to write 64 KiB a file.
    FSYNC_EQUIVALENT = 64 << 10

    def __init__(self, top):
        self.top, self.batch, self.batch_bytes = top, [], 0
        self.dirs = set()   # folders files were renamed into: made durable at the end
        # Imported here: 17 ms of start-up that only receivers need (every agent start pays
        # for module-level imports, and most verbs never apply a stream).
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415
        self.pool = ThreadPoolExecutor(1)   # one worker: batches land in stream order
        self.fsyncs = ThreadPoolExecutor(16)   # concurrent fsyncs share journal commits
        self.errors, self.landed, self.futures = [], set(), []
        self.lock = threading.Lock()

    def submit(self, tmp, dest, size):
        self.batch.append((tmp, dest))
        self.batch_bytes += size
        if len(self.batch) >= self.BATCH_FILES or self.batch_bytes >= self.BATCH_BYTES:
            self._flush()

    def _flush(self):
        if self.batch:
            self.futures.append(self.pool.submit(self._land, self.batch, self.batch_bytes))
            self.batch, self.batch_bytes = [], 0

    def _land(self, batch, size):
        try:
            if FSYNC:
                self._durable([tmp for tmp, _ in batch], size)
        except OSError as err:
            for tmp, _ in batch:
                unlink_quiet(tmp)
            with self.lock:
                self.errors.append(err)
            return
        for tmp, dest in batch:
            try:
                os.replace(tmp, dest)
            except OSError as err:
                unlink_quiet(tmp)
                with self.lock:
                    self.errors.append(err)
                continue
            with self.lock:
                self.landed.add(dest)
                self.dirs.add(os.path.dirname(dest))

    def _durable(self, paths, size):
        """fsync each path, side by side; or, for many paths, one syncfs, unless the cache
        holds more of other writers' unwritten data than those fsyncs would cost (syncfs waits
        for all of it): one fsync cost about as much as writing back FSYNC_EQUIVALENT here."""
        if len(paths) >= self.SYNCFS_MIN \
                and dirty_bytes() - size <= len(paths) * self.FSYNC_EQUIVALENT \
                and sync_filesystem(self.top):
            return
        list(self.fsyncs.map(fsync_path, paths))   # raises the first failure

    def close(self):
        """Land what is left, wait, make the renames durable; raise the first failure."""
        self._flush()
        self.pool.shutdown(wait=True)
        failed = [f.exception() for f in self.futures]
        self.errors += [err for err in failed if err is not None]
        if FSYNC and self.landed:
            try:
                self._durable(sorted(self.dirs), 0)
            except OSError as err:
                self.errors.append(err)
        self.fsyncs.shutdown(wait=True)
        if self.errors:
            raise self.errors[0]


def dirty_bytes():
    """Unwritten data in the page cache, all filesystems (Linux's /proc/meminfo `Dirty:`);
    0 where it cannot be read."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"Dirty:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


_SYNCFS: list = []   # [libc syncfs or None], looked up once


def sync_filesystem(path):
    """syncfs(2) on the filesystem holding path: True once done, False where there is none."""
    if not _SYNCFS:
        try:
            import ctypes  # noqa: PLC0415 (only a receiver that fsyncs needs it)
            _SYNCFS.append(ctypes.CDLL(None, use_errno=True).syncfs)
        except (ImportError, OSError, AttributeError):
            _SYNCFS.append(None)
    if _SYNCFS[0] is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS[0](fd) != 0:
            import ctypes  # noqa: PLC0415 (loaded above)
            code = ctypes.get_errno()
            raise OSError(code, "syncfs: %s" % os.strerror(code))
    finally:
        os.close(fd)
    return True


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quiet(path):
    try:
        os.unlink(path)
    except OSError:
        pass

