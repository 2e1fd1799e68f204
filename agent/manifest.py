"""Manifests and plans, shared by both ends of a sync (the host's agent and the controller).

A manifest is {exists, files: {rel: {size, mtime_ns, mode, sha256, blocks?}}, dirs: {rel: mode},
links: {rel: target}}. Below 4 MiB `sha256` is the file's sha256; from 4 MiB on the file has
`blocks` (sha256 per 256 KiB block) and `sha256` is the sha256 of those 32-byte digests in
order (a hash list): one pass hashes a large file, and a patched file's digest follows from its
old and new block digests without reading the blocks that did not change. A hash cache
{rel: [size, mtime_ns, ino, ctime_ns, sha256, blocks]} spares re-reading unchanged files; the
ctime is in the key so that a file rewritten with its mtime forced back is still hashed again,
and the cache holds for one boot only (a crash can lose data whose stat still matches).
`plan` turns two manifests into the ops that make one side a copy of the other.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import posixpath
import re
import stat
import threading
import time

from .landing import TMP_PREFIX, boot_id
from .protocol import AgentError

BLOCK_SIZE = 1 << 18          # patch granularity for large files (256 KiB)
BLOCK_THRESHOLD = 4 << 20     # files this big also get per-block digests
IO_CHUNK = 1 << 20            # read/write/hash in large buffers
IGNORED_DIRS = frozenset([".git", "__pycache__", ".venv", "venv", ".ipynb_checkpoints"])
HASH_STATS = {"files": 0, "bytes": 0}   # lets tests prove that a cached tree is not re-read


# A path already in normal form: components that are neither empty, "." nor "..", and no NUL
# or backslash. Most paths are; they skip the split and join below (both sides check 10,000s).
_NORMAL_REL = re.compile(r"(?!\.\.?(?:/|\Z))[^/\x00\\]+(?:/(?!\.\.?(?:/|\Z))[^/\x00\\]+)*\Z")


def check_rel(rel):
    """Normalise a relative path, refusing any that could leave the root."""
    if type(rel) is str and _NORMAL_REL.match(rel):
        return rel
    return normalise_rel(rel)


def normalise_rel(rel):
    """check_rel without its shortcut for paths already in normal form."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise AgentError("Refusing path %r: not a plain relative path." % (rel,),
                         "Sync only carries relative paths inside the synced directory.")
    if rel.startswith("/"):
        raise AgentError("Refusing absolute path '%s' in a sync." % rel,
                         "Sync only writes inside the synced directory.")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise AgentError("Refusing path '%s': it leaves the synced directory." % rel,
                         "Remove '..' components from the path.")
    return "/".join(parts)


def check_link(rel, target):
    """A symlink may only point inside the synced tree (relative target, no escape)."""
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target or "/"))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise AgentError("Refusing symlink '%s' -> '%s': it points outside the synced directory."
                         % (rel, target), "Replace the link by a copy or a relative link inside.")
    return target


def list_digest(blocks):
    """The digest of a large file: sha256 over its block digests (hex strings), in order."""
    return hashlib.sha256(bytes.fromhex("".join(blocks))).hexdigest()


class Digester:
    """The digest of bytes fed in order: plain sha256 for a small file, block digests and
    their hash list for a large one (each byte is hashed once either way)."""

    def __init__(self, size):
        self.big = size >= BLOCK_THRESHOLD
        self.full = hashlib.sha256()   # small files only
        self.block, self.in_block, self.blocks = hashlib.sha256(), 0, []

    def update(self, data):
        if not self.big:
            self.full.update(data)
            return
        view, start = memoryview(data), 0
        while start < len(view):
            end = min(len(view), start + BLOCK_SIZE - self.in_block)
            self.block.update(view[start:end])
            self.in_block += end - start
            start = end
            if self.in_block == BLOCK_SIZE:
                self.add_block(self.block.hexdigest())

    def add_block(self, digest):
        """A whole block's digest (hashed here, or known from a cache)."""
        self.blocks.append(digest)
        self.block, self.in_block = hashlib.sha256(), 0

    def result(self):
        """(sha256, blocks or None)."""
        if not self.big:
            return self.full.hexdigest(), None
        if self.in_block:
            self.add_block(self.block.hexdigest())
        return list_digest(self.blocks), self.blocks


PARALLEL_HASH_MIN = 32 << 20   # larger files are hashed on several threads


def hash_file(path):
    """A file's digest (and block digests when large) in one pass over large buffers."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        threads = min(os.cpu_count() or 1, 4)
        if size >= PARALLEL_HASH_MIN and threads > 1:
            blocks, total = _block_digests(f.fileno(), size, threads)
            result = list_digest(blocks), blocks
        else:
            result, total = _hash_in_order(f, size)
    HASH_STATS["files"] += 1
    HASH_STATS["bytes"] += total
    return result


def _hash_in_order(f, size):
    """((digest, blocks or None), bytes read) of an open file, read in one pass."""
    buf, total, digester = bytearray(BLOCK_SIZE), 0, Digester(size)
    view = memoryview(buf)
    while True:
        n = f.readinto(buf)
        if not n:
            break
        total += n
        digester.update(view[:n])
    return digester.result(), total


def _block_digests(fd, size, threads):
    """(block digests, bytes read) of a large file, its blocks split into one run per thread:
    hashlib and pread release the GIL, so a 256 MiB file takes half the time on 2 cores."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 (large files only)
    count = -(-size // BLOCK_SIZE)

    def run(k):
        digests, read = [], 0
        for i in range(k * count // threads, (k + 1) * count // threads):
            data = os.pread(fd, BLOCK_SIZE, i * BLOCK_SIZE)
            digests.append(hashlib.sha256(data).hexdigest())
            read += len(data)
        return digests, read

    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(run, range(threads)))
    return [d for digests, _ in parts for d in digests], sum(read for _, read in parts)


def _walk(top, builtin):
    """(rel, lstat) for every entry under top, never following symlinks, less temp files and,
    with `builtin`, IGNORED_DIRS and *.pyc (checked inline: this runs for every entry of every
    scan)."""
    stack = [("", top)]
    is_dir_mode = stat.S_ISDIR
    while stack:
        rel_dir, path = stack.pop()
        with os.scandir(path) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                is_dir, name = is_dir_mode(st.st_mode), e.name
                if name.startswith(TMP_PREFIX) or builtin and (
                        name in IGNORED_DIRS if is_dir else name.endswith(".pyc")):
                    continue
                rel = rel_dir + name
                yield rel, st
                if is_dir:
                    stack.append((rel + "/", e.path))


def load_cache(cache_file):
    """The rows of a hash cache written during this boot, else {}. A row outlives no reboot:
    data written shortly before a crash (a push does not wait for the disk, nor does a job
    writing its outputs) may be lost or zeroed while its size, mtime, inode and ctime survive,
    and then the row would vouch for bytes the file no longer holds."""
    try:
        with open(cache_file) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("boot") != boot_id() \
            or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def write_cache(path, rows):
    """Write the hash cache by temp name + rename. No fsync: the cache is advisory (a lost or
    unreadable cache only means hashing again), and on ext4 an fsync here would also force out
    every dirty data block of the sync that just ran."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = "%s.%s%d" % (path, TMP_PREFIX, os.getpid())
    with open(tmp, "wb") as f:
        f.write(json.dumps({"boot": boot_id(), "files": rows}).encode())
    os.replace(tmp, path)


def cache_key(st):
    """What must be unchanged for a cached digest to hold: size, mtime, inode and ctime (no
    write or utime leaves a ctime unchanged, so forcing the mtime back cannot hide a change)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _entry(top, st, cache, rel, fresh_before, need_hash):
    key = cache_key(st)
    # A file written in the last second could change again within the same mtime tick:
    # hash it again next time rather than trust the cache (git's "racy clean" rule).
    cacheable = st.st_mtime_ns < fresh_before
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)}
    hit = cache.get(rel)
    if hit and hit[:4] == key:
        sha, blocks = hit[4], hit[5]
        if cacheable:   # the same row again, not a copy: most of a scan is cache hits
            entry["sha256"] = sha
            if blocks is not None:
                entry["blocks"] = blocks
            return entry, hit
    elif need_hash is None or need_hash(rel, st):
        sha, blocks = hash_file(os.path.join(top, rel))
    else:   # the other side lacks it: the sender hashes while streaming (one read, not two)
        entry.update(sha256=None, key=key if cacheable else None)
        return entry, None
    entry["sha256"] = sha
    if blocks is not None:
        entry["blocks"] = blocks
    return entry, (key + [sha, blocks] if cacheable else None)


_gc_pauses = [0, False]   # [nested pauses, whether the collector was on at the first]
_gc_lock = threading.Lock()


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection while a manifest is built or parsed: its tens of thousands
    of new dicts would trigger collections that scan the whole heap, for no garbage (plain
    reference counting frees a manifest). Nests, across threads too."""
    with _gc_lock:
        if _gc_pauses[0] == 0:
            _gc_pauses[1] = gc.isenabled()
            gc.disable()
        _gc_pauses[0] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses[0] -= 1
            if _gc_pauses[0] == 0 and _gc_pauses[1]:
                gc.enable()


def scan(top, cache_file=None, builtin_ignores=True, need_hash=None, on_file=None):
    """Manifest {files: {rel: entry}, dirs: {rel: mode}, links: {rel: target}} of a tree.
    need_hash(rel, stat) -> False leaves an uncached file's sha256 None (see write_stream).
    on_file(stat) is called for each regular file as the scan finds it, until it returns True."""
    with gc_paused():
        return _scan(top, cache_file, builtin_ignores, need_hash, on_file)


def to_wire(manifest):
    """A manifest as the `manifest` verb sends it: one row [rel, size, mode, sha256] (plus
    blocks) a file instead of an entry dict. A third smaller in JSON and quicker to write and
    parse; the other side's mtimes are never needed (each side lands its own)."""
    rows = []
    for rel, e in manifest["files"].items():
        row = [rel, e["size"], e["mode"], e["sha256"]]
        if "blocks" in e:
            row.append(e["blocks"])
        rows.append(row)
    return {"exists": manifest["exists"], "rows": rows, "dirs": manifest["dirs"],
            "links": manifest["links"]}


def from_wire(wire):
    """The manifest (entries without mtime_ns) that to_wire sent."""
    with gc_paused():
        files = {}
        for row in wire["rows"]:
            entry = {"size": row[1], "mode": row[2], "sha256": row[3]}
            if len(row) > 4:
                entry["blocks"] = row[4]
            files[row[0]] = entry
        return {"exists": wire["exists"], "files": files, "dirs": wire["dirs"],
                "links": wire["links"]}


def _scan(top, cache_file, builtin_ignores, need_hash, on_file):
    files: dict = {}
    dirs: dict = {}
    links: dict = {}
    manifest = {"files": files, "dirs": dirs, "links": links, "exists": os.path.isdir(top)}
    if not manifest["exists"]:
        return manifest
    cache = load_cache(cache_file) if cache_file else {}
    new_cache, fresh_before = {}, time.time_ns() - 1000000000
    is_reg, is_dir, is_link = stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK
    for rel, st in _walk(top, builtin_ignores):
        mode = st.st_mode
        if is_reg(mode):
            hit = cache.get(rel)
            if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns \
                    and hit[2] == st.st_ino and hit[3] == st.st_ctime_ns \
                    and hit[1] < fresh_before:   # _entry's cache hit, inlined: most files
                entry = {"size": hit[0], "mtime_ns": hit[1], "mode": mode & 0o7777,
                         "sha256": hit[4]}
                if hit[5] is not None:
                    entry["blocks"] = hit[5]
                cached = hit
            else:
                entry, cached = _entry(top, st, cache, rel, fresh_before, need_hash)
            files[rel] = entry
            if on_file is not None and on_file(st):
                on_file = None
            if cached:
                new_cache[rel] = cached
        elif is_dir(mode):
            dirs[rel] = mode & 0o7777
        elif is_link(mode):
            links[rel] = os.readlink(os.path.join(top, rel))
    if cache_file and new_cache != cache:
        write_cache(cache_file, new_cache)
    return manifest


def record_hashes(cache_file, entries):
    """Add {rel: [size, mtime_ns, ino, ctime_ns, sha256, blocks]} rows to a hash cache."""
    if cache_file and entries:
        cache = load_cache(cache_file)
        cache.update(entries)
        write_cache(cache_file, cache)


def update_cache(cache_file, entries, rows=None):
    """Record hashes the receiver just verified, {rel: (lstat after landing, sha256, blocks)}
    and {rel: row} already made, so that its next manifest does not read those files again."""
    if not cache_file or not (entries or rows):
        return
    cache = load_cache(cache_file)
    cache.update(rows or {})   # (a row only vouches while its file's stat still matches)
    for rel, (st, sha, blocks) in entries.items():
        cache[rel] = cache_key(st) + [sha, blocks]
    write_cache(cache_file, cache)


# -- planning: what must travel from src to dst (both manifests already filtered) --

def changed_blocks(new_blocks, old_blocks):
    return [i for i, d in enumerate(new_blocks) if i >= len(old_blocks) or old_blocks[i] != d]


def plan(src, dst, delete):
    """Ops turning dst into src: deletes first (type changes need them), then dirs, then data."""
    ops = []
    if delete:
        gone = [r for r in dst["files"] if r not in src["files"]]
        gone += [r for r in dst["links"] if src["links"].get(r) != dst["links"][r]]
        ops += [{"op": "delete", "path": r} for r in sorted(gone)]
        ops += [{"op": "rmdir", "path": r}
                for r in sorted((d for d in dst["dirs"] if d not in src["dirs"]), reverse=True)]
    for rel, mode in sorted(src["dirs"].items()):
        if dst["dirs"].get(rel) != mode:
            ops.append({"op": "dir", "path": rel, "mode": mode})
    for rel, target in sorted(src["links"].items()):
        if dst["links"].get(rel) != target:
            ops.append({"op": "link", "path": rel, "target": target})
    src_files, dst_files = src["files"], dst["files"]
    changed = [rel for rel, e in src_files.items()   # sorted after: usually few or none
               if (old := dst_files.get(rel)) is None or old["sha256"] != e["sha256"]
               or old["mode"] != e["mode"]]
    for rel in sorted(changed):
        e, old = src_files[rel], dst_files.get(rel)
        op = {"op": "file", "path": rel}
        if old and old.get("blocks") and e.get("blocks"):
            op["base_blocks"] = old["blocks"]
        ops.append(op)
    return ops


def cache_file(directory, root):
    """The hash cache of one synced folder: ROOT/cache/hashes-v3-<16 hex of its real path>.json
    (v3: rows of one boot; v2: ctime in the key, hash lists for large files; older caches are
    simply not read)."""
    key = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
    return os.path.join(root, "cache", "hashes-v3-%s.json" % key)


def cached_blocks(cache, rel, st):
    """The block digests a cache holds for a file whose stat still matches, else None."""
    hit = cache.get(rel)
    return hit[5] if hit and hit[:4] == cache_key(st) and hit[5] else None
