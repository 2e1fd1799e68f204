"""Landing received files durably: verified temp files are renamed into place in batches, each
batch made durable by one syncfs (agent.tarstream hands them over as they pass their check).
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
    files is made durable by one syncfs of its filesystem instead of one fsync each (ms apiece
    on a journalled disk); a few files (large ones fill a batch alone) are fsynced one by one,
    since syncfs would also wait for every other writer's data. Without syncfs (not Linux)
    every file is fsynced."""

    BATCH_FILES, BATCH_BYTES = 4096, 256 << 20
    SYNCFS_MIN = 64   # fewer files (or folders) than this are fsynced one by one

    def __init__(self, top):
        self.top, self.batch, self.batch_bytes = top, [], 0
        self.dirs = set()   # folders files were renamed into: made durable at the end
        # Imported here: 17 ms of start-up that only receivers need (every agent start pays
        # for module-level imports, and most verbs never apply a stream).
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415
        self.pool = ThreadPoolExecutor(1)   # one worker: batches land in stream order
        self.errors, self.landed = [], set()
        self.lock = threading.Lock()

    def submit(self, tmp, dest, size):
        self.batch.append((tmp, dest))
        self.batch_bytes += size
        if len(self.batch) >= self.BATCH_FILES or self.batch_bytes >= self.BATCH_BYTES:
            self._flush()

    def _flush(self):
        if self.batch:
            self.pool.submit(self._land, self.batch)
            self.batch, self.batch_bytes = [], 0

    def _land(self, batch):
        try:
            if FSYNC:
                self._durable([tmp for tmp, _ in batch])
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

    def _durable(self, paths):
        """fsync each path; many at once with one syncfs instead, which also waits for other
        writers' data on that filesystem, so only where it saves many fsyncs."""
        if len(paths) < self.SYNCFS_MIN or not sync_filesystem(self.top):
            for path in paths:
                fsync_path(path)

    def close(self):
        """Land what is left, wait, make the renames durable; raise the first failure."""
        self._flush()
        self.pool.shutdown(wait=True)
        if FSYNC and self.landed:
            try:
                self._durable(sorted(self.dirs))
            except OSError as err:
                self.errors.append(err)
        if self.errors:
            raise self.errors[0]


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

