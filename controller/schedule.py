"""Nightly runs: `cube schedule add NAME --cron '0 2 * * *' -- remote run CUBE ...` installs one
line in the user's crontab; `list`, `remove NAME` and `run NAME` (now, as cron would) manage it.

The line cube writes is self-contained, because cron starts commands with a bare environment
(HOME, LOGNAME, SHELL=/bin/sh, PATH=/usr/bin:/bin) in the home folder:

    0 2 * * * env PATH=... CUBE_HOME=... /abs/.venv/bin/cube remote run /abs/cubes/mnist \
        --host @lab --task train --name nightly >> /abs/schedules/nightly/$(date +\\%Y\\%m\\%d).log 2>&1 \
        # cube-schedule:nightly

absolute paths, the PATH it was added with, `--name NAME` so that a run still going is attached
to rather than doubled, and a log file per night. Lines cube did not write (no marker) are
never touched: the crontab is read, edited by marker and written back whole.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from controller import paths
from controller.errors import CubeError

MARKER = "# cube-schedule:"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CRON_FIELDS = 5
# What cron gives a command (Debian's cron: HOME and LOGNAME from passwd, this SHELL and PATH).
CRON_ENV = {"SHELL": "/bin/sh", "PATH": "/usr/bin:/bin"}


@dataclass
class Schedule:
    name: str
    cron: str
    command: str      # the shell command cron runs (crontab's `%` escapes undone)
    line: str         # the crontab line as written

    @property
    def log_dir(self) -> Path:
        """Where its nightly logs go: the folder its command makes first (`mkdir -p DIR && ...`),
        which holds whatever CUBE_HOME was when it was added."""
        first = shlex.split(self.command.split(" && ", 1)[0])
        return Path(first[2]) if first[:2] == ["mkdir", "-p"] else log_dir(self.name)


def log_dir(name: str) -> Path:
    return paths.cube_home() / "schedules" / name


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise CubeError(f"Schedule name '{name}' is not usable.",
                        "Use letters, digits, '.', '_' and '-' (at most 64), e.g. nightly-mnist.")
    return name


def check_cron(expr: str) -> str:
    fields = expr.split()
    if len(fields) != CRON_FIELDS and not (len(fields) == 1 and expr.startswith("@")):
        raise CubeError(f"'{expr}' is not a cron schedule: it needs 5 fields "
                        "(minute hour day month weekday) or an @-word.",
                        "Example: --cron '0 2 * * *' (every night at 02:00), or @daily.")
    if any(not re.match(r"^[0-9*/,\-A-Za-z@]+$", f) for f in fields):
        raise CubeError(f"'{expr}' has characters cron does not accept.",
                        "Use digits, *, /, ',' and '-' in each of the 5 fields.")
    return " ".join(fields)


# ---- the command cron runs ---------------------------------------------------------------------

def cube_argv() -> list[str]:
    """How to start this cube from anywhere: the `cube` script beside this interpreter."""
    script = Path(sys.executable).with_name("cube")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "controller.cli"]


def absolute_args(args: list[str], cwd: Path) -> list[str]:
    """Arguments naming an existing file or folder (the cube, --inventory, --workspace) become
    absolute; `name=path` overrides stay as given (they are relative to the workspace)."""
    out = []
    for arg in args:
        candidate = cwd / arg
        if not arg.startswith("-") and "=" not in arg and not os.path.isabs(arg) \
                and candidate.exists():
            arg = str(candidate.resolve())
        out.append(arg)
    return out


def with_name(args: list[str], name: str) -> list[str]:
    """`remote run` gets `--name NAME` (attach instead of doubling a run still going)."""
    if args[:2] == ["remote", "run"] and "--name" not in args:
        return [*args, "--name", name]
    return args


def build_command(name: str, args: list[str], cwd: Path) -> str:
    if not args:
        raise CubeError("No cube command to schedule.",
                        "Put it after --, e.g. cube schedule add nightly --cron '0 2 * * *' -- "
                        "remote run cubes/mnist --host @lab --task train")
    argv = [*cube_argv(), *with_name(absolute_args(args, cwd), name)]
    env = {"PATH": os.environ.get("PATH", CRON_ENV["PATH"]),
           "CUBE_HOME": str(paths.cube_home())}
    logs = shlex.quote(str(log_dir(name)))
    return (f"mkdir -p {logs} && env {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} "
            f"{shlex.join(argv)} >> {logs}/$(date +%Y%m%d).log 2>&1")


def crontab_line(name: str, cron: str, command: str) -> str:
    return f"{cron} {command.replace('%', chr(92) + '%')} {MARKER}{name}"


def parse_line(line: str) -> Schedule | None:
    marker = line.rfind(MARKER)
    if marker < 0 or line.lstrip().startswith("#"):
        return None
    name = line[marker + len(MARKER):].strip()
    body = line[:marker].rstrip()
    words = body.split(None, 1 if body.startswith("@") else CRON_FIELDS)
    cron, command = " ".join(words[:-1]), words[-1]
    return Schedule(name, cron, command.replace(chr(92) + "%", "%"), line)


# ---- the user's crontab ------------------------------------------------------------------------

def _crontab_bin() -> str:
    found = shutil.which("crontab")
    if not found:
        raise CubeError("The `crontab` command is not installed on this machine.",
                        "Install cron (Debian/Ubuntu: apt-get install cron) and start it.")
    return found


def read_crontab() -> list[str]:
    proc = subprocess.run([_crontab_bin(), "-l"], capture_output=True, text=True)
    if proc.returncode != 0:
        if "no crontab" in proc.stderr.lower():
            return []
        raise CubeError(f"`crontab -l` failed: {proc.stderr.strip()}", "Check cron's setup.")
    return proc.stdout.splitlines()


def write_crontab(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n" if lines else ""
    proc = subprocess.run([_crontab_bin(), "-"], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CubeError(f"`crontab -` refused the new crontab: {proc.stderr.strip()}",
                        "Nothing was changed; check the schedule expression.")


def schedules() -> list[Schedule]:
    return [s for s in map(parse_line, read_crontab()) if s is not None]


def find(name: str) -> Schedule:
    for entry in schedules():
        if entry.name == name:
            return entry
    raise CubeError(f"No schedule named '{name}' in your crontab.",
                    "List them with `cube schedule list`.")


def add(name: str, cron: str, args: list[str], cwd: Path | None = None) -> Schedule:
    check_name(name)
    cron = check_cron(cron)
    lines = read_crontab()
    if any((s := parse_line(line)) and s.name == name for line in lines):
        raise CubeError(f"A schedule named '{name}' exists already.",
                        f"Remove it first (`cube schedule remove {name}`) or pick another name.")
    command = build_command(name, args, cwd or Path.cwd())
    line = crontab_line(name, cron, command)
    write_crontab([*lines, line])
    return Schedule(name, cron, command, line)


def remove(name: str) -> Schedule:
    entry = find(name)
    write_crontab([line for line in read_crontab() if line != entry.line])
    return entry


def run_now(name: str) -> int:
    """The command exactly as cron would start it: a bare environment, /bin/sh, the home
    folder as working directory. Output goes to the night's log file; returns the exit code."""
    entry = find(name)
    home = os.environ.get("HOME") or str(Path.home())
    env = {**CRON_ENV, "HOME": home, "LOGNAME": os.environ.get("LOGNAME") or os.environ.get(
        "USER") or "root"}
    return subprocess.run(["/bin/sh", "-c", entry.command], env=env, cwd=home).returncode
