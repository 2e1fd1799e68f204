"""The session (`serve`): many requests over one SSH channel, and the `sh` verb it serves.

Every SSH command costs a login shell and a Python start on the host (0.5 s on a host whose
shell rc files do real work); a run needs a dozen small requests, so they share one process.
Protocol: JSON lines. The agent greets with {"ready": true, agent_version, python, path, root};
each request {"verb", "args": [..], "input": str|null} gets one answer line in the shape of
agent.protocol. Bulk byte streams keep their own channels, except small ones: `input_b64` is a
request's stdin as bytes, and with `capture` the verb's stdout comes back as `stdout_b64`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import traceback

from .protocol import AGENT_VERSION, VERBS, archive, arg, build_parser, dispatch, error, ok, verb


@verb("serve", output="own", in_session=False)
def serve(args):
    parser = build_parser()
    path = archive() or os.path.dirname(os.path.abspath(__file__))
    reply({"ready": True, "agent_version": AGENT_VERSION, "python": sys.executable,
           "path": path, "root": args.root})
    for line in sys.stdin:
        if line.strip():
            reply(serve_one(parser, args.root, json.loads(line)))
    return None


def serve_one(parser, root, request):
    """One request's answer; nothing a request does ends the session."""
    name = request.get("verb")
    if name not in VERBS or not VERBS[name].in_session:
        return error("verb %r cannot run in a session." % (name,))
    saved = sys.stdin, sys.stdout
    raw = request.get("input_b64")
    raw = base64.b64decode(raw) if raw is not None else (request.get("input") or "").encode()
    sys.stdin = io.TextIOWrapper(io.BytesIO(raw))
    captured = io.BytesIO()
    if request.get("capture"):
        sys.stdout = io.TextIOWrapper(captured, write_through=True)
    try:
        args = parser.parse_args(["--root", root, name] + list(request.get("args", [])))
        args.in_session = True
        answer = dispatch(args)
        sys.stdout.flush()
        output = captured.getvalue()  # now: dropping the wrapper below closes `captured`
    except SystemExit:  # argparse refused the arguments
        return error("bad arguments for %s: %r" % (name, request.get("args")))
    except Exception as err:  # one bad request must not end the session
        return error("%s failed: %s: %s" % (name, type(err).__name__, err),
                     traceback.format_exc(limit=3))
    finally:
        sys.stdin, sys.stdout = saved
    if answer["ok"] and request.get("capture"):
        return ok({"stdout_b64": base64.b64encode(output).decode("ascii")})
    return answer


def reply(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


@verb("sh", arg("command"), arg("--timeout", type=float, default=None))
def sh(args):
    """A shell command (a playbook check or step) run from the session's process."""
    shell = shutil.which("bash") or "/bin/sh"
    # bash re-reads ~/.bashrc when it thinks sshd started it (SSH_CLIENT is set); the session
    # already carries the login environment, so spare every command that cost.
    env = dict((k, v) for k, v in os.environ.items() if k not in ("SSH_CLIENT", "SSH2_CLIENT"))
    try:
        proc = subprocess.run([shell, "-c", args.command], stdin=subprocess.DEVNULL, env=env,
                              capture_output=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as err:
        return {"code": 124, "stdout": decode(err.stdout), "timed_out": True,
                "stderr": decode(err.stderr) + "\ntimed out after %g s" % args.timeout}
    return {"code": proc.returncode, "stdout": decode(proc.stdout), "stderr": decode(proc.stderr),
            "timed_out": False}


def decode(data):
    return (data or b"").decode("utf-8", "replace")
