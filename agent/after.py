"""`after`: a job that starts only once other jobs on this host are final.

A launch spec may carry `after: [job id, ...]` (jobs under the same ROOT). Its supervisor waits,
in state "queued" with `waiting_for`, until each of them is final (succeeded, failed, cancelled
or lost: a failed one does not stop the chain), and only then enters the host's slot queue
(agent.leases). A job id that does not exist here counts as final. This is how a sweep's
`--max-parallel N` holds without a daemon: its variants run in N chains (controller/sweeps.py).
"""

from __future__ import annotations

import os
import time

from .jobstate import FINAL_STATES, JOB_ID_RE, load_state, save_json_atomic, utc_now
from .protocol import AgentError

POLL_S = 1.0  # how often a waiting supervisor looks at the jobs it waits for


def check_spec(spec):
    after = spec.get("after")
    if after is None:
        return
    if not isinstance(after, list) or not all(
            isinstance(j, str) and JOB_ID_RE.match(j) for j in after):
        raise AgentError("launch: field after must be a list of job ids, got %r." % (after,),
                         hint="e.g. {\"after\": [\"mnist-20260101-120000-ab12\"]}")
    if spec.get("job_id") in after:
        raise AgentError("launch: job %r cannot wait for itself." % spec["job_id"])


def pending(root, job_ids):
    """The jobs in `job_ids` that are not final yet."""
    left = []
    for job_id in job_ids:
        path = os.path.join(root, "jobs", job_id)
        if not os.path.isfile(os.path.join(path, "state.json")):
            continue  # never launched here: nothing to wait for
        try:
            state = load_state(path)
        except (OSError, ValueError):
            continue
        if state.get("state") not in FINAL_STATES:
            left.append(job_id)
    return left


def wait(path, spec, state, cancel):
    """Block until every job in spec['after'] is final: True, or False when cancelled."""
    root = os.path.dirname(os.path.dirname(path))
    left = pending(root, spec.get("after") or [])
    if left:
        state.update(state="queued", queued_at=utc_now(), waiting_for=left)
        save_json_atomic(os.path.join(path, "state.json"), state)
    while left and not cancel:
        time.sleep(POLL_S)
        left = pending(root, left)
    state.pop("waiting_for", None)
    return not cancel
