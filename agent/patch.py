"""A block patch applied without reading the blocks that did not change.

The receiver's hash cache (keyed by size, mtime, inode and ctime) vouches for the old file's
block digests. Unchanged runs of blocks are copied by the kernel (copy_file_range: no trip
through Python, and a reflink on filesystems that share extents), received blocks are hashed
as they are written, and the new file's digest (a hash list, see agent.manifest) follows from
both lists: it must match the sender's before the file replaces the old one.
"""

from __future__ import annotations

import errno
import os

from .manifest import BLOCK_SIZE, Digester
from .protocol import AgentError

_COPY_FALLBACK = (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM)


def patch_from_cache(old_fd, fd, tar, changed, size, old_blocks, progress):
    """Write the new file to fd; returns (digest, block digests)."""
    digester, count, i = Digester(size), -(-size // BLOCK_SIZE), 0
    while i < count:
        if i in changed:
            n = min(BLOCK_SIZE, size - i * BLOCK_SIZE)
            data = read_exact(tar, n)
            digester.update(data)
            _pwrite_all(fd, data, i * BLOCK_SIZE)
            if progress:
                progress(n)
            i += 1
            continue
        j = i
        while j < count and j not in changed:
            j += 1
        if j > len(old_blocks):
            raise AgentError("A block patch names blocks the old file does not have.",
                             "Run the sync again; it sends the whole file.")
        for k in range(i, j):
            digester.add_block(old_blocks[k])
        start = i * BLOCK_SIZE
        copy_range(old_fd, fd, start, min(j * BLOCK_SIZE, size) - start)
        i = j
    return digester.result()


def copy_range(src, dst, offset, length):
    """Copy length bytes at offset from src to the same offset in dst, in the kernel when it
    can."""
    while length > 0:
        n = _copy_some(src, dst, offset, length)
        if n <= 0:
            raise AgentError("The file to patch changed or shrank during the sync.",
                             "Run the sync again.")
        offset += n
        length -= n


def _copy_some(src, dst, offset, length):
    copy = getattr(os, "copy_file_range", None)
    if copy is not None:
        try:
            return copy(src, dst, min(length, 1 << 30), offset, offset)
        except OSError as err:
            if err.errno not in _COPY_FALLBACK:
                raise
    data = os.pread(src, min(length, 1 << 20), offset)
    if data:
        _pwrite_all(dst, data, offset)
    return len(data)


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_exact(src, n):
    """Exactly n bytes of a sync stream; a stream that ends first is a cut connection."""
    parts, got = [], 0
    while got < n:
        data = src.read(n - got)
        if not data:
            raise AgentError("The sync stream ended early (connection cut?).",
                             "Run the sync again; it resumes where it stopped.")
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)
