"""What every route of `cube ui` shares: its settings, the CSRF token, the background workers
(job followers, submissions, the fleet view) and the Jinja2 templates of this package."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from controller.ui import auth
from controller.ui.fleetview import FleetView
from controller.ui.followers import Followers
from controller.ui.submissions import Submissions

HERE = Path(__file__).resolve().parent


@dataclass
class UiSettings:
    bind: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    cubes_dir: Path | None = None


@dataclass
class UiContext:
    """What every route needs; one per app, reached as request.app.state.ui."""
    settings: UiSettings
    csrf: str = field(default_factory=auth.new_csrf_token)
    followers: Followers = field(default_factory=Followers)
    fleet: FleetView = field(default_factory=FleetView)
    submissions: Submissions = field(init=False)
    templates: jinja2.Environment = field(init=False)

    def __post_init__(self) -> None:
        self.submissions = Submissions(self.followers)
        self.templates = _templates()


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=jinja2.select_autoescape(["html"]),
                             undefined=jinja2.StrictUndefined)
    env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) \
        if t else "-"
    env.filters["size"] = _size
    env.filters["duration"] = lambda job: _duration(job)
    return env


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "?"


def _duration(job) -> str:
    if not job.started_at:
        return "-"
    seconds = (job.ended_at or time.time()) - job.started_at
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


