#!/usr/bin/env python3
"""cube agent: the only code that touches a host's files and processes.

One stdlib-only file, Python >= 3.8. The controller uploads it to ROOT/agent/<hash>/ and calls
`python3 cube_agent.py --root ROOT VERB [args]`; every verb answers one JSON object on stdout
(`logs` and `send` stream raw bytes). The controller also imports this module for the local side
of sync, so both directions share one implementation.
"""

import argparse
import json
import os
import sys

AGENT_VERSION = 1


class AgentError(Exception):
    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message, self.hint = message, hint


# ---- jobs and probe (owner: jobs section) ---------------------------------------------------


# ---- sync (owner: sync section) -------------------------------------------------------------
# Manifests, safe apply and block patches, shared by both directions: the host runs them through
# the `manifest`, `receive` and `send` verbs, the controller imports them for its own side.
# A sync stream is a pax tar whose members are all regular entries carrying a `CUBE.op` header
# (file, patch, link, dir, delete, rmdir); any other member (link, device, fifo, escape) is refused.

import errno
import hashlib
import posixpath
import shutil
import stat
import tarfile
import time

BLOCK_SIZE = 1 << 20          # patch granularity for large files
BLOCK_THRESHOLD = 4 << 20     # files this big also get per-block digests
IO_CHUNK = 1 << 20            # read/write/hash in large buffers
TMP_PREFIX = ".cube-tmp-"
IGNORED_DIRS = frozenset([".git", "__pycache__", ".venv", "venv", ".ipynb_checkpoints"])
HASH_STATS = {"files": 0, "bytes": 0}   # lets tests prove that a cached tree is not re-read
_tmp_counter = [0]


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
    full, blocks, buf, total = hashlib.sha256(), [], bytearray(IO_CHUNK), 0
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


def write_atomic(path, data):
    """Write bytes under a temporary name in the same directory, fsync, then rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = "%s.%s%d" % (path, TMP_PREFIX, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _entry(path, st, cache, rel, fresh_before):
    key = [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = cache.get(rel)
    if hit and hit[:3] == key:
        sha, blocks = hit[3], hit[4]
    else:
        sha, blocks = hash_file(path, st.st_size >= BLOCK_THRESHOLD)
    # A file written in the last second could change again within the same mtime tick:
    # hash it again next time rather than trust the cache (git's "racy clean" rule).
    cacheable = st.st_mtime_ns < fresh_before
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode),
             "sha256": sha}
    if blocks is not None:
        entry["blocks"] = blocks
    return entry, (key + [sha, blocks] if cacheable else None)


def scan(top, cache_file=None, builtin_ignores=True):
    """Manifest {files: {rel: entry}, dirs: {rel: mode}, links: {rel: target}} of a tree."""
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
            entry, cached = _entry(os.path.join(top, rel), st, cache, rel, fresh_before)
            manifest["files"][rel] = entry
            if cached:
                new_cache[rel] = cached
    if cache_file and new_cache != cache:
        write_atomic(cache_file, json.dumps(new_cache).encode())
    return manifest


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
    write_atomic(cache_file, json.dumps(cache).encode())


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


# -- sending --

class _BlockReader(object):
    """File-like view of selected blocks of a file, for a patch member's payload."""

    def __init__(self, f, blocks, size):
        self.f, self.pending, self.size, self.buf = f, list(blocks), size, b""

    def read(self, n=-1):
        while self.pending and (n < 0 or len(self.buf) < n):
            i = self.pending.pop(0)
            self.f.seek(i * BLOCK_SIZE)
            self.buf += self.f.read(min(BLOCK_SIZE, self.size - i * BLOCK_SIZE))
        out, self.buf = (self.buf, b"") if n < 0 else (self.buf[:n], self.buf[n:])
        return out


def _info(rel, op, payload=0, **pax):
    ti = tarfile.TarInfo(rel)
    ti.size, ti.type = payload, tarfile.REGTYPE
    ti.pax_headers = dict({"CUBE.op": op}, **{"CUBE." + k: str(v) for k, v in pax.items()})
    return ti


def _add_file(tar, top, rel, entry, base_blocks):
    path = os.path.join(top, rel)
    meta = dict(sha256=entry["sha256"], mode=entry["mode"], mtime_ns=entry["mtime_ns"],
                size=entry["size"])
    with open(path, "rb") as f:
        if base_blocks is not None:
            idx = changed_blocks(entry["blocks"], base_blocks)
            payload = sum(min(BLOCK_SIZE, entry["size"] - i * BLOCK_SIZE) for i in idx)
            ti = _info(rel, "patch", payload, blocks=",".join(map(str, idx)), **meta)
            tar.addfile(ti, _BlockReader(f, idx, entry["size"]))
        else:
            tar.addfile(_info(rel, "file", entry["size"], **meta), f)


def write_stream(top, ops, out, manifest):
    """Write the sync stream for ops (entries taken from top's manifest) to a binary file."""
    tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=IO_CHUNK)
    tar.copybufsize = IO_CHUNK
    try:
        for op in ops:
            _add_op(tar, top, op, manifest)
    except BaseException:
        tar.closed = tar.fileobj.closed = True   # no end-of-archive marker after a failure
        raise
    tar.close()


def _add_op(tar, top, op, manifest):
    rel, kind = check_rel(op["path"]), op["op"]
    if kind == "file":
        entry = manifest["files"].get(rel)
        if entry is None:
            raise AgentError("'%s' is not a file in %s." % (rel, top),
                             "It was removed or replaced since the sync began; run it again.")
        _add_file(tar, top, rel, entry, op.get("base_blocks"))
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

def _safe_parent(top, rel):
    """Create missing parents of rel under top; refuse a parent that is a symlink or file."""
    parts, cur = rel.split("/")[:-1], top
    for p in parts:
        cur = os.path.join(cur, p)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise AgentError("Refusing to write '%s': its parent '%s' is a symlink or not a "
                             "directory." % (rel, os.path.relpath(cur, top)),
                             "A sync never writes through a symlink.")
    return os.path.join(top, rel)


def _tmp_name(dest):
    _tmp_counter[0] += 1
    return os.path.join(os.path.dirname(dest), "%s%d-%d" % (TMP_PREFIX, os.getpid(),
                                                             _tmp_counter[0]))


def clean_stale_tmp(top):
    """Remove temp files an interrupted sync left behind."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + dirnames:
            if name.startswith(TMP_PREFIX):
                path = os.path.join(dirpath, name)
                if not os.path.isdir(path) or os.path.islink(path):
                    os.unlink(path)


def _hash_and_write(src, fd, size, progress):
    """Copy size bytes from src to fd, hashing as we go (block digests for large files)."""
    full, blocks, left = hashlib.sha256(), [], size
    block = hashlib.sha256() if size >= BLOCK_THRESHOLD else None
    in_block = 0
    while left:
        data = src.read(min(IO_CHUNK, left))
        if not data:
            raise AgentError("The sync stream ended early (connection cut?).",
                             "Run the sync again; it resumes where it stopped.")
        left -= len(data)
        full.update(data)
        if block is not None:
            for piece in _split_blocks(data, in_block):
                block.update(piece)
                in_block += len(piece)
                if in_block == BLOCK_SIZE:
                    blocks.append(block.hexdigest())
                    block, in_block = hashlib.sha256(), 0
        _write_all(fd, data)
        if progress:
            progress(len(data))
    if block is not None and in_block:
        blocks.append(block.hexdigest())
    return full.hexdigest(), (blocks if block is not None else None)


def _split_blocks(data, in_block):
    view, start = memoryview(data), 0
    while start < len(data):
        end = min(len(data), start + BLOCK_SIZE - in_block)
        yield view[start:end]
        start, in_block = end, 0


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _finish(tmp, dest, rel, pax, got_sha):
    if got_sha != pax["CUBE.sha256"]:
        raise AgentError("'%s' arrived with the wrong sha256 (changed during the sync, or the "
                         "stream was damaged); the previous version is kept." % rel,
                         "Run the sync again.")
    os.chmod(tmp, int(pax["CUBE.mode"]) & 0o7777)
    mtime = int(pax["CUBE.mtime_ns"])
    os.utime(tmp, ns=(mtime, mtime))
    os.replace(tmp, dest)


def _receive_file(tar, member, dest, rel, progress):
    tmp = _tmp_name(dest)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            sha, blocks = _hash_and_write(tar.extractfile(member), fd, member.size, progress)
            os.fsync(fd)
        finally:
            os.close(fd)
        _finish(tmp, dest, rel, member.pax_headers, sha)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return sha, blocks


def _receive_patch(tar, member, dest, rel, progress):
    pax = member.pax_headers
    try:
        if not stat.S_ISREG(os.lstat(dest).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError:
        raise AgentError("A block patch for '%s' arrived but there is no regular file to patch."
                         % rel, "Run the sync again; it sends the whole file.")
    tmp, size = _tmp_name(dest), int(pax["CUBE.size"])
    idx = [int(i) for i in pax["CUBE.blocks"].split(",") if i]
    try:
        shutil.copyfile(dest, tmp)
        src = tar.extractfile(member)
        with open(tmp, "r+b") as f:
            for i in idx:
                f.seek(i * BLOCK_SIZE)
                n = min(BLOCK_SIZE, size - i * BLOCK_SIZE)
                data = src.read(n)
                if len(data) != n:
                    raise AgentError("The sync stream ended early (connection cut?).",
                                     "Run the sync again; it resumes where it stopped.")
                f.write(data)
                if progress:
                    progress(n)
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        sha, blocks = hash_file(tmp, size >= BLOCK_THRESHOLD)
        _finish(tmp, dest, rel, pax, sha)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return sha, blocks


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _receive_link(dest, rel, target):
    check_link(rel, target)
    tmp = _tmp_name(dest)
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
    if op not in ("file", "patch", "link", "dir", "delete", "rmdir"):
        raise AgentError("Refusing tar member '%s': not a cube sync entry." % member.name,
                         "The other side sent a stream cube did not make; do not trust it.")
    return op, check_rel(member.name)


def apply_stream(top, instream, allow_delete=False, cache_file=None, progress=None):
    """Apply a sync stream under top. Returns counts; files verified land by rename."""
    os.makedirs(top, exist_ok=True)
    top = os.path.realpath(top)
    clean_stale_tmp(top)
    report, verified = {"files": 0, "bytes": 0, "deleted": 0}, {}
    tar = tarfile.open(fileobj=instream, mode="r|", bufsize=IO_CHUNK)
    try:
        for member in tar:
            op, rel = _check_member(member)
            if op in ("delete", "rmdir") and not allow_delete:
                raise AgentError("Refusing to delete '%s': this sync may not delete files." % rel)
            dest = _safe_parent(top, rel)
            if op == "file":
                verified[rel] = _receive_file(tar, member, dest, rel, progress)
            elif op == "patch":
                verified[rel] = _receive_patch(tar, member, dest, rel, progress)
            elif op == "link":
                _receive_link(dest, rel, member.pax_headers.get("CUBE.target", ""))
            elif op == "dir":
                _receive_dir(dest, rel, int(member.pax_headers["CUBE.mode"]))
            else:
                report["deleted"] += _delete(dest, rel, op == "rmdir")
                continue
            report["files"] += op != "dir"
            report["bytes"] += member.size
    except (tarfile.TarError, EOFError) as err:
        raise AgentError("The sync stream is damaged or was cut (%s)." % err,
                         "Run the sync again; files already received are kept.")
    except OSError as err:
        raise AgentError("Could not write into %s: %s." % (top, err),
                         "Check free disk space and permissions, then run the sync again.")
    finally:
        update_cache(cache_file, top, verified)
    return report


def _receive_dir(dest, rel, mode):
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        os.mkdir(dest)
    else:
        if not stat.S_ISDIR(st.st_mode):
            raise AgentError("Refusing to make directory '%s': something else is there." % rel)
    os.chmod(dest, mode & 0o7777 | 0o700)


# -- verbs --

def _sync_dir(args):
    return os.path.join(args.root, os.path.expanduser(args.dir))


def _cache_file(directory, root):
    key = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
    return os.path.join(root, "cache", "hashes-%s.json" % key)


def _dir_argument(parser):
    parser.add_argument("dir", help="directory, relative to --root unless absolute")


def _manifest_arguments(parser):
    _dir_argument(parser)
    parser.add_argument("--all", action="store_true", help="no built-in ignores")


def verb_manifest(args):
    d = _sync_dir(args)
    return scan(d, _cache_file(d, args.root), builtin_ignores=not args.all)


def _receive_arguments(parser):
    _dir_argument(parser)
    parser.add_argument("--delete", action="store_true", help="honour delete entries")


def verb_receive(args):
    d = _sync_dir(args)
    return apply_stream(d, sys.stdin.buffer, args.delete, _cache_file(d, args.root))


def verb_send(args):
    """Request (JSON ops) on stdin, sync stream on stdout; errors go to stderr as JSON."""
    d = _sync_dir(args)
    try:
        ops = json.loads(sys.stdin.buffer.read().decode() or "[]")
        manifest = scan(d, _cache_file(d, args.root), builtin_ignores=False)
        write_stream(d, ops, sys.stdout.buffer, manifest)
        sys.stdout.buffer.flush()
    except AgentError as err:
        sys.stderr.write(json.dumps({"error": err.message, "hint": err.hint}) + "\n")
        sys.exit(1)
    return None


def register_sync_verbs(verbs):
    verbs["manifest"] = (_manifest_arguments, verb_manifest)
    verbs["receive"] = (_receive_arguments, verb_receive)
    verbs["send"] = (_dir_argument, verb_send)


# ---- command line -----------------------------------------------------------------------------

VERBS = {}  # verb name -> (add_arguments(parser), handler(args) -> dict | None)
register_sync_verbs(VERBS)  # sync section


def main(argv=None):
    parser = argparse.ArgumentParser(prog="cube_agent")
    parser.add_argument("--root", required=True, help="cube root on this host")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, (add_arguments, _) in sorted(VERBS.items()):
        add_arguments(sub.add_parser(name))
    args = parser.parse_args(argv)
    args.root = os.path.abspath(os.path.expanduser(args.root))
    try:
        result = VERBS[args.verb][1](args)
    except AgentError as err:
        print(json.dumps({"error": err.message, "hint": err.hint}))
        return 1
    if result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
