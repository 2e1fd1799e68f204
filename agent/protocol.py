"""The agent's contract with the controller: the verb registry, the command line and the answer.

Every verb is a function `handler(args) -> dict | None` registered with `@verb(name, arg(...))`.
It returns its result or raises AgentError; `dispatch` turns either into ONE answer shape, the
same on the command line and in a session:

    {"ok": true, "result": {...}}        or        {"ok": false, "error": "...", "hint": "..."}

Streaming verbs (`logs`, `send`: raw bytes on stdout) print nothing on success; `receive` reads
a stream on stdin and answers as any other verb.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

AGENT_VERSION = 2  # 2: the package, run as a zipapp; every answer is {"ok", "result" | "error"}


class AgentError(Exception):
    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message, self.hint = message, hint


class Verb:
    def __init__(self, name, handler, arguments, output, in_session):
        self.name, self.handler, self.arguments = name, handler, arguments
        self.output = output          # "answer", "own" or "stream": see `verb`
        self.in_session = in_session  # whether a session may run it (see agent.session)


VERBS: dict[str, Verb] = {}  # filled as the verb modules are imported (agent.__main__)


def arg(*names, **options):
    """One argparse argument of a verb: arg("job"), arg("--offset", type=int, default=0)."""
    return names, options


def verb(name, *arguments, output="answer", in_session=True):
    """Register the decorated function as the verb `name` (the CLI name, e.g. "read-log").
    output="answer": stdout is the answer. "own": the verb writes stdout itself (log bytes,
    session lines, nothing), and only an error answer is printed there; "stream": the same,
    but the error answer goes to stderr, as the byte stream on stdout may have begun."""
    def register(handler):
        if name in VERBS:
            raise RuntimeError("verb %r is registered twice" % name)
        VERBS[name] = Verb(name, handler, arguments, output, in_session)
        return handler
    return register


def build_parser():
    parser = argparse.ArgumentParser(prog="cube-agent")
    parser.add_argument("--root", required=True, help="cube root on this host")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name in sorted(VERBS):
        verb_parser = sub.add_parser(name)
        for names, options in VERBS[name].arguments:
            verb_parser.add_argument(*names, **options)
    return parser


def ok(result):
    return {"ok": True, "result": result}


def error(message, hint=None):
    return {"ok": False, "error": message, "hint": hint}


def dispatch(args):
    """Run one parsed verb: its answer (result None for a streaming verb that succeeded)."""
    args.root = os.path.abspath(os.path.expanduser(args.root))
    try:
        return ok(VERBS[args.verb].handler(args))
    except AgentError as err:
        return error(err.message, err.hint)
    except OSError as err:  # the controller expects JSON, not a traceback
        return error("%s failed: %s" % (args.verb, err),
                     "check that %s is writable and its disk not full" % args.root)


def main(argv=None):
    """The command line: `--root ROOT VERB [args]`; exit 0 when the answer is ok, else 1."""
    args = build_parser().parse_args(argv)
    args.in_session = False
    answer = dispatch(args)
    output = VERBS[args.verb].output
    if answer["ok"] and output != "answer":
        return 0  # the verb wrote its own output
    out = sys.stderr if output == "stream" and not answer["ok"] else sys.stdout
    out.write(json.dumps(answer) + "\n")
    out.flush()
    return 0 if answer["ok"] else 1


def archive():
    """The zipapp this agent runs from (absolute), or None when imported from a source tree.
    Its modules come from the archive, or from the folder its first start unpacked it to,
    <digest>.pyz.d beside it (see controller.agent_bundle)."""
    path = getattr(globals().get("__loader__"), "archive", None)  # set by zipimport
    if path:
        return os.path.abspath(path)
    folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if folder.endswith(".pyz.d") and os.path.isfile(folder[:-2]):
        return folder[:-2]
    return None


def self_argv():
    """The argv that starts this agent again (the supervisor is such a start). From a zipapp it
    is the ARCHIVE: a path inside it is no file that Python could run. The interpreter flags
    -I and -S carry over, so a supervisor runs as isolated as the agent that spawned it."""
    python = sys.executable or shutil.which("python3") or "/usr/bin/python3"
    flags = (["-I"] if sys.flags.isolated else []) + (["-S"] if sys.flags.no_site else [])
    if archive():
        return [python] + flags + [archive()]
    # Imported from the source tree (python -m agent): put the tree back on sys.path.
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, %r); from agent.__main__ import main; "
            "sys.exit(main())" % parent)
    return [python] + flags + ["-c", code]
