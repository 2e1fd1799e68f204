"""Slurm hosts: a login node to which cube hands its jobs (`scheduler: slurm` in the inventory).

The run itself is any host's run: sync to the host's root (for a Slurm host its `shared_root`,
seen by the compute nodes too), provision there, then this module's `SlurmLauncher` asks the
agent's `slurm-submit` verb (agent/slurm.py) to write the job folder and submit ONE sbatch job
whose batch script runs the agent's supervisor. The agent then answers `status`, `read-log` and
`cancel` for that job from Slurm (squeue/scontrol/sacct states, scancel), so attach, logs -f,
status, cancel and fetch are unchanged on the controller.

Inventory keys (all optional besides `scheduler`): partition, account, time, mem,
cpus_per_task, sbatch_args (list), shared_root. `--partition` and `--time` override per run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from controller.errors import ConfigError, CubeError

if TYPE_CHECKING:  # only annotations: hosts.py imports this module, keep it light
    from controller.runtimes.base import LaunchSpec
    from controller.target import Target

SCHEDULERS = ("slurm",)
FIELDS = ("scheduler", "partition", "account", "time", "mem", "cpus_per_task", "sbatch_args",
          "shared_root")
# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED.
TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|"
                     r"infinite)$")
MEM_RE = re.compile(r"^\d+[KMGT]?$")


@dataclass
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    sbatch_args: list[str] = field(default_factory=list)
    shared_root: str | None = None
    gpus: int = 0                 # this run's accelerator count (--gres=gpu:N)
    stage: bool = False           # a sweep's variant: write the job, submit it in an array
    # Where each value came from, for errors: "hosts.NAME.partition" or "--partition".
    origin: dict[str, str] = field(default_factory=dict)
    inventory: Path | None = None

    def sbatch(self) -> list[str]:
        """The options this run adds to the agent's own (job name, output, requeue, signal)."""
        args = [f"--{flag}={value}" for flag, value in (
            ("partition", self.partition), ("account", self.account), ("time", self.time),
            ("mem", self.mem), ("cpus-per-task", self.cpus_per_task)) if value is not None]
        if self.gpus > 0:
            args.append(f"--gres=gpu:{self.gpus}")
        return args + list(self.sbatch_args)

    def field_of(self, key: str) -> str:
        return self.origin.get(key, key)


# ---- the inventory --------------------------------------------------------------------------

def parse_settings(path: Path, name: str, entry: dict) -> SlurmSettings | None:
    """The Slurm keys of one inventory host (None when it has no `scheduler`); ConfigErrors
    name the file and the field."""
    where = f"hosts.{name}"
    scheduler = entry.get("scheduler")
    extra = [k for k in FIELDS[1:] if k in entry]
    if scheduler is None:
        if extra:
            raise ConfigError(path, f"host '{name}' has '{extra[0]}' but no 'scheduler'.",
                              "Add `scheduler: slurm` (a Slurm login node) or remove the key.",
                              field=f"{where}.{extra[0]}")
        return None
    if scheduler not in SCHEDULERS:
        raise ConfigError(path, f"'scheduler' of host '{name}' must be one of "
                          f"{', '.join(SCHEDULERS)}, not {scheduler!r}.",
                          "Write `scheduler: slurm` for a Slurm login node.",
                          field=f"{where}.scheduler")

    def text(key: str, pattern: re.Pattern | None = None, example: str = "") -> str | None:
        value = entry.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and key in ("time", "mem"):
            value = str(value)  # time: minutes, mem: megabytes, as sbatch reads a bare number
        if value is not None and (not isinstance(value, str) or not value
                                  or (pattern and not pattern.match(value))):
            raise ConfigError(path, f"'{key}' of host '{name}' is not valid: {value!r}.",
                              f"Write it as sbatch --{key.replace('_', '-')} takes it{example}.",
                              field=f"{where}.{key}")
        return value

    cpus = entry.get("cpus_per_task")
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1):
        raise ConfigError(path, f"'cpus_per_task' of host '{name}' must be a whole number >= 1, "
                          f"not {cpus!r}.", "e.g. cpus_per_task: 4", field=f"{where}.cpus_per_task")
    args = entry.get("sbatch_args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConfigError(path, f"'sbatch_args' of host '{name}' must be a list of strings.",
                          "e.g. sbatch_args: [--qos=normal, --constraint=a100]",
                          field=f"{where}.sbatch_args")
    settings = SlurmSettings(
        partition=text("partition"), account=text("account"),
        time=text("time", TIME_RE, ", e.g. 90 (minutes), 2:00:00 or 1-00:00:00"),
        mem=text("mem", MEM_RE, ", e.g. 16G or 4000 (MB)"), cpus_per_task=cpus,
        sbatch_args=list(args), shared_root=text("shared_root"), inventory=path)
    settings.origin = {k: f"{where}.{k}" for k in FIELDS}
    return settings


def apply_overrides(settings: SlurmSettings, *, partition: str | None, time: str | None,
                    gpus: int) -> None:
    """--partition and --time for this run; the accelerator count the cube asks for."""
    if time is not None and not TIME_RE.match(time):
        raise CubeError(f"--time {time!r} is not a Slurm time limit.",
                        "Use minutes (90), HH:MM:SS (2:00:00) or D-HH:MM:SS (1-00:00:00).")
    if partition is not None:
        settings.partition, settings.origin["partition"] = partition, "--partition"
    if time is not None:
        settings.time, settings.origin["time"] = time, "--time"
    settings.gpus = gpus


# ---- before anything is written on the login node ----------------------------------------------

CHECK_SCRIPT = r"""
command -v sbatch >/dev/null 2>&1 || exit 10
out=$(sinfo -h -o %R 2>&1) || { printf '%s' "$out"; exit 11; }
if [ -n "$1" ] && [ ! -d "$1" ]; then exit 12; fi
printf '%s' "$out"
"""


def check_login_node(target: Target, settings: SlurmSettings, host: str) -> list[str]:
    """sbatch is there and answers, and `shared_root` exists (the agent would otherwise create
    it on a filesystem the compute nodes may not see). Runs before any agent call. Answers the
    cluster's partitions."""
    root = target.root if settings.shared_root else ""
    result = target.run(["sh", "-c", CHECK_SCRIPT, "sh", root], check=False, timeout=60)
    inventory = settings.inventory or Path("hosts.yaml")
    if result.code == 10:
        raise ConfigError(inventory, f"host '{host}' is marked as a Slurm login node, but it has "
                          "no `sbatch` on its PATH.",
                          "Point the host at the cluster's login node, or remove `scheduler`.",
                          field=settings.field_of("scheduler"))
    if result.code == 11:
        raise ConfigError(inventory, f"host '{host}' is marked as a Slurm login node, but Slurm "
                          f"does not answer there (`sinfo`: {result.stdout.strip()[-300:]}).",
                          "Check slurm.conf / SLURM_CONF and slurmctld on that cluster, or "
                          "remove `scheduler`.", field=settings.field_of("scheduler"))
    if result.code == 12:
        raise ConfigError(inventory, f"shared_root {settings.shared_root!r} of host '{host}' does "
                          f"not exist there ({root}).",
                          "Give the cube root on a filesystem the compute nodes share "
                          "(create it first), or drop shared_root to use the host's root.",
                          field=settings.field_of("shared_root"))
    if result.code != 0:
        raise CubeError(f"Checking Slurm on host '{host}' failed (exit {result.code}): "
                        f"{(result.stderr or result.stdout).strip()[-300:]}",
                        "Check the login node.")
    return [p.rstrip("*") for p in result.stdout.split()]


# ---- the launcher -----------------------------------------------------------------------------

class SlurmLauncher:
    """Submits the job with sbatch through the login node's agent; answers its state (queued
    with Slurm's reason, or already running) and `slurm_job_id`."""

    def __init__(self, settings: SlurmSettings, host: str):
        self.settings, self.host = settings, host

    def launch(self, target: Target, job_id: str, name: str | None, spec: LaunchSpec) -> dict:
        payload = {"spec": spec.agent_spec(job_id, name), "sbatch": self.settings.sbatch()}
        verb = "slurm-stage" if self.settings.stage else "slurm-submit"
        try:
            return target.agent(verb, input=json.dumps(payload).encode())
        except ConfigError:
            raise
        except CubeError as err:
            raise self._refusal(str(err)) from None

    def _refusal(self, message: str) -> CubeError:
        """sbatch's own words, pinned to the inventory field (or option) that caused them."""
        words = message.split("\n")[0]
        for key, needle in (("partition", "partition"), ("account", "account"),
                            ("time", "time limit"), ("mem", "memory"),
                            ("cpus_per_task", "cpu")):
            if needle in words.lower() and getattr(self.settings, key) is not None:
                return ConfigError(self.settings.inventory or Path("hosts.yaml"),
                                   f"host '{self.host}': {words}",
                                   f"Fix {key} (sbatch refused {getattr(self.settings, key)!r}).",
                                   field=self.settings.field_of(key))
        return CubeError(f"host '{self.host}': {words}",
                         "Check the host's sbatch_args and Slurm settings in the inventory.")


def submit_array(target: Target, host: str, name: str, jobs: list[str],
                 max_parallel: int | None) -> dict:
    """ONE job array for jobs staged on this login node (`slurm-stage`): task i runs jobs[i],
    at most `max_parallel` at once (`--array=0-K%N`). {array_job_id, jobs: {id: state}}."""
    payload = {"name": name, "jobs": jobs, "max_parallel": max_parallel}
    try:
        return target.agent("slurm-array", input=json.dumps(payload).encode())
    except ConfigError:
        raise
    except CubeError as err:
        settings = settings_of(target)
        if settings is None:
            raise
        raise SlurmLauncher(settings, host)._refusal(str(err)) from None


def settings_of(target: object) -> SlurmSettings | None:
    """A host target's Slurm settings (None for any other target)."""
    spec = getattr(target, "spec", None)
    return getattr(spec, "slurm", None)


def launcher_for(target: object) -> SlurmLauncher | None:
    settings = settings_of(target)
    if settings is None:
        return None
    return SlurmLauncher(settings, getattr(target, "spec").name)  # noqa: B009 (not in Target)


# ---- a run on a Slurm host (controller.remote) ---------------------------------------------------

def prepare_run(target: object, partition: str | None, time: str | None, cube: object,
                stage: bool = False) -> None:
    """For a Slurm host: this run's overrides, then the login node's checks. Other hosts: no
    --partition/--time (they mean nothing there). `stage`: write the job, submit nothing (a
    sweep then submits its variants as one array, `submit_array`)."""
    settings = settings_of(target)
    if settings is None:
        if partition is not None or time is not None:
            raise CubeError("--partition and --time apply only to Slurm hosts.",
                            "Mark the host with `scheduler: slurm` in the inventory, or drop them.")
        return
    platform = getattr(cube, "platform", {}) or {}
    apply_overrides(settings, partition=partition, time=time,
                    gpus=int(platform.get("accelerator_count") or 0))
    settings.stage = stage
    check_login_node(target, settings, getattr(target, "spec").name)  # type: ignore[arg-type]  # noqa: B009


def note_state(state: dict, seen: str | None, log: Callable[[str], None]) -> str | None:
    """While following: a line each time a Slurm job's state or reason changes."""
    if not state.get("slurm_job_id"):
        return seen
    note = f"Slurm job {state['slurm_job_id']}: {state.get('slurm_state') or 'submitted'}"
    if state.get("state") == "queued" and state.get("reason") not in (None, "None"):
        note += f" ({state['reason']})"
    if state.get("requeues"):
        note += f", requeued {state['requeues']}x"
    if note != seen:
        log(note)
    return note
