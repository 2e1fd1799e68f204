"""Packs landed in forked processes (agent.packforks, the host's `receive`): the same tree and
the same hash cache as with threads; a bad file or a dead lander fails the receive the way a
thread would, with nothing partial under a real name; threads where forking is not safe."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
from pathlib import Path

import pytest

from agent import manifest, packforks
from agent import sync as agent
from tests.test_sync import LocalConn, evil_tar, host_dir, pack, tree, write


@pytest.fixture
def many(tmp_path):
    """Enough small files for several packs, in a few folders, with a few modes."""
    src = tmp_path / "src"
    for i in range(1500):
        path = write(src / f"d{i % 9}" / f"f{i:04d}.txt", os.urandom(2000 + 5 * i))
        if i % 50 == 0:
            os.chmod(path, 0o755)
    return src


def stream_of(src: Path) -> io.BytesIO:
    mine = agent.scan(str(src))
    out = io.BytesIO()
    agent.write_stream(str(src), agent.plan(mine, agent.scan(str(src / "nowhere")), True), out,
                       mine)
    out.seek(0)
    return out


def test_forked_landers_land_the_tree_and_cache_what_a_scan_sees(many, tmp_path):
    dst, cache = tmp_path / "dst", str(tmp_path / "cache.json")
    report = agent.apply_stream(str(dst), stream_of(many), True, cache, durable=False,
                                forked=True)
    assert report["landing_processes"] == packforks.LANDERS and report["files"] == 1500
    assert tree(dst) == tree(many)
    rows = manifest.load_cache(cache)
    assert len(rows) == 1500 and all(
        row[:4] == manifest.cache_key(os.lstat(dst / rel)) for rel, row in rows.items())
    assert not list(dst.rglob(".cube-tmp-*"))


def test_a_push_lands_its_packs_in_forked_processes_on_the_host(many, tmp_path):
    from controller import sync
    conn = LocalConn(tmp_path / "host-root")
    assert sync.push(conn, many, "cubes/c").files_sent == 1500
    assert tree(host_dir(conn)) == tree(many)
    assert sync.push(conn, many, "cubes/c").files_sent == 0   # the host's cache vouches


def test_durable_or_threaded_receivers_do_not_fork(many, tmp_path):
    durable = agent.apply_stream(str(tmp_path / "a"), stream_of(many), True, None, durable=True,
                                 forked=True)
    assert durable["landing_processes"] == 0 and tree(tmp_path / "a") == tree(many)
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:   # a process with another thread is not forked: its packs land on threads
        busy = agent.apply_stream(str(tmp_path / "b"), stream_of(many), True, None,
                                  durable=False, forked=True)
    finally:
        release.set()
        other.join()
    assert busy["landing_processes"] == 0 and tree(tmp_path / "b") == tree(many)


def test_a_wrong_digest_in_a_forked_lander_fails_the_receive_and_installs_nothing_bad(tmp_path):
    dst = tmp_path / "dst"
    write(dst / "b.txt", "old b")
    good = pack(("a.txt", b"fine"))
    bad = pack(("b.txt", b"new b"), ("c.txt", b"c"), index=[   # c.txt's digest is wrong
        ["b.txt", 5, 420, 0, hashlib.sha256(b"new b").hexdigest()], ["c.txt", 1, 420, 0, "0" * 64]])
    assert packforks.can_fork()   # so its packs land in forked processes
    with pytest.raises(agent.AgentError, match="wrong sha256"):
        agent.apply_stream(str(dst), io.BytesIO(evil_tar(good, bad)), True, None,
                           durable=False, forked=True)
    assert (dst / "a.txt").read_bytes() == b"fine"        # an earlier pack still landed
    assert (dst / "b.txt").read_bytes() == b"new b"       # as did c.txt's pack-mate before it
    assert not (dst / "c.txt").exists() and not list(dst.rglob(".cube-tmp-*"))


def test_a_killed_lander_fails_the_receive_and_leaves_no_partial_file(many, tmp_path,
                                                                       monkeypatch):
    """A lander killed in the middle of a pack: the receive fails with a clear error, every
    file under its real name is whole, and the next sync completes (and clears temp files)."""
    real = packforks.land_pack

    def dies_midway(rows, dests, data, umask, finisher):
        real(rows[:3], dests[:3], data, umask, finisher)
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(packforks, "land_pack", dies_midway)   # inherited by the forks
    dst = tmp_path / "dst"
    with pytest.raises(agent.AgentError, match="landing process of this receive died"):
        agent.apply_stream(str(dst), stream_of(many), True, None, durable=False, forked=True)
    landed = tree(dst)
    src = tree(many)
    assert landed and all(landed[rel] == src[rel] for rel in landed)
    monkeypatch.setattr(packforks, "land_pack", real)
    agent.apply_stream(str(dst), stream_of(many), True, None, durable=False, forked=True)
    assert tree(dst) == src and not list(dst.rglob(".cube-tmp-*"))
