"""Entry point: `python3 AGENT.pyz --root ROOT VERB [args]` (or `python3 -m agent ...`).

Importing the verb modules registers their verbs (agent.protocol.verb); the zipapp's own
top-level __main__.py calls `main` below.
"""

from __future__ import annotations

import importlib
import sys

from .protocol import main as run_verb

VERB_MODULES = ("jobs", "probe", "pruning", "session", "slurm", "supervisor", "sync")
# Every push and pull too big for a session message starts a process of its own for `receive`
# or `send`, while the user waits: those import only their module (0.06 s less per start; all
# of them cost 0.075 s here).
LEAN_VERBS = {"receive": "sync", "send": "sync"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    lean = LEAN_VERBS.get(argv[2]) if len(argv) > 2 and argv[0] == "--root" else None
    for name in (lean,) if lean else VERB_MODULES:
        importlib.import_module("." + name, __package__)
    return run_verb(argv)


if __name__ == "__main__":
    sys.exit(main())
