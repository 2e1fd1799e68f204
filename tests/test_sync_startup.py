"""What a push does before and around its bytes, where most of a many-small-files push went:
the host's receiver starts while a first push still scans, bulk agent processes start lean,
paths already in normal form are checked by one match, .cubeignore is matched without
pathspec's per-path bookkeeping where it can be, and files landed without durability are
cached with the stat a later scan will see."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import subprocess
import sys
import threading

import pathspec
import pytest

from agent import manifest
from agent import sync as agent
from agent.protocol import AgentError
from controller import sync
from controller.errors import CubeError
from controller.streams import SESSION_STREAM_MAX
from tests.test_sync import AGENT, LocalConn, MiB, host_dir, tree, write


@pytest.fixture
def conn(tmp_path):
    return LocalConn(tmp_path / "host-root")


@pytest.fixture
def big_tree(tmp_path):
    """More than a session message carries: a push of it needs a receiver of its own."""
    src = tmp_path / "src"
    for i in range(12):
        write(src / f"shard{i:02d}.bin", os.urandom(MiB))
    write(src / "main.py", "print('hi')\n")
    return src


class Watch:
    """Runs pushes to a LocalConn and records (size asked for, files the scan had found) at
    each agent_stream call. The scan is held at its first file until the host's manifest has
    arrived, as it has over SSH (the agent session answers in milliseconds; a LocalConn starts
    a process). With `hold`, it is also held, once past a session message's worth of bytes,
    until the receiver has been asked for (so that a receiver started early is seen early)."""

    def __init__(self, monkeypatch, conn):
        self.calls: list[tuple] = []
        self.found, self.seen, self.hold, self.forward = 0, 0, False, None
        self.answered, self.streamed = threading.Event(), threading.Event()
        real_scan, real_stream, real_agent = agent.scan, conn.agent_stream, conn.agent

        def agent_verb(verb, *args, **kw):
            try:
                return real_agent(verb, *args, **kw)
            finally:
                self.answered.set()

        def stream(*args, size=None):
            self.calls.append((size, self.found))
            self.streamed.set()
            return real_stream(*args, size=size)

        def scan(*args, on_file=None, **kw):
            self.found = self.seen = 0
            self.streamed.clear()
            self.forward = on_file
            return real_scan(*args, on_file=self.saw, **kw)

        monkeypatch.setattr(conn, "agent", agent_verb)
        monkeypatch.setattr(conn, "agent_stream", stream)
        monkeypatch.setattr(sync.agent, "scan", scan)

    def saw(self, st):
        """Counts every file; passes each to the push's own on_file until that has decided."""
        assert self.answered.wait(60)
        self.found += 1
        self.seen += st.st_size
        if self.forward is not None and self.forward(st):
            self.forward = None
        if self.hold and self.seen > SESSION_STREAM_MAX:
            self.streamed.wait(30)   # a correct push asks at once; a wrong one fails below
        return False


def test_a_first_push_starts_the_hosts_receiver_while_it_still_scans(big_tree, conn,
                                                                    monkeypatch):
    watch = Watch(monkeypatch, conn)
    calls, watch.hold = watch.calls, True
    assert sync.push(conn, big_tree, "cubes/c").files_sent == 13
    assert tree(host_dir(conn)) == tree(big_tree)
    (size, found), = calls
    # started once the scan had seen more than a session message, before it had seen it all
    assert size is None and SESSION_STREAM_MAX // MiB <= found < 13
    # a later push may have nothing to send: it starts a receiver only once it knows it does
    write(big_tree / "main.py", "print('changed')\n")
    calls.clear()
    watch.hold = False
    assert sync.push(conn, big_tree, "cubes/c").files_sent == 1
    assert calls == [(len("print('changed')\n"), 13)]
    assert sync.push(conn, big_tree, "cubes/c").files_sent == 0 and len(calls) == 1


def test_a_first_push_that_fails_after_its_receiver_started_leaves_nothing_on_the_host(
        big_tree, conn, monkeypatch):
    calls = Watch(monkeypatch, conn).calls
    os.symlink("../../etc/passwd", big_tree / "passwd")
    with pytest.raises(CubeError, match="points outside"):
        sync.push(conn, big_tree, "cubes/c")
    assert [size for size, _ in calls] == [None]    # the receiver had been started...
    assert not host_dir(conn).exists()             # ...and was ended before it made anything


def test_an_early_receiver_serves_a_push_whose_big_files_are_all_ignored(big_tree, conn,
                                                                        monkeypatch):
    """The scan counts bytes before .cubeignore filters them: the receiver it started early
    carries what is left, however little."""
    calls = Watch(monkeypatch, conn).calls
    write(big_tree / ".cubeignore", "*.bin\n")
    assert sync.push(conn, big_tree, "cubes/c").files_sent == 1
    assert sorted(tree(host_dir(conn))) == ["main.py"] and calls[0][0] is None
    (big_tree / "main.py").unlink()
    calls.clear()
    sync.push(conn, big_tree, "cubes/c")   # the host has a file now: nothing starts early
    assert calls == [(0, 13)] and tree(host_dir(conn)) == {}


def imported_modules(*argv: str, stdin: bytes = b"") -> set[str]:
    """The agent modules a run of the agent zipapp imported."""
    code = ("import json, runpy, sys\n"
            "sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "sys.stderr.write(json.dumps(sorted(m for m in sys.modules if m.startswith('agent'))))")
    proc = subprocess.run([sys.executable, "-c", code, AGENT, *argv], input=stdin,
                          capture_output=True)
    return set(json.loads(proc.stderr.decode().splitlines()[-1]))


def test_bulk_stream_verbs_import_only_the_sync_modules(tmp_path, conn, big_tree):
    sync.push(conn, big_tree, "cubes/c")
    lean = imported_modules("--root", conn.root, "send", "cubes/c", stdin=b"[]")
    assert "agent.tarstream" in lean and not {"agent.jobs", "agent.slurm"} & lean
    full = imported_modules("--root", conn.root, "probe")
    assert {"agent.jobs", "agent.slurm", "agent.tarstream"} <= full


def test_the_normal_form_shortcut_of_check_rel_agrees_with_the_full_check():
    parts = ["a", ".", "..", "/", "\x00", "\\", ".a", "..b", "a.", "...", " "]
    for n in range(1, 5):
        for rel in map("".join, itertools.product(parts, repeat=n)):
            try:
                want = manifest.normalise_rel(rel)
            except AgentError:
                with pytest.raises(AgentError):
                    manifest.check_rel(rel)
                continue
            assert manifest.check_rel(rel) == want, rel


@pytest.mark.parametrize("durable", [False, True])
def test_landed_files_are_cached_with_the_stat_a_later_scan_sees(tmp_path, durable):
    """Without durability packed files are renamed on the landing threads and their stat taken
    through the open file: it must be the stat a later scan gets by path (ctime included), or
    the host's next manifest would read every file again."""
    src, dst, cache = tmp_path / "src", tmp_path / "dst", str(tmp_path / "cache.json")
    for i in range(300):
        write(src / f"d{i % 7}" / f"f{i}.txt", os.urandom(100 + i))
    mine = agent.scan(str(src))
    out = io.BytesIO()
    agent.write_stream(str(src), agent.plan(mine, agent.scan(str(dst)), True), out, mine)
    out.seek(0)
    assert agent.apply_stream(str(dst), out, True, cache, durable=durable)["files"] == 300
    rows = manifest.load_cache(cache)
    assert len(rows) == 300
    for rel, row in rows.items():
        assert row[:4] == manifest.cache_key(os.lstat(dst / rel)), rel
    before = dict(agent.HASH_STATS)
    assert agent.scan(str(dst), cache)["files"].keys() == mine["files"].keys()
    assert agent.HASH_STATS == before   # nothing read again
    assert tree(dst) == tree(src)


def test_the_ignore_matcher_decides_as_pathspec_does():
    """Without negated patterns sync tests the patterns' regexes directly; with them it asks
    pathspec. Either way each path gets pathspec's own answer."""
    patterns = ["*.bin", "data/", "/top.txt", "**/cache/**", "a/**/b", "*.py[co]", "build",
                "x?y", "[ab]*.log", "docs/*.md", ".cubeignore", "#note", "", "d/sub/",
                "!keep.bin"]
    names = ["a.bin", "data", "top.txt", "cache", "b", "x1y", "a.log", "c.log", "r.md", "docs",
             "build", "keep.bin", "m.pyc", ".cubeignore", "sub", "d", "a"]
    rnd = random.Random(3)
    paths = {"/".join(rnd.choice(names) for _ in range(rnd.randint(1, 4))) for _ in range(1500)}
    paths |= {p + "/" for p in paths}
    shortcuts = 0
    for _ in range(80):
        spec = pathspec.GitIgnoreSpec.from_lines(rnd.sample(patterns, rnd.randint(1, 6)))
        ignored = sync.ignore_matcher(spec)
        shortcuts += ignored != spec.match_file
        assert all(bool(ignored(p)) == spec.match_file(p) for p in paths)
    assert 0 < shortcuts < 80   # both ways were taken


def test_a_standby_agent_runs_the_stream_verb_it_is_handed_and_nothing_else(conn, big_tree):
    """controller.standby keeps `standby` agents waiting: the first line names a stream verb,
    the rest of stdin is that verb's; EOF first ends it quietly; any other verb is refused."""
    sync.push(conn, big_tree, "cubes/c")

    def standby(stdin: bytes):
        return subprocess.run([sys.executable, AGENT, "--root", conn.root, "standby"],
                              input=stdin, capture_output=True)
    quiet = standby(b"")
    assert quiet.returncode == 0 and quiet.stdout == b""
    refused = standby(b'{"verb": "prune", "args": []}\n')
    assert refused.returncode == 1 and b"standby: the first line" in refused.stdout
    sent = standby(b'{"verb": "send", "args": ["cubes/c"]}\n[{"op": "file", "path": "main.py"}]')
    assert sent.returncode == 0 and b"print('hi')" in sent.stdout
