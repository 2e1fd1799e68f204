#!/usr/bin/env bash
# Installs what cube needs on a fresh Debian machine (idempotent; fast when already done):
#   system packages: OpenSSH server+client (the lab's test hosts), rsync (benchmark peer only),
#   iproute2 (network namespaces), docker.io + debootstrap (container runtime);
#   a virtualenv .venv with cube installed editable.
# Usage: scripts/setup.sh [--full]
#   --full  also the `serve` and `test` extras (TensorFlow, FastAPI, pytest), a running
#           Docker engine with the offline base image, and podman (rootful, and rootless for
#           the user cube-rootless) with that image, Chromium and its driver (browser tests),
#           cron (schedules), and Slurm with munge (the Slurm lab): what the test suite needs.
set -euo pipefail
cd "$(dirname "$0")/.."
full=0
[[ "${1:-}" == "--full" ]] && full=1

need_pkgs=()
for pair in sshd:openssh-server ssh:openssh-client rsync:rsync ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [[ -x "/usr/sbin/${pair%%:*}" ]] || need_pkgs+=("${pair##*:}")
done
if (( full )); then
  command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || [[ -x /usr/sbin/debootstrap ]] || need_pkgs+=(debootstrap)
fi
if (( ${#need_pkgs[@]} )); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "setup: installing ${need_pkgs[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
extras=""
(( full )) && extras="[serve,test]"
stamp=".venv/.cube-installed$extras"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "setup: installing cube$extras into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e ".$extras"
  touch "$stamp"
fi
(( full )) && scripts/docker-up.sh
(( full )) && scripts/browser-up.sh
(( full )) && scripts/cron-up.sh
# podman, rootful and rootless (for the tests' rootless user); it needs root
(( full )) && $( [[ $(id -u) -eq 0 ]] || echo sudo ) scripts/podman-up.sh --user cube-rootless
# Slurm and munge for `cube lab up --slurm` and tests/test_slurm.py (installed, not started)
(( full )) && scripts/slurm-up.sh
echo "setup: ready (.venv/bin/cube $(.venv/bin/cube --version | cut -d' ' -f2))"
