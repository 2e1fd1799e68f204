"""Submissions: `remote.run` (detached) in a background thread per submitted job, so the page
answers at once and shows the run's progress messages while it connects, syncs and provisions.
Once the job runs, its follower (controller.ui.followers) takes over."""

from __future__ import annotations

import secrets
import sys
import threading
import time
from dataclasses import dataclass, field, replace

from controller import remote
from controller.errors import CubeError
from controller.jobs import Ledger
from controller.sinks import Sinks
from controller.ui.followers import Followers


@dataclass
class Submission:
    id: str
    request: remote.RunRequest
    created_at: float = field(default_factory=time.time)
    messages: list[str] = field(default_factory=list)
    job_id: str | None = None
    done: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "job_id": self.job_id, "done": self.done, "error": self.error,
                "messages": self.messages, "host": self.request.host,
                "tasks": self.request.tasks, "cube": str(self.request.cube_path)}


class Submissions:
    def __init__(self, followers: Followers) -> None:
        self._followers = followers
        self._items: dict[str, Submission] = {}

    def start(self, request: remote.RunRequest) -> Submission:
        sub = Submission(secrets.token_hex(6), replace(request, detach=True))
        self._items[sub.id] = sub
        threading.Thread(target=self._run, args=(sub,), daemon=True,
                         name=f"cube-ui-submit-{sub.id}").start()
        return sub

    def get(self, sub_id: str) -> Submission | None:
        return self._items.get(sub_id)

    def _run(self, sub: Submission) -> None:
        sinks = Sinks(log=sub.messages.append,
                      job_started=lambda job_id: setattr(sub, "job_id", job_id))
        try:
            result = remote.run(sub.request, sinks)
            sub.job_id = result.job_id
            with Ledger() as ledger:
                self._followers.ensure(ledger.get(result.job_id))
        except CubeError as err:
            sub.error = str(err)
        except Exception as err:  # a thread has no caller: the page shows what went wrong
            sub.error = f"{type(err).__name__}: {err}"
            print(f"cube ui: submission {sub.id} failed: {sub.error}", file=sys.stderr)
        finally:
            sub.done = True
