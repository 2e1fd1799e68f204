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


# ---- command line -----------------------------------------------------------------------------

VERBS = {}  # verb name -> (add_arguments(parser), handler(args) -> dict | None)


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
