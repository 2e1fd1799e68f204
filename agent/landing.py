"""Landing received files durably: verified temp files are renamed into place in batches, each
batch made durable by one syncfs (agent.tarstream hands them over as they pass their check).
"""

from __future__ import annotations

import os
import threading

# Data reaches the disk before its rename. CUBE_SYNC_FSYNC=0 (benchmarks only) measures its cost.
FSYNC = os.environ.get("CUBE_SYNC_FSYNC", "1") != "0"


class Finisher:
    """Lands verified temp files by rename, durably, in batches. A batch's temp files are made
    durable together (one syncfs of their filesystem), then renamed; after the last batch one
    more syncfs makes the renames durable. That runs on a worker thread while the stream goes
    on. A crash therefore leaves every file its old or its complete new version (never a
    renamed file whose data is missing), as one fsync per file before its rename would, for
    two syncfs calls per batch instead of one fsync each (ms apiece on a journalled disk).
    Without syncfs (not Linux) each temp file is fsynced before its rename and each folder
    once at the end."""

    BATCH_FILES, BATCH_BYTES = 4096, 256 << 20

    def __init__(self, top):
        self.top, self.batch, self.batch_bytes = top, [], 0
        self.dirs = set()   # folders files were renamed into (the fallback fsyncs them)
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
            if FSYNC and not sync_filesystem(self.top):
                for tmp, _ in batch:
                    fsync_path(tmp)
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

    def close(self):
        """Land what is left, wait, make the renames durable; raise the first failure."""
        self._flush()
        self.pool.shutdown(wait=True)
        if FSYNC and self.landed:
            try:
                if not sync_filesystem(self.top):
                    for folder in self.dirs:
                        fsync_path(folder)
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

