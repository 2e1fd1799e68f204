"""One follower thread per unfinished job: `remote.attach` appends the host's log to the job's
local log file, records the end in the ledger and pulls the outputs.

Exactly one per job in this process, because the follow appends to the local log at its own
size: two followers of one job would write each chunk twice. Every browser tab streams from
that file (controller.ui.pages.logs), so none of them talks to the host.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from controller import remote
from controller.errors import CubeError, TaskFailed
from controller.jobs import Job
from controller.sinks import Sinks

RETRY_AFTER_S = 30.0  # a follower that failed (host down) is not restarted on every page view


@dataclass
class Follow:
    job_id: str
    thread: threading.Thread | None = None
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    ended_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Followers:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._follows: dict[str, Follow] = {}

    def ensure(self, job: Job) -> Follow | None:
        """Start following `job` unless it is settled (final, outputs pulled) or followed.
        Only single-host agent jobs: a multi-node job (launcher `gang`) is followed by the
        `cube remote run` that started it (its ranks' lines reach output.log, which the page
        streams), and a follower here would take over that controller's role."""
        if job.launcher != "agent" or (job.finished and job.outputs_pulled):
            return self._follows.get(job.id)
        with self._lock:
            follow = self._follows.get(job.id)
            if follow and (follow.alive or (follow.ended_at or 0) > time.time() - RETRY_AFTER_S):
                return follow
            follow = Follow(job.id)
            follow.thread = threading.Thread(target=self._run, args=(follow,), daemon=True,
                                             name=f"cube-ui-follow-{job.id}")
            self._follows[job.id] = follow
            follow.thread.start()
            return follow

    def active(self, job_id: str) -> bool:
        follow = self._follows.get(job_id)
        return bool(follow and follow.alive)

    def get(self, job_id: str) -> Follow | None:
        return self._follows.get(job_id)

    def _run(self, follow: Follow) -> None:
        sinks = Sinks(log=follow.messages.append)
        try:
            remote.attach(follow.job_id, sinks)
        except TaskFailed:
            pass  # a failed task is the job's state, recorded in the ledger, not an error here
        except CubeError as err:
            follow.error = str(err)
        except Exception as err:  # a thread has no caller: report, never vanish silently
            follow.error = f"{type(err).__name__}: {err}"
            print(f"cube ui: following {follow.job_id} failed: {follow.error}", file=sys.stderr)
        finally:
            follow.ended_at = time.time()
