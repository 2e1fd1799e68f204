"""Where library code sends what a person should see. The CLI (and later the web page) passes
sinks in and is the only place that prints; library functions never touch stdout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _discard(_value: object) -> None:
    return None


@dataclass
class Sinks:
    log: Callable[[str], None] = _discard          # cube's own progress and warnings
    output: Callable[[bytes], None] = _discard     # the job's log bytes, as they arrive
    job_started: Callable[[str], None] = _discard  # a job id, once the job exists
