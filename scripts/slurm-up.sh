#!/usr/bin/env bash
# Installs Debian's Slurm (slurm-wlm: slurmctld, slurmd, sbatch, ...) and munge, only when missing,
# for `cube lab up --slurm` and tests/test_slurm.py. Nothing is started or enabled here: the lab
# starts its own munged/slurmctld/slurmd with its own config (controller/lab_slurm.py).
set -euo pipefail
need=()
for pair in slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-wlm munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [[ -x "/usr/sbin/${pair%%:*}" ]] || need+=("${pair##*:}")
done
if (( ${#need[@]} )); then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "slurm-up: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's packages start their own daemons under systemd; the lab needs none of them.
for unit in slurmctld slurmd munge; do
  systemctl is-active --quiet "$unit" 2>/dev/null && $([[ $(id -u) -eq 0 ]] || echo sudo) systemctl stop "$unit" || true
done
echo "slurm-up: ready (slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null))"
