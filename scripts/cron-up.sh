#!/usr/bin/env bash
# cron for `cube schedule` (and its tests): installs Debian's cron when missing and starts the
# daemon where no init system runs it. Idempotent; fast when done.
set -euo pipefail
sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
if ! command -v crontab >/dev/null 2>&1; then
  echo "cron-up: installing cron"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq cron >/dev/null
fi
if ! pgrep -x cron >/dev/null 2>&1; then
  $sudo /usr/sbin/cron   # forks into the background itself
fi
