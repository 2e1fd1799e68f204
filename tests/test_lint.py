"""Lint and types are part of the test command: scripts/test.sh runs ruff and mypy with the
project's configuration before pytest, and stops on the first error (set -e)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, require

VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = VENV_BIN / name
    require(path.exists(), f"{name} is installed by scripts/setup.sh --full")
    return str(path)


def checks_in_test_script() -> list[str]:
    lines = (REPO / "scripts" / "test.sh").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_the_test_command_runs_ruff_and_mypy_before_pytest_and_stops_on_failure():
    lines = checks_in_test_script()
    assert "set -euo pipefail" in lines
    ruff = next(i for i, line in enumerate(lines) if "ruff check" in line)
    mypy = next(i for i, line in enumerate(lines) if line.endswith("mypy"))
    pytest_line = next(i for i, line in enumerate(lines) if "pytest" in line)
    assert ruff < pytest_line and mypy < pytest_line


def project_copy(tmp_path: Path) -> Path:
    """The configuration and one package of the project, where a bad file can be planted."""
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copy(REPO / "pyproject.toml", copy)
    (copy / "controller").mkdir()
    (copy / "agent").mkdir()
    (copy / "controller" / "__init__.py").write_text("")
    (copy / "agent" / "__init__.py").write_text("")
    return copy


def test_ruff_fails_on_an_unused_import_and_a_function_level_import(tmp_path):
    copy = project_copy(tmp_path)
    (copy / "controller" / "bad.py").write_text(
        "import os\n\n\ndef f() -> int:\n    import json\n\n    return len(json.dumps(1))\n")
    proc = subprocess.run([tool("ruff"), "check", "controller"], cwd=copy, capture_output=True,
                          text=True)
    assert proc.returncode == 1
    assert "F401" in proc.stdout and "PLC0415" in proc.stdout


def test_mypy_fails_on_a_type_error(tmp_path):
    copy = project_copy(tmp_path)
    (copy / "controller" / "bad.py").write_text("def f(x: int) -> str:\n    return x\n")
    proc = subprocess.run([tool("mypy")], cwd=copy, capture_output=True, text=True)
    assert proc.returncode == 1 and "Incompatible return value type" in proc.stdout


def test_the_project_itself_is_clean_under_its_own_lint_configuration():
    proc = subprocess.run([tool("ruff"), "check", "controller", "agent", "tests", "bench"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
