#!/usr/bin/env bash
# Installs the real browser the web page's tests drive (tests/test_ui*.py): Debian's Chromium
# and its matching chromedriver, from apt (no downloads from elsewhere; the driver always
# matches the browser). Idempotent: does nothing when both are present.
# Usage: scripts/browser-up.sh
set -euo pipefail
if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  exit 0
fi
sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
echo "browser-up: installing chromium chromium-driver"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  chromium chromium-driver fonts-dejavu-core >/dev/null
echo "browser-up: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium installed')"
