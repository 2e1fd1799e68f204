"""The digest caches on both sides of a sync: a file changed with its mtime forced back is
still found (the ctime is in the cache key), and a block patch on the receiving side copies
the unchanged blocks without reading them when its cache vouches for them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from agent import landing, tarstream
from agent import sync as agent
from controller import sync
from tests.test_sync import MiB, host_dir, tree, write
from tests.test_sync import conn as conn  # noqa: F401 (fixture)
from tests.test_sync import work as work  # noqa: F401 (fixture)


def rewrite_keeping_mtime(path: Path) -> None:
    """Same size, other bytes, and the old mtime put back (what rsync's quick check misses)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_a_host_file_changed_with_its_mtime_forced_back_is_detected_and_sent_again(work, conn):
    sync.push(conn, work, "cubes/c")
    assert sync.push(conn, work, "cubes/c").files_sent == 0      # the host's cache is warm
    for rel in ("main.py", "big.bin"):
        rewrite_keeping_mtime(host_dir(conn) / rel)
    report = sync.push(conn, work, "cubes/c")
    assert report.files_sent == 2
    assert tree(host_dir(conn)) == tree(work)


def test_a_local_file_changed_with_its_mtime_forced_back_is_detected_and_sent(work, conn):
    sync.push(conn, work, "cubes/c")
    rewrite_keeping_mtime(work / "data" / "part03.txt")
    assert sync.push(conn, work, "cubes/c").files_sent == 1
    assert tree(host_dir(conn)) == tree(work)


def patch_in_process(src: Path, dst: Path, cache: str, between=lambda: None) -> dict:
    """One push from src to dst with both ends in this process (dst with its hash cache);
    `between` runs after dst's manifest, before the stream is applied."""
    theirs = agent.scan(str(dst), cache)
    between()
    mine = agent.scan(str(src))
    ops = agent.plan(mine, theirs, delete=True)
    assert [op for op in ops if op["op"] == "file"] and all(
        "base_blocks" in op for op in ops if op["op"] == "file")
    out = io.BytesIO()
    agent.write_stream(str(src), ops, out, mine)
    out.seek(0)
    return agent.apply_stream(str(dst), out, True, cache)


@pytest.fixture
def pair(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(9 * MiB + 123)
    write(src / "big.bin", data)
    write(dst / "big.bin", data)
    with open(src / "big.bin", "r+b") as f:
        f.seek(5 * MiB + 7)
        f.write(os.urandom(3000))
    os.utime(src / "big.bin", (1e9, 1e9))
    return src, dst, str(tmp_path / "cache.json")


def test_a_patch_copies_unchanged_blocks_without_reading_them_when_the_cache_vouches(
        pair, monkeypatch):
    src, dst, cache = pair
    monkeypatch.setattr(tarstream, "_patched_blocks", None)   # the reading path would fail
    assert patch_in_process(src, dst, cache)["files"] == 1
    assert tree(dst) == tree(src)
    again = agent.scan(str(dst), cache)["files"]["big.bin"]   # cached as it landed
    assert again == agent.scan(str(src))["files"]["big.bin"]


def test_a_patch_reads_the_old_file_when_its_cache_entry_went_stale(pair, monkeypatch):
    """Changed (mtime forced back) after the manifest: the cache no longer vouches for the old
    blocks, so they are read and hashed, and the result's digest exposes the change."""
    src, dst, cache = pair
    changed = dst / "big.bin"
    calls = []
    original = tarstream.patch_from_cache
    monkeypatch.setattr(tarstream, "patch_from_cache", lambda *a: calls.append(a) or original(*a))
    with pytest.raises(agent.AgentError, match="wrong sha256"):
        patch_in_process(src, dst, cache, between=lambda: rewrite_keeping_mtime(changed))
    assert not calls
    assert changed.read_bytes()[0] != (src / "big.bin").read_bytes()[0]   # old file kept
    assert patch_in_process(src, dst, cache)["files"] == 1                # a rerun completes
    assert tree(dst) == tree(src)


@pytest.mark.parametrize("others_dirty, many, expect", [
    (0, True, ["syncfs", "fsync"]),         # the batch at once, then its one folder
    (1 << 30, True, ["fsync"] * 101),       # 1 GiB of others' data: each file, then the folder
    (0, False, ["fsync"] * 11)])            # a few files: each, then the folder
def test_landing_syncs_the_filesystem_only_where_it_saves_fsyncs(tmp_path, monkeypatch,
                                                                 others_dirty, many, expect):
    """Many landed files are made durable by one syncfs, unless other writers' unwritten data
    (which syncfs would wait for) outweighs the fsyncs it saves; the renames happen only after."""
    calls: list[str] = []
    monkeypatch.setattr(landing, "dirty_bytes", lambda: others_dirty)
    monkeypatch.setattr(landing, "sync_filesystem", lambda path: calls.append("syncfs") or True)
    monkeypatch.setattr(landing, "fsync_path", lambda path: calls.append("fsync"))
    count = 100 if many else 10
    finisher = landing.Finisher(str(tmp_path), durable=True)
    for i in range(count):
        (tmp_path / f"tmp{i}").write_bytes(b"x")
        finisher.submit(str(tmp_path / f"tmp{i}"), str(tmp_path / f"f{i}"), 1)
    finisher.close()
    assert calls == expect
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"f{i}" for i in range(count))


def test_a_landing_that_need_not_be_durable_renames_without_flushing(tmp_path, monkeypatch):
    """A push's default: files land by rename at once, nothing waits for the disk."""
    calls: list[str] = []
    monkeypatch.setattr(landing, "sync_filesystem", lambda path: calls.append("syncfs") or True)
    monkeypatch.setattr(landing, "fsync_path", lambda path: calls.append("fsync"))
    finisher = landing.Finisher(str(tmp_path), durable=False)
    for i in range(100):
        (tmp_path / f"tmp{i}").write_bytes(b"x")
        finisher.submit(str(tmp_path / f"tmp{i}"), str(tmp_path / f"f{i}"), 1)
    finisher.close()
    assert calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"f{i}" for i in range(100))


def test_a_hash_cache_from_an_earlier_boot_is_not_trusted(tmp_path, monkeypatch):
    """After a crash a file's stat can survive while its unflushed data did not: every row of a
    cache written before the last boot is ignored, so the file is hashed again."""
    from agent import manifest
    write(tmp_path / "t" / "a.txt", b"hello")
    os.utime(tmp_path / "t" / "a.txt", (1e9, 1e9))
    cache = str(tmp_path / "cache.json")
    agent.scan(str(tmp_path / "t"), cache)
    assert agent.scan(str(tmp_path / "t"), cache)["files"]["a.txt"]["sha256"]
    before = dict(agent.HASH_STATS)
    agent.scan(str(tmp_path / "t"), cache)
    assert agent.HASH_STATS == before                     # same boot: the cache vouches
    monkeypatch.setattr(manifest, "boot_id", lambda: "another-boot")
    assert manifest.load_cache(cache) == {}
    agent.scan(str(tmp_path / "t"), cache)
    assert agent.HASH_STATS["files"] == before["files"] + 1   # hashed again


def test_syncfs_is_real_on_linux(tmp_path):
    """The libc call behind a batch's durability answers on this machine (Linux has syncfs)."""
    (tmp_path / "f").write_bytes(b"x")
    assert landing.sync_filesystem(str(tmp_path)) is True
    with pytest.raises(OSError):
        landing.sync_filesystem(str(tmp_path / "missing"))


def test_a_large_file_is_swapped_in_when_not_durable_and_the_old_version_removed(tmp_path,
                                                                                  monkeypatch):
    """RENAME_EXCHANGE (no ext4 flush): the new version in place, no temp file left, and a
    folder in the way is never swapped out."""
    dest, tmp = tmp_path / "big.bin", tmp_path / ".cube-tmp-1"
    dest.write_bytes(b"old" * 1000)
    data = os.urandom(2 * MiB)
    tmp.write_bytes(data)
    calls: list[tuple] = []
    real = landing.exchange
    monkeypatch.setattr(landing, "exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    finisher = landing.Finisher(str(tmp_path), durable=False)
    finisher.submit(str(tmp), str(dest), len(data))
    (tmp_path / "dir").mkdir()
    (tmp_path / ".cube-tmp-2").write_bytes(data)
    finisher.submit(str(tmp_path / ".cube-tmp-2"), str(tmp_path / "dir"), len(data))
    with pytest.raises(OSError):
        finisher.close()   # a file may not replace a folder
    assert calls == [(str(tmp), str(dest))]
    assert dest.read_bytes() == data
    assert (tmp_path / "dir").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "dir"]
    assert finisher.landed[str(dest)].st_ino == dest.stat().st_ino


def test_renameat2_exchange_is_real_on_linux(tmp_path):
    """The libc call behind the swap answers on this machine and really swaps."""
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    assert landing.exchange(str(tmp_path / "a"), str(tmp_path / "b")) is True
    assert (tmp_path / "a").read_bytes() == b"B" and (tmp_path / "b").read_bytes() == b"A"


def test_a_push_asks_for_durability_only_when_told(work, conn, monkeypatch):
    """push(durable=True) or CUBE_SYNC_DURABLE=1 makes the host's receive durable (--durable);
    by default a push does not wait for the host's disk. The tree arrives the same either way."""
    verbs: list[tuple] = []
    real = conn.agent_stream
    monkeypatch.setattr(conn, "agent_stream",
                        lambda *args, size=None: verbs.append(args) or real(*args, size=size))
    sync.push(conn, work, "cubes/c", durable=True)
    monkeypatch.setenv("CUBE_SYNC_DURABLE", "1")
    write(work / "main.py", "print('env')\n")
    sync.push(conn, work, "cubes/c")
    monkeypatch.delenv("CUBE_SYNC_DURABLE")
    write(work / "main.py", "print('default')\n")
    sync.push(conn, work, "cubes/c")
    assert ["--durable" in args for args in verbs] == [True, True, False]
    assert tree(host_dir(conn)) == tree(work)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_packed_files_land_with_their_own_modes_whatever_the_umask(tmp_path, umask):
    """A packed file is created with its mode where the umask lets it through, and chmod-ed
    where it does not: either way it lands with the sender's mode."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    modes = {"a.txt": 0o644, "run.sh": 0o755, "secret": 0o600, "shared": 0o666, "ro": 0o444}
    for name, mode in modes.items():
        write(src / name, name.encode())
        os.chmod(src / name, mode)
    mine = agent.scan(str(src))
    out = io.BytesIO()
    agent.write_stream(str(src), agent.plan(mine, agent.scan(str(dst)), True), out, mine)
    out.seek(0)
    old = os.umask(umask)
    try:
        agent.apply_stream(str(dst), out, True, None, durable=False)
    finally:
        os.umask(old)
    assert {name: (dst / name).stat().st_mode & 0o7777 for name in modes} == modes
    assert tree(dst) == tree(src)


def test_a_large_file_hashed_on_several_threads_has_the_digest_of_one_pass(tmp_path, monkeypatch):
    """The threaded block digests (files of PARALLEL_HASH_MIN and more) equal what Digester
    computes in one pass, as the receiver does while the bytes stream in."""
    from agent import manifest
    data = os.urandom(manifest.PARALLEL_HASH_MIN + 3 * manifest.BLOCK_SIZE + 123)
    write(tmp_path / "big.bin", data)
    digester = manifest.Digester(len(data))
    digester.update(data)
    one_pass = digester.result()
    assert manifest.hash_file(str(tmp_path / "big.bin")) == one_pass
    monkeypatch.setattr(manifest.os, "cpu_count", lambda: 1)   # the one-pass path itself
    assert manifest.hash_file(str(tmp_path / "big.bin")) == one_pass
