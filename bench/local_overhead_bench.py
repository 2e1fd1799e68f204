#!/usr/bin/env python3
"""Overhead of a warm `cube run` against running the task's own command by hand.

Peers, timed alternately in the same run:
  direct   the task's command as cube would run it: the cube's venv python, hello.py greet
           --names=... --greetings_dir=..., in the cube folder
  cube     `cube run cubes/hello --task greet` with the venv already built (warm)
  startup  `cube --version`: the CLI's own import and start-up floor
  no-typer the same run through controller.cli.local.main_run (argparse only), showing what
           typer + registering every CLI module cost on top

Prints the medians, the overhead (cube - direct) in seconds and as a ratio. Target: under 1 s.
Usage: python bench/local_overhead_bench.py [--runs 10] [--cube cubes/hello --task greet]
Uses a temporary CUBE_HOME and workspace; leaves nothing behind.
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


def cube_cli() -> list[str]:
    found = shutil.which("cube")
    return [found] if found else [sys.executable, "-m", "controller.cli"]


def timed(argv: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def direct_argv(cube_dir: Path, task: str, workspace: Path) -> tuple[list[str], Path, dict]:
    """The task's own command, as the python runtime prepares it, with its environment."""
    from controller import local
    from controller.launchers import task_environment

    plan = local.load_and_plan(local.LocalRequest(cube_dir, task, workspace=workspace),
                               lambda _m: None)
    [launch] = local.prepare(plan, lambda _m: None).tasks
    return launch.argv, Path(launch.cwd), task_environment(launch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cube", type=Path, default=REPO / "cubes" / "hello")
    parser.add_argument("--task", default="greet")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cube-bench-") as tmp:
        os.environ["CUBE_HOME"] = str(Path(tmp) / "home")
        workspace = Path(tmp) / "ws"
        shutil.copytree(args.cube / "workspace", workspace)
        run = [*cube_cli(), "run", str(args.cube), "--task", args.task,
               "--workspace", str(workspace)]
        timed(run)  # cold: builds the env, not measured
        argv, cwd, env = direct_argv(args.cube, args.task, workspace)
        no_typer = [sys.executable, "-c", "import sys; from controller.cli.local import main_run; "
                    "main_run(sys.argv[1:])", *run[len(cube_cli()) + 1:]]
        times: dict[str, list[float]] = {"direct": [], "cube": [], "no-typer": [], "startup": []}
        for _ in range(args.runs):  # interleaved so load changes hit every peer alike
            times["direct"].append(timed(argv, cwd=cwd, env=env))
            times["cube"].append(timed(run))
            times["no-typer"].append(timed(no_typer, env={**os.environ, "PYTHONPATH": str(REPO)}))
            times["startup"].append(timed([*cube_cli(), "--version"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["cube"] - med["direct"]
    print(f"runs: {args.runs}   cube: {' '.join(cube_cli())}   task: {args.cube.name} {args.task}")
    for name in times:
        print(f"  {name:<8} median {med[name]:.3f} s   (min {min(times[name]):.3f}, "
              f"max {max(times[name]):.3f})")
    print(f"overhead of warm cube run over direct: {overhead:.3f} s "
          f"(ratio {med['cube'] / med['direct']:.2f}x); target < 1 s: "
          f"{'met' if overhead < 1 else 'NOT met'}")
    print(f"overhead without typer (main_run): {med['no-typer'] - med['direct']:.3f} s")
    # On a shared, loaded machine the medians carry the load; the minima are the best case.
    low = {k: min(v) for k, v in times.items()}
    print(f"overhead by minima: cube {low['cube'] - low['direct']:.3f} s, "
          f"no-typer {low['no-typer'] - low['direct']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
