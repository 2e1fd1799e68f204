"""Where cube keeps its state on the controller. `CUBE_HOME` (default ~/.cube) moves all of it,
which is how tests stay out of the developer's own home."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cube_home() -> Path:
    return Path(os.environ.get("CUBE_HOME") or Path.home() / ".cube").expanduser()


def envs_dir() -> Path:
    return cube_home() / "envs"


def inventory_file() -> Path:
    return cube_home() / "hosts.yaml"


def known_hosts_file() -> Path:
    """cube's own known_hosts; ~/.ssh/known_hosts is read too (see controller.hosts)."""
    return cube_home() / "known_hosts"


def ledger_file() -> Path:
    return cube_home() / "ledger.db"


def lab_dir() -> Path:
    return cube_home() / "lab"


def agent_package() -> Path:
    """The agent package: built into a zipapp for hosts (controller.agent_bundle), imported
    here for the controller's side of sync (`from agent import sync`)."""
    return REPO_ROOT / "agent"


def local_agent_dir() -> Path:
    """Where this machine keeps its own copy of the agent zipapp (LocalTarget runs it)."""
    return cube_home() / "agent"


def playbooks_dir() -> Path:
    return REPO_ROOT / "playbooks"
