"""A real one-node Slurm cluster on a lab host (`cube lab up --slurm`).

Debian's munged, slurmctld and slurmd run as root inside the lab host's network namespace
(entered with nsenter, like its sshd), so each lab's Slurm ports (6817/6818 on the namespace's
loopback) never clash with another lab's. Everything they write lives under
$CUBE_HOME/lab/hosts/<name>/slurm/: config, munge key and socket, state, spool, logs. The lab
host's sshd hands SLURM_CONF to its sessions (controller.lab writes `SetEnv` when the config
exists), so sbatch, squeue and scontrol on the host find this cluster and no other.

The settings are the ones measured to work without cgroups or accounting:
proctrack/linuxproc, task/none, select/cons_tres, no slurmdbd (so `sacct` has nothing and
finished jobs are read with `scontrol show job` while slurmctld keeps them, MinJobAge).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from controller.errors import CubeError

PARTITION = "debug"
DAEMONS = ("munged", "slurmctld", "slurmd")


def slurm_dir(host_dir: Path) -> Path:
    return host_dir / "slurm"


def conf_file(host_dir: Path) -> Path:
    return slurm_dir(host_dir) / "slurm.conf"


def check_installed() -> None:
    missing = [d for d in DAEMONS if not shutil.which(d) and not Path("/usr/sbin", d).exists()]
    if missing or not shutil.which("sbatch"):
        raise CubeError(f"Slurm is not installed here (missing: {', '.join(missing or ['sbatch'])}).",
                        "Install it with scripts/slurm-up.sh (apt-get install slurm-wlm munge).")
    if os.geteuid() != 0:
        raise CubeError("A lab Slurm cluster needs root (its daemons run as root).",
                        "Run `cube lab up --slurm` as root.")


def write_config(host_dir: Path, node: str, cpus: int | None = None) -> Path:
    """slurm.conf and a munge key for a one-node cluster named after the lab host; `cpus`
    defaults to this machine's. Rewritten on every call (the daemons re-read it on start)."""
    d = slurm_dir(host_dir)
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d / "munge", 0o700)
    key = d / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(secrets.token_bytes(1024))
    os.chmod(key, 0o400)
    cpus = cpus or os.cpu_count() or 1
    # slurmctld accepts only the machine's own hostname as its controller's name.
    text = f"""# one-node lab cluster on {node}; written by `cube lab up --slurm`
ClusterName=cube{node}
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d / 'munge' / 'munge.socket'}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# Tests kill jobs at their limit and cancel them: no grace beyond the limit, short kill waits.
OverTimeLimit=0
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    path = conf_file(host_dir)
    path.write_text(text)
    return path


def _netns_argv(netns: str | None) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


def start(host_dir: Path, node: str, netns: str | None) -> None:
    """munged, then slurmctld, then slurmd (each daemonizes); waits until the node is idle."""
    d, conf = slurm_dir(host_dir), conf_file(host_dir)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    prefix = _netns_argv(netns)
    munge = d / "munge"
    commands = [
        ["munged", "--force", f"--socket={munge / 'munge.socket'}",
         f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
         f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
        ["slurmctld", "-f", str(conf)],   # -c would wipe saved state: a restart keeps jobs
        ["slurmd", "-f", str(conf), "-N", node],
    ]
    for argv in commands:
        proc = subprocess.run([*prefix, *argv], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CubeError(f"Lab Slurm: `{' '.join(argv[:1])}` did not start: "
                            f"{(proc.stderr or proc.stdout).strip()[-500:]}",
                            f"See the logs under {d}.")
    wait_idle(host_dir, netns)


def scontrol(host_dir: Path, netns: str | None, *args: str,
             timeout: float = 15) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_CONF": str(conf_file(host_dir))}
    return subprocess.run([*_netns_argv(netns), "scontrol", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_idle(host_dir: Path, netns: str | None, budget: float = 30.0) -> None:
    deadline = time.monotonic() + budget
    last = ""
    while time.monotonic() < deadline:
        proc = scontrol(host_dir, netns, "show", "node", "-o")
        last = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0 and "State=IDLE" in proc.stdout:
            return
        time.sleep(0.3)
    raise CubeError(f"Lab Slurm: the node did not become idle within {budget:g} s ({last[-300:]}).",
                    f"See slurmctld.log and slurmd.log under {slurm_dir(host_dir)}.")


def running(host_dir: Path, netns: str | None) -> bool:
    if not conf_file(host_dir).exists():
        return False
    try:
        return scontrol(host_dir, netns, "ping", timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# ---- what controller.lab calls ----------------------------------------------------------------

def setup(host_dir: Path, node: str, cpus: int | None, netns_mode: bool) -> None:
    check_installed()
    if not netns_mode:
        raise CubeError("A lab Slurm cluster needs the host's own network namespace (its "
                        "daemons listen on fixed ports).", "Run `cube lab up --slurm` as root, "
                        "without --no-netns.")
    write_config(host_dir, node, cpus)


def configured(host_dir: Path) -> bool:
    return conf_file(host_dir).exists()


def sshd_lines(host_dir: Path) -> str:
    """sshd_config lines: sessions on a Slurm lab host find its cluster's config."""
    return f"SetEnv SLURM_CONF={conf_file(host_dir)}\n" if configured(host_dir) else ""


def sshd_ready(host_dir: Path) -> bool:
    """Whether the running sshd was started with the SetEnv line (else it must restart)."""
    try:
        return "SLURM_CONF" in (host_dir / "sshd_config").read_text()
    except OSError:
        return False


def start_if_configured(host_dir: Path, node: str, netns: str | None) -> None:
    if configured(host_dir) and not running(host_dir, netns):
        start(host_dir, node, netns)
