"""Sync, both ends: the host's verbs (`manifest`, `receive`, `send`) and, re-exported from
agent.manifest and agent.tarstream, the primitives the controller imports for its own side
(`from agent import sync`), so push and pull share one implementation.
"""

from __future__ import annotations

import json
import os
import sys

from .landing import widen_pipe
from .manifest import (
    BLOCK_SIZE,
    BLOCK_THRESHOLD,
    HASH_STATS,
    cache_file,
    changed_blocks,
    check_link,
    check_rel,
    from_wire,
    gc_paused,
    plan,
    record_hashes,
    scan,
    to_wire,
)
from .protocol import AgentError, arg, verb
from .tarstream import apply_stream, write_stream

__all__ = ["AgentError", "BLOCK_SIZE", "BLOCK_THRESHOLD", "HASH_STATS", "apply_stream",
           "cache_file", "changed_blocks", "check_link", "check_rel", "from_wire", "gc_paused",
           "plan", "record_hashes", "scan", "write_stream"]

DIR = arg("dir", help="directory, relative to --root unless absolute")


def sync_dir(args):
    return os.path.join(args.root, os.path.expanduser(args.dir))


@verb("manifest", DIR, arg("--all", action="store_true", help="no built-in ignores"))
def manifest(args):
    d = sync_dir(args)
    return to_wire(scan(d, cache_file(d, args.root), builtin_ignores=not args.all))


@verb("receive", DIR, arg("--delete", action="store_true", help="honour delete entries"),
      arg("--durable", action="store_true",
          help="make every landed file durable (fsync/syncfs) before answering"))
def receive(args):
    """A sync stream on stdin, applied under DIR; answers {files, bytes, deleted}."""
    d = sync_dir(args)
    try:   # sshd's pipe to us: 1 MiB at a time instead of 64 KiB
        widen_pipe(sys.stdin.fileno())
    except (OSError, ValueError):   # not a file descriptor (a session's request)
        pass
    return apply_stream(d, sys.stdin.buffer, args.delete, cache_file(d, args.root),
                        durable=args.durable, forked=True)


@verb("send", DIR, output="stream")
def send(args):
    """Request (JSON ops) on stdin, sync stream on stdout (an error answer goes to stderr)."""
    d = sync_dir(args)
    ops = json.loads(sys.stdin.buffer.read().decode() or "[]")
    write_stream(d, ops, sys.stdout.buffer, scan(d, cache_file(d, args.root),
                                                 builtin_ignores=False))
    sys.stdout.buffer.flush()
    return None
