"""The sync stream: a pax tar whose members are all regular entries carrying a `CUBE.op` header
(file, pack, commit, patch, link, dir, delete, rmdir); any other member (link, device, fifo, escape)
is refused. `write_stream` writes one from a manifest and a plan; `apply_stream` applies one,
checking every path and landing every file by temp name + sha256 check + rename, in batches
(agent.landing; durable when asked). Small files travel in packs (agent.packs); the tar framing
itself is agent.tarformat.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import tarfile

from .landing import Finisher, check_sha, new_temp_file, temp_name, unlink_quiet, write_all
from .manifest import (
    BLOCK_SIZE,
    IO_CHUNK,
    TMP_PREFIX,
    Digester,
    cached_blocks,
    changed_blocks,
    check_link,
    check_rel,
    gc_paused,
    load_cache,
    update_cache,
)
from .packforks import ForkedPackLander
from .packs import SMALL_FILE, Pack, PackLander, pack_index
from .patch import patch_from_cache
from .protocol import AgentError
from .tarformat import Member, TarReader, TarWriter

# -- sending --

def _info(rel, op, payload=0, **pax):
    records = {"CUBE." + k: str(v) for k, v in pax.items()}
    records["CUBE.op"] = op
    return Member(rel, payload, records)


def _hashing(chunks, digester):
    """Pass chunks through, hashing them on the way."""
    for chunk in chunks:
        digester.update(chunk)
        yield chunk


def _add_hashed_file(tar, f, rel, entry, meta):
    """Stream a file not hashed yet; its digest follows in a `commit` member."""
    size, digester = entry["size"], Digester(entry["size"])
    del meta["sha256"]
    chunks = _hashing(tar.ranges(f, [(0, size)], BLOCK_SIZE), digester)
    tar.addfile(_info(rel, "file", size, **meta), chunks)
    sha, blocks = digester.result()
    tar.addfile(_info(rel, "commit", sha256=sha))
    key = entry.get("key")
    return {rel: key + [sha, blocks]} if key else {}


def _add_file(tar, top, rel, entry, base_blocks):
    path, size = os.path.join(top, rel), entry["size"]
    meta = dict(sha256=entry["sha256"], mode=entry["mode"], mtime_ns=entry["mtime_ns"],
                size=size)
    with open(path, "rb", buffering=0) as f:
        if entry["sha256"] is None:
            return _add_hashed_file(tar, f, rel, entry, meta)
        if base_blocks is not None:
            idx = changed_blocks(entry["blocks"], base_blocks)
            spans = [(i * BLOCK_SIZE, min(BLOCK_SIZE, size - i * BLOCK_SIZE)) for i in idx]
            ti = _info(rel, "patch", sum(n for _, n in spans),
                       blocks=",".join(map(str, idx)), **meta)
            tar.addfile(ti, tar.ranges(f, spans))
        else:
            tar.addfile(_info(rel, "file", size, **meta), tar.ranges(f, [(0, size)]))
    return {}


def write_stream(top, ops, out, manifest):
    """Write the sync stream for ops (entries taken from top's manifest) to a binary file.
    Returns hash-cache rows for files hashed while streaming."""
    with gc_paused():   # objects by the file, no cycles: see manifest.gc_paused
        return _write_stream(top, ops, out, manifest)


def _write_stream(top, ops, out, manifest):
    tar = TarWriter(out)
    hashed: dict = {}
    pack, files = Pack(tar, hashed), manifest["files"]
    for op in ops:
        entry = files.get(op["path"]) if op["op"] == "file" else None
        if entry is not None and entry["size"] <= SMALL_FILE and "base_blocks" not in op:
            pack.add(top, check_rel(op["path"]), entry)
            continue
        pack.send()   # members keep the order of their ops
        hashed.update(_add_op(tar, top, op, manifest) or {})
    pack.send()
    tar.close()
    return hashed


def _add_op(tar, top, op, manifest):
    rel, kind = check_rel(op["path"]), op["op"]
    if kind == "file":
        entry = manifest["files"].get(rel)
        if entry is None:
            raise AgentError("'%s' is not a file in %s." % (rel, top),
                             "It was removed or replaced since the sync began; run it again.")
        return _add_file(tar, top, rel, entry, op.get("base_blocks"))
    elif kind == "link" and rel in manifest["links"]:
        tar.addfile(_info(rel, "link", target=check_link(rel, manifest["links"][rel])))
    elif kind == "dir" and rel in manifest["dirs"]:
        tar.addfile(_info(rel, "dir", mode=manifest["dirs"][rel]))
    elif kind in ("delete", "rmdir"):
        tar.addfile(_info(rel, kind))
    else:
        raise AgentError("Cannot send '%s' as %s: no such entry in %s." % (rel, kind, top),
                         "It changed since the sync began; run it again.")


# -- receiving: every path is checked, every file lands by temp name + verify + rename --

def _safe_parent(top, rel, seen):
    """Create missing parents of rel under top; refuse a parent that is a symlink or file.
    `seen`: folders this stream already checked or made, as absolute paths and as the relative
    parents of checked files (emptied by any member that removes or links, so that a folder
    swapped for a link in between is checked again). top is a real path without a trailing /."""
    parent = rel.rpartition("/")[0]
    if parent in seen:   # the common case, one lookup: a sibling was checked already
        return top + "/" + rel
    cur = top
    for p in parent.split("/") if parent else ():
        cur = os.path.join(cur, p)
        if cur in seen:
            continue
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur)
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise AgentError("Refusing to write '%s': its parent '%s' is a symlink or not "
                                 "a directory." % (rel, os.path.relpath(cur, top)),
                                 "A sync never writes through a symlink.")
        seen.add(cur)
    seen.add(parent)
    return top + "/" + rel


def clean_stale_tmp(top):
    """Remove temp files an interrupted sync left behind."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + dirnames:
            if name.startswith(TMP_PREFIX):
                path = os.path.join(dirpath, name)
                if not os.path.isdir(path) or os.path.islink(path):
                    os.unlink(path)


def _hash_and_write(src, fd, size, progress, durable):
    """Copy size bytes from src to fd, hashing as we go (block digests for large files)."""
    digester, left, flushed = Digester(size), size, 0
    while left:
        data = src.read(min(IO_CHUNK, left))
        if not data:
            raise AgentError("The sync stream ended early (connection cut?).",
                             "Run the sync again; it resumes where it stopped.")
        left -= len(data)
        digester.update(data)
        write_all(fd, data)
        if progress:
            progress(len(data))
        if durable:
            flushed = _start_writeback(fd, flushed, size - left)
    return digester.result()


WRITEBACK_CHUNK = 8 << 20


def _start_writeback(fd, flushed, written):
    """Start writing a large file's data to disk as it arrives (asynchronously), so that the
    fsync before its rename waits for the last few MiB, not for all of it. Returns the offset
    up to which writeback was started."""
    if written - flushed < WRITEBACK_CHUNK or not hasattr(os, "posix_fadvise"):
        return flushed
    # On Linux, DONTNEED starts writeback of dirty pages in the range (WB_SYNC_NONE) and drops
    # only pages that are already clean; it never loses data.
    os.posix_fadvise(fd, flushed, written - flushed, os.POSIX_FADV_DONTNEED)
    return written


def _finish(tmp, dest, rel, pax, got_sha, finisher):
    check_sha(rel, pax["CUBE.sha256"], got_sha)
    os.chmod(tmp, int(pax["CUBE.mode"]) & 0o7777)
    mtime = int(pax["CUBE.mtime_ns"])
    os.utime(tmp, ns=(mtime, mtime))
    finisher.submit(tmp, dest, os.lstat(tmp).st_size)


def _receive_file(tar, member, dest, rel, progress, finisher, pending):
    tmp, fd = new_temp_file(dest)
    try:
        try:
            sha, blocks = _hash_and_write(tar, fd, member.size, progress, finisher.durable)
        finally:
            os.close(fd)
        if "CUBE.sha256" in member.pax_headers:
            _finish(tmp, dest, rel, member.pax_headers, sha, finisher)
        else:   # hashed by the sender while streaming: the next member carries the sha256
            pending.append((tmp, dest, rel, member.pax_headers, sha))
    except BaseException:
        unlink_quiet(tmp)
        raise
    return sha, blocks


def _receive_pack(tar, member, top, seen, packs):
    """A `pack` member (agent.packs): its paths are checked here, in stream order; its files
    are verified and written on the PackLander's threads."""
    index = pack_index(member)
    rows = [(check_rel(rel), size, mode, mtime, sha) for rel, size, mode, mtime, sha in index]
    dests = [_safe_parent(top, row[0], seen) for row in rows]
    packs.land(rows, dests, tar.take(member.size))


def _receive_patch(tar, member, dest, rel, progress, finisher, cache):
    """New file = old blocks + received blocks. When the hash cache still vouches for the old
    file's block digests, unchanged blocks are copied in the kernel and never read here;
    otherwise one pass reads, hashes and writes them all."""
    pax = member.pax_headers
    try:
        st = os.lstat(dest)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError:
        raise AgentError("A block patch for '%s' arrived but there is no regular file to patch."
                         % rel, "Run the sync again; it sends the whole file.") from None
    size = int(pax["CUBE.size"])
    changed = set(int(i) for i in pax["CUBE.blocks"].split(",") if i)
    tmp, fd = new_temp_file(dest)
    try:
        try:
            with open(dest, "rb", buffering=0) as old:
                known = cached_blocks(cache, rel, os.fstat(old.fileno()))
                if known is not None and cached_blocks(cache, rel, st) is not None:
                    sha, blocks = patch_from_cache(old.fileno(), fd, tar, changed, size, known,
                                                   progress)
                else:
                    pieces = _patched_blocks(old, tar, changed, size, progress)
                    sha, blocks = _hash_and_write(_Chunks(pieces), fd, size, None,
                                                  finisher.durable)
        finally:
            os.close(fd)
        _finish(tmp, dest, rel, pax, sha, finisher)
    except BaseException:
        unlink_quiet(tmp)
        raise
    return sha, blocks


def _patched_blocks(old, new, changed, size, progress):
    for i in range((size + BLOCK_SIZE - 1) // BLOCK_SIZE):
        n = min(BLOCK_SIZE, size - i * BLOCK_SIZE)
        if i in changed:
            data = new.read(n)
            if progress:
                progress(n)
        else:
            old.seek(i * BLOCK_SIZE)
            data = old.read(n)
        if len(data) != n:
            raise AgentError("The sync stream ended early, or the file to patch changed.",
                             "Run the sync again; it resumes where it stopped.")
        yield data


class _Chunks:
    """read() over an iterator of byte strings (each read returns the next one)."""

    def __init__(self, it):
        self.it = it

    def read(self, n=-1):
        return next(self.it, b"")


def _receive_link(dest, rel, target):
    check_link(rel, target)
    tmp = temp_name(dest)
    os.symlink(target, tmp)
    os.replace(tmp, dest)


def _delete(dest, rel, rmdir):
    try:
        if rmdir:
            os.rmdir(dest)
        elif stat.S_ISDIR(os.lstat(dest).st_mode):
            raise AgentError("Refusing to delete directory '%s' as a file." % rel)
        else:
            os.unlink(dest)
        return 1
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            return 0   # gone already, or still holds ignored files: keep it
        raise


def _check_member(member):
    """Only our own regular members are accepted: never links, devices, fifos or dirs."""
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise AgentError("Refusing tar member '%s': it is a link, device, fifo or directory, "
                         "which a cube sync never sends." % member.name,
                         "The other side sent a stream cube did not make; do not trust it.")
    op = member.pax_headers.get("CUBE.op")
    if op not in ("file", "pack", "commit", "patch", "link", "dir", "delete", "rmdir"):
        raise AgentError("Refusing tar member '%s': not a cube sync entry." % member.name,
                         "The other side sent a stream cube did not make; do not trust it.")
    return op, check_rel(member.name)


def apply_stream(top, instream, allow_delete=False, cache_file=None, progress=None,
                 durable=True, forked=False):
    """Apply a sync stream under top. Returns counts; files verified land by rename, made
    durable first when `durable` (see agent.landing.Finisher). `forked`: packs land in forked
    processes where that is safe (agent.packforks; the agent's `receive` only)."""
    with gc_paused():   # objects by the file, no cycles: see manifest.gc_paused
        return _apply_stream(top, instream, allow_delete, cache_file, progress, durable,
                             forked)


def _apply_stream(top, instream, allow_delete, cache_file, progress, durable, forked):
    tar = TarReader(instream)
    try:   # nothing is made on this side before a stream has begun (a push may give up first)
        first = tar.next()
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as err:
        raise _damaged(err) from err
    os.makedirs(top, exist_ok=True)
    top = os.path.realpath(top)
    clean_stale_tmp(top)
    report, finisher = {"files": 0, "bytes": 0, "deleted": 0}, Finisher(top, durable)
    packs = ForkedPackLander(finisher) if forked and not durable and progress is None \
        else PackLander(finisher, progress)
    verified: dict = {}
    cache = load_cache(cache_file) if cache_file else {}
    pending: list = []   # at most one file waiting for its `commit` member
    seen: set = set()
    try:
        try:
            for member in itertools.chain((first,) if first else (), iter(tar.next, None)):
                _apply_member(tar, member, top, allow_delete, progress, finisher, report,
                              verified, pending, cache, seen, packs)
            packs.drain(verified, report)
            if pending:
                _commit(None, None, pending, finisher)
        finally:
            for tmp in [p[0] for p in pending]:
                unlink_quiet(tmp)
            packs.close(verified, report)   # packs still landing after a failure: wait
            finisher.close()   # files verified before a failure still land
            report["landing_processes"] = packs.processes
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as err:
        raise _damaged(err) from err
    except OSError as err:
        raise AgentError("Could not write into %s: %s." % (top, err),
                         "Check free disk space and permissions, then run the sync again.") from err
    finally:
        stats = finisher.landed
        update_cache(cache_file, {rel: (stats[top + "/" + rel], sha, blocks)
                                  for rel, (sha, blocks) in verified.items()
                                  if top + "/" + rel in stats}, packs.cache_rows)
    return report


def _damaged(err):
    return AgentError("The sync stream is damaged or was cut (%s)." % err,
                      "Run the sync again; files already received are kept.")


def _commit(member, rel, pending, finisher):
    """A file streamed before its hash lands only when its `commit` member confirms it."""
    tmp, dest, got_rel, pax, sha = pending.pop()
    try:
        if member is None or got_rel != rel:
            raise AgentError("'%s' arrived without its checksum; it was not installed." % got_rel,
                             "Run the sync again.")
        pax = dict(pax, **{"CUBE.sha256": member.pax_headers.get("CUBE.sha256")})
        _finish(tmp, dest, rel, pax, sha, finisher)
    except BaseException:
        unlink_quiet(tmp)
        raise


def _apply_member(tar, member, top, allow_delete, progress, finisher, report, verified,
                  pending, cache, seen, packs):
    op, rel = _check_member(member)
    if op != "pack":
        packs.drain(verified, report)   # no member changes the tree under a landing pack
    if pending or op == "commit":
        if not pending:
            raise AgentError("Refusing tar member '%s': a checksum with no file before it." % rel,
                             "The other side sent a stream cube did not make; do not trust it.")
        return _commit(member if op == "commit" else None, rel, pending, finisher)
    if op in ("delete", "rmdir") and not allow_delete:
        raise AgentError("Refusing to delete '%s': this sync may not delete files." % rel)
    if op in ("link", "delete", "rmdir"):
        seen.clear()
    if op == "pack":
        return _receive_pack(tar, member, top, seen, packs)
    dest = _safe_parent(top, rel, seen)
    if op == "file":
        verified[rel] = _receive_file(tar, member, dest, rel, progress, finisher, pending)
    elif op == "patch":
        verified[rel] = _receive_patch(tar, member, dest, rel, progress, finisher, cache)
    elif op == "link":
        _receive_link(dest, rel, member.pax_headers.get("CUBE.target", ""))
    elif op == "dir":
        _receive_dir(dest, rel, int(member.pax_headers["CUBE.mode"]))
    else:
        report["deleted"] += _delete(dest, rel, op == "rmdir")
        return
    report["files"] += op != "dir"
    report["bytes"] += member.size


def _receive_dir(dest, rel, mode):
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        os.mkdir(dest)
    else:
        if not stat.S_ISDIR(st.st_mode):
            raise AgentError("Refusing to make directory '%s': something else is there." % rel)
    os.chmod(dest, mode & 0o7777 | 0o700)


