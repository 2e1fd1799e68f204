#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the suite needs, checks lint and types,
# then runs all of it.
# Under CI=true, tests that need SSH, Docker or TensorFlow fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --full
# Lint, import order and types first: a ruff or mypy error fails the run like a failing test.
.venv/bin/ruff check controller agent tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest -ra "$@"
