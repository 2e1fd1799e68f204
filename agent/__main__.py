"""Entry point: `python3 AGENT.pyz --root ROOT VERB [args]` (or `python3 -m agent ...`).

Importing the verb modules registers their verbs (agent.protocol.verb); the zipapp's own
top-level __main__.py calls `main` below.
"""

from __future__ import annotations

import sys

from . import jobs, probe, pruning, session, slurm, supervisor, sync  # noqa: F401 (they register the verbs)
from .protocol import main

if __name__ == "__main__":
    sys.exit(main())
