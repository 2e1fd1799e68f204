"""Shared fixtures. Every test runs with CUBE_HOME in a temp folder so it never touches the
developer's own ~/.cube. Fixture modules of each concern live in tests/fixtures/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytest_plugins: list[str] = ["tests.fixtures.lab", "tests.fixtures.docker",
                             "tests.fixtures.podman", "tests.fixtures.browser", "tests.fixtures.slurm"]


def require(condition: bool, why: str) -> None:
    """Skip when a real component is missing locally; under CI=true that is a failure instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI=true: {why}")
    pytest.skip(why)


@pytest.fixture(autouse=True)
def cube_home(tmp_path_factory, monkeypatch) -> Path:
    home = tmp_path_factory.mktemp("cube-home")
    monkeypatch.setenv("CUBE_HOME", str(home))
    return home
