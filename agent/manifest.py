"""Manifests and plans, shared by both ends of a sync (the host's agent and the controller).

A manifest is {exists, files: {rel: {size, mtime_ns, mode, sha256, blocks?}}, dirs: {rel: mode},
links: {rel: target}}; `blocks` are sha256 digests per 256 KiB block for files >= 4 MiB. A hash
cache {rel: [size, mtime_ns, ino, sha256, blocks]} spares re-reading unchanged files. `plan`
turns two manifests into the ops that make one side a copy of the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import time

from .protocol import AgentError

BLOCK_SIZE = 1 << 18          # patch granularity for large files (256 KiB)
BLOCK_THRESHOLD = 4 << 20     # files this big also get per-block digests
IO_CHUNK = 1 << 20            # read/write/hash in large buffers
TMP_PREFIX = ".cube-tmp-"
IGNORED_DIRS = frozenset([".git", "__pycache__", ".venv", "venv", ".ipynb_checkpoints"])
HASH_STATS = {"files": 0, "bytes": 0}   # lets tests prove that a cached tree is not re-read


def check_rel(rel):
    """Normalise a relative path, refusing any that could leave the root."""
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


def ignored_name(name, is_dir, builtin):
    if name.startswith(TMP_PREFIX):
        return True
    return builtin and (name in IGNORED_DIRS if is_dir else name.endswith(".pyc"))


def hash_file(path, with_blocks):
    """sha256 of a file (and per-block digests) in one pass over large buffers."""
    # Reads of one block each: a regular file only reads short at its end, so every digest
    # covers exactly one block.
    full, blocks, buf, total = hashlib.sha256(), [], bytearray(BLOCK_SIZE), 0
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
            full.update(view[:n])
            if with_blocks:
                blocks.append(hashlib.sha256(view[:n]).hexdigest())
    HASH_STATS["files"] += 1
    HASH_STATS["bytes"] += total
    return full.hexdigest(), (blocks if with_blocks else None)


def _walk(top, builtin):
    """(rel, lstat) for every entry under top, never following symlinks."""
    stack = [("", top)]
    while stack:
        rel_dir, path = stack.pop()
        with os.scandir(path) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                is_dir = stat.S_ISDIR(st.st_mode)
                if ignored_name(e.name, is_dir, builtin):
                    continue
                rel = rel_dir + e.name
                yield rel, st
                if is_dir:
                    stack.append((rel + "/", e.path))


def load_cache(cache_file):
    try:
        with open(cache_file) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_cache(path, data):
    """Write the hash cache by temp name + rename. No fsync: the cache is advisory (a lost or
    unreadable cache only means hashing again), and on ext4 an fsync here would also force out
    every dirty data block of the sync that just ran."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = "%s.%s%d" % (path, TMP_PREFIX, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _entry(path, st, cache, rel, fresh_before, need_hash):
    key = [st.st_size, st.st_mtime_ns, st.st_ino]
    # A file written in the last second could change again within the same mtime tick:
    # hash it again next time rather than trust the cache (git's "racy clean" rule).
    cacheable = st.st_mtime_ns < fresh_before
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)}
    hit = cache.get(rel)
    if hit and hit[:3] == key:
        sha, blocks = hit[3], hit[4]
    elif need_hash is None or need_hash(rel, st):
        sha, blocks = hash_file(path, st.st_size >= BLOCK_THRESHOLD)
    else:   # the other side lacks it: the sender hashes while streaming (one read, not two)
        entry.update(sha256=None, key=key if cacheable else None)
        return entry, None
    entry["sha256"] = sha
    if blocks is not None:
        entry["blocks"] = blocks
    return entry, (key + [sha, blocks] if cacheable else None)


def scan(top, cache_file=None, builtin_ignores=True, need_hash=None):
    """Manifest {files: {rel: entry}, dirs: {rel: mode}, links: {rel: target}} of a tree.
    need_hash(rel, stat) -> False leaves an uncached file's sha256 None (see write_stream)."""
    manifest = {"files": {}, "dirs": {}, "links": {}, "exists": os.path.isdir(top)}
    if not manifest["exists"]:
        return manifest
    cache = load_cache(cache_file) if cache_file else {}
    new_cache, fresh_before = {}, time.time_ns() - 1000000000
    for rel, st in _walk(top, builtin_ignores):
        if stat.S_ISDIR(st.st_mode):
            manifest["dirs"][rel] = stat.S_IMODE(st.st_mode)
        elif stat.S_ISLNK(st.st_mode):
            manifest["links"][rel] = os.readlink(os.path.join(top, rel))
        elif stat.S_ISREG(st.st_mode):
            entry, cached = _entry(os.path.join(top, rel), st, cache, rel, fresh_before,
                                   need_hash)
            manifest["files"][rel] = entry
            if cached:
                new_cache[rel] = cached
    if cache_file and new_cache != cache:
        write_cache(cache_file, json.dumps(new_cache).encode())
    return manifest


def record_hashes(cache_file, entries):
    """Add {rel: [size, mtime_ns, ino, sha256, blocks]} rows to a hash cache."""
    if cache_file and entries:
        cache = load_cache(cache_file)
        cache.update(entries)
        write_cache(cache_file, json.dumps(cache).encode())


def update_cache(cache_file, top, entries):
    """Record hashes the receiver just verified, so its next manifest does not re-read them."""
    if not cache_file or not entries:
        return
    cache = load_cache(cache_file)
    for rel, (sha, blocks) in entries.items():
        try:
            st = os.lstat(os.path.join(top, rel))
        except OSError:
            continue
        cache[rel] = [st.st_size, st.st_mtime_ns, st.st_ino, sha, blocks]
    write_cache(cache_file, json.dumps(cache).encode())


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
    for rel, e in sorted(src["files"].items()):
        old = dst["files"].get(rel)
        if old and old["sha256"] == e["sha256"] and old["mode"] == e["mode"]:
            continue
        op = {"op": "file", "path": rel}
        if old and old.get("blocks") and e.get("blocks"):
            op["base_blocks"] = old["blocks"]
        ops.append(op)
    return ops




def cache_file(directory, root):
    """The hash cache of one synced folder: ROOT/cache/hashes-<16 hex of its real path>.json."""
    key = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
    return os.path.join(root, "cache", "hashes-%s.json" % key)
