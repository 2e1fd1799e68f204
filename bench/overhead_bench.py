#!/usr/bin/env python3
"""Overhead of a warm `cube remote run` against doing the same by hand over OpenSSH.

Peers, timed in the same run against the same lab host:
  ssh-true      `ssh host true`: the floor of one SSH round trip
  by-hand       rsync the cube up, `ssh host python3 hello.py greet ...`, rsync outputs back
  cube          `cube remote run cubes/hello --host lab1 --task greet` (warm: agent, env, code
                already on the host)

Usage: python bench/overhead_bench.py [--runs 5]
Starts its own lab host in a temporary CUBE_HOME and tears it down afterwards.
"""

from __future__ import annotations

import argparse
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


def ssh_base(spec, known_hosts: Path) -> list[str]:
    return ["ssh", "-p", str(spec.port), "-i", str(spec.identity_files[0]),
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", f"{spec.user}@{spec.hostname}"]


def by_hand(cube_dir: Path, spec, known_hosts: Path, target: str) -> float:
    ssh = ssh_base(spec, known_hosts)
    rsh = " ".join(ssh[:-1])
    remote = f"{spec.user}@{spec.hostname}"
    ws = f"{target}/workspace"
    start = time.perf_counter()
    subprocess.run(["rsync", "-a", "-e", rsh, f"{cube_dir}/", f"{remote}:{target}/"], check=True)
    subprocess.run([*ssh, f"cd {target} && python3 hello.py greet --names={ws}/names.yaml "
                    f"--greetings_dir={ws}/greetings"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["rsync", "-a", "-e", rsh, f"{remote}:{ws}/greetings/",
                    f"{cube_dir}/workspace/greetings/"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cube-bench-"))
    os.environ["CUBE_HOME"] = str(home)
    from controller import lab
    from controller.hosts import resolve_host

    lab.lab_up(1)
    try:
        spec = resolve_host("lab1")
        known = home / "known_hosts"
        cube_dir = home / "hello"
        shutil.copytree(REPO / "cubes" / "hello", cube_dir,
                        ignore=shutil.ignore_patterns("greetings", "report", "__pycache__"))
        run = [sys.executable, "-m", "controller.cli", "remote", "run", str(cube_dir),
               "--host", "lab1", "--task", "greet"]
        timed(run)  # warm-up: uploads the agent, provisions the env, syncs the code
        target = f"{spec.root}/by-hand/hello"
        subprocess.run([*ssh_base(spec, known), f"mkdir -p {target}"], check=True)
        ssh_true = median_of(args.runs, lambda: timed([*ssh_base(spec, known), "true"]))
        manual = median_of(args.runs, lambda: by_hand(cube_dir, spec, known, target))
        cube = median_of(args.runs, lambda: timed(run))
    finally:
        lab.lab_down()
        shutil.rmtree(home, ignore_errors=True)
    print(f"median of {args.runs} runs (warm host)")
    print(f"  ssh host true            {ssh_true:7.3f} s")
    print(f"  rsync + ssh by hand      {manual:7.3f} s")
    print(f"  cube remote run          {cube:7.3f} s")
    print(f"  overhead vs ssh true     {cube - ssh_true:7.3f} s   ratio {cube / ssh_true:5.2f}")
    print(f"  overhead vs by hand      {cube - manual:7.3f} s   ratio {cube / manual:5.2f}")
    print("target: under 1.5 s of overhead over `ssh host true` on a warm host")


if __name__ == "__main__":
    main()
