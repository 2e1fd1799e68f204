"""Entry point: `python3 AGENT.pyz --root ROOT VERB [args]` (or `python3 -m agent ...`).

Importing the verb modules registers their verbs (agent.protocol.verb); the zipapp's own
top-level __main__.py calls `main` below.

`--root ROOT standby` is a stream verb started ahead of need (controller.standby): with the
sync modules imported, it waits for its first stdin line, {"verb": "receive" | "send",
"args": [...]}, and then runs that verb as if started with it, the rest of stdin being the
verb's. EOF instead of a line: it exits quietly (its connection closed).
"""

from __future__ import annotations

import importlib
import json
import sys

from .protocol import error
from .protocol import main as run_verb

VERB_MODULES = ("jobs", "probe", "pruning", "session", "slurm", "supervisor", "sync")
# Every push and pull too big for a session message starts a process of its own for `receive`
# or `send`, while the user waits: those import only their module (0.06 s less per start; all
# of them cost 0.075 s here).
LEAN_VERBS = {"receive": "sync", "send": "sync", "standby": "sync"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    lean = LEAN_VERBS.get(argv[2]) if len(argv) > 2 and argv[0] == "--root" else None
    for name in (lean,) if lean else VERB_MODULES:
        importlib.import_module("." + name, __package__)
    if lean and argv[2] == "standby":
        request = _standby_request()
        if request is None:
            return 0
        if "error" in request:
            sys.stdout.write(json.dumps(request) + "\n")
            return 1
        argv = argv[:2] + request["argv"]
    return run_verb(argv)


def _standby_request():
    """The stream verb a standby process was handed: {"argv"}, an error answer, or None at
    EOF."""
    line = sys.stdin.buffer.readline()   # the verb then reads on from the same buffer
    if not line.strip():
        return None
    try:
        request = json.loads(line)
        name, args = request["verb"], request["args"]
        if name in ("receive", "send") and all(isinstance(a, str) for a in args):
            return {"argv": [name] + args}
    except (ValueError, KeyError, TypeError):
        pass
    return error("standby: the first line must be {\"verb\": \"receive\" | \"send\", "
                 "\"args\": [str, ...]}, got %r." % line[:200],
                 "The controller sent something else; do not trust the stream.")


if __name__ == "__main__":
    sys.exit(main())
