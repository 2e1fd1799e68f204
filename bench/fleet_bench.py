#!/usr/bin/env python3
"""`cube hosts` over 16 lab hosts against probing one, in the same run.

Peers, timed against the same lab:
  one host      `cube hosts lab1`: one connect + agent probe, plus the CLI's start-up
  16 hosts      `cube hosts @lab`: the same for 16 hosts in parallel
  ssh x16       16 sequential `ssh host true` runs (OpenSSH, the lab's key and known_hosts):
                what a shell loop over the hosts costs before it asks them anything

Target: 16 hosts / one host <= 2.0 (parallel probes, not 16 serial ones).

Usage: python bench/fleet_bench.py [--runs 5] [--hosts 16] [--reuse]
Starts 16 lab hosts in a temporary CUBE_HOME and tears them down afterwards; with --reuse it
uses the lab of the current CUBE_HOME (started if needed) and leaves it running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(argv: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    return time.perf_counter() - start


def median_of(runs: int, fn) -> float:
    return statistics.median(fn() for _ in range(runs))


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine: the lab's hosts share its cores, so a
    parallel probe can only be as parallel as they are idle."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(fn) -> tuple[float, float]:
    """fn's result and the share of the machine's CPU time that was busy while it ran."""
    before = cpu_busy()
    result = fn()
    after = cpu_busy()
    return result, (after[0] - before[0]) / max(1, after[1] - before[1])


def ssh_base(spec, known_hosts: Path) -> list[str]:
    return ["ssh", "-p", str(spec.port), "-i", str(spec.identity_files[0]),
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", f"{spec.user}@{spec.hostname}"]


def ssh_loop(specs, known_hosts: Path) -> float:
    start = time.perf_counter()
    for spec in specs:
        subprocess.run([*ssh_base(spec, known_hosts), "true"], check=True)
    return time.perf_counter() - start


def cube_hosts(selector: str, timeout: float = 10) -> list[str]:
    return [sys.executable, "-m", "controller.cli", "hosts", selector, "--json",
            "--timeout", str(timeout)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--reuse", action="store_true",
                        help="use (and keep) the lab of the current CUBE_HOME")
    args = parser.parse_args()
    home = None
    if not args.reuse:
        home = Path(tempfile.mkdtemp(prefix="cube-bench-"))
        os.environ["CUBE_HOME"] = str(home)
    from controller import lab, paths
    from controller.selectors import select_hosts

    start = time.perf_counter()
    lab.lab_up(args.hosts)
    lab_up = time.perf_counter() - start
    try:
        specs = select_hosts("@lab", [])
        known = paths.known_hosts_file()
        # Warm-up: uploads the agent to every host and fills the hosts' interpreter caches
        # (16 cold hosts sharing a small machine's cores: more than the default 10 s).
        warm = subprocess.run(cube_hosts("@lab", timeout=120), check=True, capture_output=True,
                              text=True)
        down = {h["name"]: h["error"] for h in json.loads(warm.stdout)["hosts"]
                if not h["reachable"]}
        if down:
            raise SystemExit(f"unreachable lab hosts: {down}")
        one = median_of(args.runs, lambda: timed(cube_hosts("lab1")))
        many, busy = busy_share(lambda: median_of(args.runs, lambda: timed(cube_hosts("@lab"))))
        loop = median_of(args.runs, lambda: ssh_loop(specs, known))
        ssh_one = median_of(args.runs, lambda: ssh_loop(specs[:1], known))
    finally:
        if home is not None:
            lab.lab_down()
            shutil.rmtree(home, ignore_errors=True)
    n = len(specs)
    print(f"median of {args.runs} runs, {n} lab hosts (started in {lab_up:.2f} s)")
    print(f"  cube hosts lab1              {one:7.3f} s")
    print(f"  cube hosts @lab ({n} hosts)   {many:7.3f} s   ratio {many / one:5.2f}"
          "  (target <= 2.0)")
    print(f"  ssh host true (one host)     {ssh_one:7.3f} s")
    print(f"  ssh host true x{n} in a row   {loop:7.3f} s")
    print(f"machine: {os.cpu_count()} cores shared by the controller and all {n} lab hosts, "
          f"{busy:.0%} busy during the {n}-host runs (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
