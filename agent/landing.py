"""Landing received files: verified temp files are renamed into place in batches on a worker
thread; a durable landing makes each batch's data durable first, by one syncfs or by fsyncs side
by side (see Finisher). agent.tarstream hands files over as they pass their check.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import stat
import threading

from .protocol import AgentError

TMP_PREFIX = ".cube-tmp-"   # temp files of a landing; scans skip them
SWAP_MIN = 1 << 20   # see Finisher._rename: smaller files cost little to flush
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_temp_numbers = itertools.count(1)   # next() on it is atomic: threads share it
_pid = [os.getpid()]   # a system call per temp name adds up over 10,000 files
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def temp_name(dest):
    """A name beside dest for what will replace it (unique in this process and its threads)."""
    return "%s%s%d-%d" % (dest[:dest.rfind("/") + 1], TMP_PREFIX, _pid[0], next(_temp_numbers))


def new_temp_file(dest, mode=0o600):
    """(path, descriptor) of a new temp file beside dest, opened for writing; never an
    existing file or a symlink's target."""
    tmp = temp_name(dest)
    return tmp, os.open(tmp, _OPEN_NEW, mode)


_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)   # Linux; Python >= 3.10 names it
PIPE_SIZE = 1 << 20   # the most an unprivileged process may ask for, by default


def widen_pipe(fd):
    """A 1 MiB pipe instead of 64 KiB: fewer wake-ups on both ends (a 4 MiB pack crosses in
    4, not 64). Best effort (Linux only, capped by /proc/sys/fs/pipe-max-size)."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


def check_sha(rel, want_sha, got_sha):
    if got_sha != want_sha:
        raise AgentError("'%s' arrived with the wrong sha256 (changed during the sync, or the "
                         "stream was damaged); the previous version is kept." % rel,
                         "Run the sync again.")


def write_all(fd, data):
    done = os.write(fd, data)   # a regular file takes it whole, short of an error
    if done < len(data):
        view = memoryview(data)[done:]
        while view:
            view = view[os.write(fd, view):]


class Finisher:
    """Lands verified temp files by rename, in batches, on a worker thread while the stream goes
    on. Durable (`durable=True`): a batch's temp files are made durable, then renamed; at the
    end the folders they were renamed into are made durable. A crash of the machine therefore
    leaves every file its old or its complete new version (never a renamed file whose data is
    missing). Not durable: the renames happen at once and the kernel writes the data back in its
    own time, as after rsync or cp; readers still never see a partial file. A batch of many small
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

    def __init__(self, top, durable=True):
        self.top, self.durable, self.batch, self.batch_bytes = top, durable, [], 0
        self.dirs = set()   # folders files were renamed into: made durable at the end
        # Imported here: 17 ms of start-up that only receivers need (every agent start pays
        # for module-level imports, and most verbs never apply a stream).
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415
        self.pool = ThreadPoolExecutor(1)   # one worker: batches land in stream order
        self.fsyncs = ThreadPoolExecutor(16)   # concurrent fsyncs share journal commits
        self.errors, self.futures = [], []
        self.landed = {}   # dest: its stat after the rename (for the receiver's hash cache)
        self.lock = threading.Lock()
        self.submitting = threading.Lock()   # pack workers submit side by side

    def submit(self, tmp, dest, size):
        if not self.durable:   # nothing to wait for: rename now, in the caller's thread
            self._rename(tmp, dest, size)
            return
        with self.submitting:
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
            if self.durable:
                self._durable([tmp for tmp, _ in batch], size)
        except OSError as err:
            for tmp, _ in batch:
                unlink_quiet(tmp)
            with self.lock:
                self.errors.append(err)
            return
        for tmp, dest in batch:
            self._rename(tmp, dest)

    def _rename(self, tmp, dest, size=0):
        """Put tmp in dest's place. ext4 (auto_da_alloc) writes a file's data out before a
        rename lets it replace another file: 0.23 s for 256 MiB here, on the user's clock.
        Where durability was not asked for, a large file is swapped in atomically instead
        (RENAME_EXCHANGE, which ext4 does not flush) and the old version removed."""
        try:
            if not self.durable and size >= SWAP_MIN and _replaceable_by_swap(dest) \
                    and exchange(tmp, dest):
                unlink_quiet(tmp)   # the old version, now under the temp name
            else:
                os.replace(tmp, dest)
            st = os.lstat(dest)
        except OSError as err:
            unlink_quiet(tmp)
            with self.lock:
                self.errors.append(err)
            return
        with self.lock:
            self.landed[dest] = st
            if self.durable:
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
        if self.durable and self.landed:
            try:
                self._durable(sorted(self.dirs), 0)
            except OSError as err:
                self.errors.append(err)
        self.fsyncs.shutdown(wait=True)
        if self.errors:
            raise self.errors[0]


def boot_id():
    """Changes on every boot (Linux); None elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


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


_LIBC: list = []   # [ctypes module, libc] or [None], loaded once, by the first caller


def _libc():
    """(ctypes, libc) or None where there is no C library to call."""
    if not _LIBC:
        try:
            import ctypes  # noqa: PLC0415 (only receivers need it: start-up time for the rest)
            _LIBC.append((ctypes, ctypes.CDLL(None, use_errno=True)))
        except (ImportError, OSError):
            _LIBC.append(None)
    return _LIBC[0]


def _libc_call(name, *args):
    """libc's `name`(*args): True once it succeeded, False where it does not exist; raises
    OSError on failure."""
    loaded = _libc()
    fn = getattr(loaded[1], name, None) if loaded else None
    if fn is None:
        return False
    if fn(*args) != 0:
        code = loaded[0].get_errno()
        raise OSError(code, "%s: %s" % (name, os.strerror(code)))
    return True


def sync_filesystem(path):
    """syncfs(2) on the filesystem holding path: True once done, False where there is none."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _libc_call("syncfs", fd)
    finally:
        os.close(fd)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV)


def exchange(a, b):
    """Swap two names atomically (Linux renameat2 RENAME_EXCHANGE): True once swapped, False
    where the system or the filesystem cannot."""
    try:
        return _libc_call("renameat2", _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                          _RENAME_EXCHANGE)
    except OSError as err:
        if err.errno in _NO_EXCHANGE:
            return False
        raise


def _replaceable_by_swap(path):
    """A regular file or a symlink (never a folder) is there to be swapped out."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


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

