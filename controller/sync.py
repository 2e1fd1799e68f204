"""Sync without rsync: manifests on both sides, only changed files (or changed blocks) travel as
one tar stream over one channel, and every file lands by temp name + sha256 check + rename.

The primitives (scan, plan, write_stream, apply_stream) live in the agent package
(`agent.sync`) so that push (we write, the host's `receive` applies) and pull (the host's `send`
writes, we apply) share one implementation. This module adds what only the controller knows:
`.cubeignore`, the local hash cache under CUBE_HOME, progress bars, and errors for the user.

The other side is any controller.target.Target: its agent answers the manifest
(`target.agent("manifest", ...)`) and one `target.agent_stream(verb, ..., size=)` per transfer
carries the bytes (a tuned SSH channel, or inside the agent session when small).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pathspec

from agent import sync as agent
from controller import paths as cube_paths
from controller.errors import CubeError
from controller.streams import SESSION_STREAM_MAX, Stream
from controller.target import Target

IGNORE_FILE = ".cubeignore"
PROGRESS_MIN_BYTES = 16 << 20   # smaller transfers finish before a bar is worth drawing


@dataclass
class SyncReport:
    files_sent: int = 0
    bytes_sent: int = 0         # bytes on the wire (tar stream), what the host had to receive
    files_deleted: int = 0
    seconds: float = 0.0


def push(target: Target, local_dir, remote_dir: str, *, paths=None, ignore=True, delete=True,
         progress=None, exclude=(), durable: bool | None = None) -> SyncReport:
    """Make remote_dir (relative to the host's cube root, or absolute) a copy of local_dir.
    `exclude`: relative folders left out on both sides (neither sent nor deleted).
    `durable`: the host forces the data to disk before answering (default: CUBE_SYNC_DURABLE=1).
    Without it a push is as durable as rsync's: the host's copy is a copy of ours, and after a
    host crash the next push finds and resends whatever did not reach its disk (hash caches
    are trusted within one boot only)."""
    start, local_dir = time.monotonic(), Path(local_dir)
    if not local_dir.is_dir():
        raise CubeError(f"Cannot push '{local_dir}': it is not a directory.",
                        "Pass the cube's directory.")
    keep = _keeper(local_dir if ignore else None, paths, exclude)
    if durable is None:
        durable = os.environ.get("CUBE_SYNC_DURABLE", "0") == "1"
    args = ["receive", remote_dir] + (["--delete"] if delete else []) \
        + (["--durable"] if durable else [])
    with ThreadPoolExecutor(2) as pool:   # the host scans while we scan (and filter)
        remote_job = pool.submit(remote_manifest, target, remote_dir, not ignore)
        early = _EarlyReceiver(pool, target, args, remote_job)
        try:
            local = keep(agent.scan(str(local_dir), local_cache_file(local_dir),
                                    builtin_ignores=ignore, need_hash=_compared(remote_job),
                                    on_file=early.saw))
            remote = keep(remote_job.result())   # mostly paths `keep` has answered already
            for rel, link in local["links"].items():
                _agent_call(agent.check_link, rel, link)
            ops = agent.plan(local, remote, delete)
        except BaseException:
            early.discard()
            raise
    size = _payload(ops, local)
    stream = early.stream()   # used even when the plan is empty: it answers at once
    if stream is None:
        if not ops:
            return SyncReport(seconds=time.monotonic() - start)
        stream = target.agent_stream(*args, size=size)
    with _bar(progress, size, "push") as tick:
        sent, result = _send_ops(stream, local_dir, ops, local, tick)
    return SyncReport(result["files"], sent, result["deleted"], time.monotonic() - start)


def pull(target: Target, remote_dir: str, local_dir, *, paths=None,
         progress=None) -> SyncReport:
    """Copy remote_dir (or its `paths`) into local_dir; never deletes local files. Always
    durable: pulled outputs may soon be the only copy (the host's job can be pruned)."""
    start, local_dir = time.monotonic(), Path(local_dir)
    remote = remote_manifest(target, remote_dir, True)
    if not remote["exists"]:
        raise CubeError(f"Cannot pull '{remote_dir}': it does not exist on the host.",
                        "Check the job id, or whether the task wrote its outputs.")
    known: Future = Future()
    known.set_result(remote)   # hash only local files the host has in a comparable form
    local = agent.scan(str(local_dir), local_cache_file(local_dir), builtin_ignores=False,
                       need_hash=_compared(known))
    keep = _keeper(None, paths)
    remote, local = keep(remote), keep(local)
    ops = agent.plan(remote, local, delete=False)
    if not ops:
        return SyncReport(seconds=time.monotonic() - start)
    size = _payload(ops, remote)
    stream = target.agent_stream("send", remote_dir, size=size)
    with _bar(progress, size, "pull") as tick:
        result, received = _receive_ops(stream, local_dir, ops, tick)
    return SyncReport(result["files"], received, 0, time.monotonic() - start)


def _answered(job: Future) -> threading.Event:
    """Set once job is done: is_set() takes no lock, unlike Future.done(), and the scan asks
    for each of 10,000s of files."""
    done = threading.Event()
    job.add_done_callback(lambda _: done.set())
    return done


def _compared(remote_job):
    """Only files the host has in a comparable form need hashing before the stream; new ones
    are hashed while they stream (one read instead of two). Until the host's manifest arrives,
    hash eagerly rather than wait for it. (Called for each uncached file: it asks the Future
    nothing once the manifest is in, as each of its calls takes a lock.)"""
    answered, files = _answered(remote_job), []   # type: threading.Event, list[dict]

    def need_hash(rel: str, st) -> bool:
        if not files:
            if not answered.is_set():
                return True
            files.append(remote_job.result()["files"])
        theirs = files[0].get(rel)
        return theirs is not None and (theirs["size"] == st.st_size or (
            "blocks" in theirs and st.st_size >= agent.BLOCK_THRESHOLD))
    return need_hash


class _EarlyReceiver:
    """On a first push (the host has no file in remote_dir yet) every file will travel, so the
    host's receiver is started while the local scan still runs, as soon as the scan has found
    more than a session message carries: its start (a login shell and a Python on the host,
    0.2-0.3 s) then overlaps the scan instead of following it. A later push, whose plan may
    well be empty, starts nothing before it knows."""

    def __init__(self, pool: ThreadPoolExecutor, target: Target, args: list[str],
                 remote_job: Future):
        self.pool, self.target, self.args, self.remote_job = pool, target, args, remote_job
        self.seen, self.decided, self.opening = 0, False, None   # type: int, bool, Future | None
        self.answered = _answered(remote_job)

    def saw(self, st) -> bool:
        """Called by the scan for each local file until it returns True (decided): it runs
        beside the thread taking the host's manifest in, so it does as little as it can."""
        if self.decided:
            return True
        self.seen += st.st_size
        if self.seen <= SESSION_STREAM_MAX or not self.answered.is_set():
            return False
        self.decided = True
        if self.remote_job.exception() is None and not self.remote_job.result()["files"]:
            self.opening = self.pool.submit(self.target.agent_stream, *self.args)
        return True

    def stream(self) -> Stream | None:
        """The receiver started early (its start's error, if any, raised here), else None."""
        return self.opening.result() if self.opening is not None else None

    def discard(self) -> None:
        """The push failed before sending: end the receiver by an empty stream, which it
        leaves by itself having made nothing (no kill while the host's login shell may still
        be starting: see controller.standby.end_gently)."""
        if self.opening is not None:
            try:
                stream = self.opening.result()
                stream.close_stdin()
                stream.wait()
                stream.close()
            except Exception:   # noqa: BLE001 (already failing: the first error is the one to report)
                pass


def remote_manifest(target: Target, remote_dir: str, everything: bool) -> dict:
    """The other side's manifest of remote_dir, from its agent."""
    with agent.gc_paused():   # its JSON is parsed in here
        return agent.from_wire(
            target.agent("manifest", remote_dir, *(["--all"] if everything else [])))


def local_cache_file(local_dir) -> str:
    return agent.cache_file(str(local_dir), str(cube_paths.cube_home()))


# -- filters --

def _keeper(ignore_root: Path | None, paths, exclude=()):
    """A function filtering a manifest by .cubeignore (plus built-ins), requested paths and
    excluded folders."""
    ignored = ignore_matcher(_ignore_spec(ignore_root)) if ignore_root else None
    prefixes = [_agent_call(agent.check_rel, p) for p in paths] if paths else None
    excluded = [_agent_call(agent.check_rel, p) for p in exclude]

    def under(rel: str, folders) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in folders)

    known: dict[tuple[str, bool], bool] = {}   # both sides' manifests share most paths

    def wanted(rel: str, is_dir: bool) -> bool:
        answer = known.get((rel, is_dir))
        if answer is None:
            answer = known[rel, is_dir] = not (
                (prefixes and not under(rel, prefixes)) or (excluded and under(rel, excluded))
                or (ignored and ignored(rel + "/" if is_dir else rel)))
        return answer

    def keep(m: dict) -> dict:
        return {"exists": m.get("exists", True),
                "files": {r: e for r, e in m["files"].items() if wanted(r, False)},
                "links": {r: t for r, t in m["links"].items() if wanted(r, False)},
                "dirs": {r: d for r, d in m["dirs"].items() if wanted(r, True)}}
    return keep


def ignore_matcher(spec: pathspec.GitIgnoreSpec):
    """spec.match_file for normalised relative paths. Without negated patterns (`!x`) a path
    is ignored exactly when one pattern's regex matches it, and testing those directly costs a
    seventh of match_file's bookkeeping (7 us a path here, for 10,000s of paths a push)."""
    patterns = [p for p in spec.patterns if p.include is not None]
    if not all(p.include for p in patterns):
        return spec.match_file
    searches = [regex.search for p in patterns if (regex := p.regex) is not None]
    if len(searches) == 1:   # .cubeignore itself, the usual whole list
        return searches[0]
    return lambda path: any(search(path) for search in searches)


def _ignore_spec(root: Path):
    lines = [IGNORE_FILE]   # the ignore file itself is controller configuration
    path = root / IGNORE_FILE
    if path.is_file():
        lines += path.read_text(encoding="utf-8").splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines)


# -- streaming --

class _Counting:
    """Counts (and reports) the bytes that pass through a stream."""

    def __init__(self, stream, tick):
        self.stream, self.tick, self.count = stream, tick, 0

    def write(self, data) -> int:
        self.stream.write(data)
        self.count += len(data)
        self.tick(len(data))
        return len(data)

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        self.tick(len(data))
        return data


def _send_ops(stream, local_dir, ops, manifest, tick):
    counter = _Counting(stream, tick)
    try:
        try:
            hashed = agent.write_stream(str(local_dir), ops, counter, manifest)
            stream.close_stdin()
            # Our digests of our files hold whatever the host answers: kept while it finishes.
            agent.record_hashes(local_cache_file(local_dir), hashed)
        except agent.AgentError as err:
            raise CubeError(err.message, err.hint) from None
        except (OSError, EOFError):
            pass   # the host stopped reading: its answer below says why
        out, code = stream.read(), stream.wait()
        return counter.count, _agent_answer(stream, out, code)
    finally:
        stream.close()


def _receive_ops(stream, local_dir, ops, tick):
    counter = _Counting(stream, tick)
    try:
        try:
            stream.write(json.dumps(ops).encode())
            stream.close_stdin()
        except OSError:
            pass   # the host stopped reading early: what it sent (or its error) tells why
        local_error: agent.AgentError | None = None
        try:
            result = agent.apply_stream(str(local_dir), counter, allow_delete=False,
                                        cache_file=local_cache_file(local_dir))
        except agent.AgentError as err:
            local_error = err
        code = stream.wait()
        if code != 0:
            _agent_answer(stream, b"", code)
        if local_error:
            raise CubeError(local_error.message, local_error.hint)
        return result, counter.count
    finally:
        stream.close()


def _agent_answer(stream: Stream, out: bytes, code: int) -> dict:
    """The agent's answer ({"ok", "result" | "error", "hint"}, on stdout, or on stderr for a
    streaming verb); an error becomes a CubeError."""
    text = out.decode(errors="replace").strip() or stream.stderr_text().strip()
    try:
        answer = json.loads(text.splitlines()[-1]) if text else {}
    except ValueError:
        answer = {}
    if code == 0 and answer.get("ok"):
        return answer["result"]
    if "error" in answer:
        raise CubeError(f"On the host: {answer['error']}", answer.get("hint"))
    raise CubeError(f"The host's cube agent failed (exit code {code}): "
                    f"{text[-500:] or stream.stderr_text()[-500:]}",
                    "Run the same command again with --debug to see the host's output.")


def _agent_call(fn, *args):
    try:
        return fn(*args)
    except agent.AgentError as err:
        raise CubeError(err.message, err.hint) from None


# -- progress --

def _payload(ops, manifest) -> int:
    total = 0
    for op in ops:
        entry = manifest["files"].get(op["path"]) if op["op"] == "file" else None
        if entry and "base_blocks" in op:
            total += len(agent.changed_blocks(entry["blocks"], op["base_blocks"])) \
                * agent.BLOCK_SIZE
        elif entry:
            total += entry["size"]
    return total


@contextlib.contextmanager
def _bar(progress, total: int, label: str):
    """Yield a byte-count callback: the caller's, a rich bar on a TTY, or a no-op."""
    if callable(progress):
        yield progress
        return
    if progress is False or total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield lambda n: None
        return
    # Imported here: rich.progress costs start-up time and only a long transfer on a TTY draws.
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def local_digests(local_dir, *, ignore: bool = True, exclude=()) -> dict[str, str]:
    """{rel: sha256} of the files a push of local_dir considers (after .cubeignore and
    `exclude`), links as "link:<target>". Read through the hash cache, so an unchanged tree
    costs one stat per file. Run records keep it as the cube's content."""
    local_dir = Path(local_dir)
    manifest = _keeper(local_dir if ignore else None, None, exclude)(
        agent.scan(str(local_dir), local_cache_file(local_dir), builtin_ignores=ignore))
    digests = {rel: entry["sha256"] for rel, entry in manifest["files"].items()}
    digests.update({rel: f"link:{target}" for rel, target in manifest["links"].items()})
    return dict(sorted(digests.items()))
