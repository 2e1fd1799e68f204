#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the suite needs, then runs all of it.
# Under CI=true, tests that need SSH, Docker or TensorFlow fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --full
exec .venv/bin/python -m pytest -ra "$@"
