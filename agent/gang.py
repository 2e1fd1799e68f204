"""Gang start: one rank of a multi-node job holds its slots and waits for the controller's go.

A multi-node run (`cube remote run --nodes N`, controller/multinode.py) launches one job per
rank, each with `gang: {rank, world_size, go_timeout}` in its spec. Its supervisor takes its
slots through the host's queue (agent.leases) as any job does, then, instead of starting its
tasks, picks a free TCP port on this host and waits in state "reserved" (state.json carries
`gang: {rank, world_size, port, hostname}`) for the go file:

    ROOT/jobs/<id>/go.json    {"env": {name: value}}   start, with these variables added
                              {"abort": "why"}         give the slots back, end "cancelled"

The controller writes the go only once every rank is reserved, so no rank runs (or holds GPUs
while others run) before the whole gang has its slots. A rank that gets no go within
`go_timeout` seconds (the controller died, or another host never granted) gives its slots back
and ends "failed": a vanished controller never holds GPUs for long.
"""

from __future__ import annotations

import json
import os
import socket
import time

from .jobstate import save_json_atomic, utc_now
from .protocol import AgentError

GO_FILE = "go.json"
POLL_S = 0.2
DEFAULT_GO_TIMEOUT_S = 600.0


def check_spec(spec):
    """Validate the spec's `gang` field at launch (absent: an ordinary job)."""
    gang = spec.get("gang")
    if gang is None:
        return
    if not isinstance(gang, dict):
        raise AgentError("launch: field gang must be an object {rank, world_size, go_timeout}.")
    rank, size = gang.get("rank"), gang.get("world_size")
    whole = [v for v in (rank, size) if isinstance(v, int) and not isinstance(v, bool)]
    if len(whole) != 2 or not 0 <= whole[0] < whole[1]:
        raise AgentError("launch: gang needs whole numbers 0 <= rank < world_size, got %r."
                         % (gang,), hint="e.g. {\"rank\": 1, \"world_size\": 2}")
    timeout = gang.get("go_timeout", DEFAULT_GO_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise AgentError("launch: gang.go_timeout must be a number of seconds > 0.")


def free_port():
    """A TCP port nobody listens on now (the kernel's pick). The rank's task binds it later,
    so another process may take it meanwhile: rare, and the task then fails to start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def read_go(path):
    try:
        with open(os.path.join(path, GO_FILE)) as handle:
            go = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"abort": "the go file cannot be read: %s" % err}
    return go if isinstance(go, dict) else {"abort": "the go file is not an object"}


def wait_for_go(path, spec, state, cancel):
    """Hold the slots in state "reserved" until the go: the environment it adds to the tasks,
    or None once the job ended (cancelled, aborted, or no go in time; state.json written)."""
    gang = spec["gang"]
    timeout = float(gang.get("go_timeout", DEFAULT_GO_TIMEOUT_S))
    state.update(state="reserved", reserved_at=utc_now(),
                 gang={"rank": gang["rank"], "world_size": gang["world_size"],
                       "port": free_port(), "hostname": socket.gethostname()})
    save_json_atomic(os.path.join(path, "state.json"), state)
    deadline = time.monotonic() + timeout
    while True:
        if cancel:
            return end(path, state, "cancelled", None)
        go = read_go(path)
        if go is not None and "abort" in go:
            return end(path, state, "cancelled", "gang aborted: %s" % go["abort"])
        if go is not None:
            env = go.get("env") or {}
            return {str(k): str(v) for k, v in env.items()}
        if time.monotonic() > deadline:
            return end(path, state, "failed", "no go from the controller within %g s after "
                                              "the slots were reserved; they were given back"
                                              % timeout)
        time.sleep(POLL_S)


def end(path, state, final, error):
    """The rank ends without having started (its slots go back when the caller returns)."""
    state.update(state=final, error=error, ended_at=utc_now())
    save_json_atomic(os.path.join(path, "state.json"), state)
    return None
