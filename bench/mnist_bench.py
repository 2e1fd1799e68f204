"""Benchmark: the mnist cube's default training against two named peers, in one run.

    python bench/mnist_bench.py [--keep DIR] [--baseline-epochs 5]

1. Runs the cube as a user would, `python cubes/mnist/mnist.py download` then `train`, with the
   cube's default workspace/data.yaml and workspace/train.yaml, in a temporary workspace.
2. Trains the MLCube MNIST example's model (Flatten, Dense 512 ReLU, Dropout 0.2, Dense 10;
   Adam, batch 32, 5 epochs as in its train.yaml) on the same data, in this process.
3. Prints test accuracy, seconds per epoch and wall time for both, next to the 99.4% the
   reference ConvNet is reported to reach, and the ratio of their test errors.

Target (issue 5): >= 99.4% test accuracy within 10 minutes for download + train on the 2-core
development machine. Timings depend on whatever else the machine runs: the load average is
printed before and after so a noisy run can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads, for a clean table
REPO = Path(__file__).resolve().parent.parent
CUBE = REPO / "cubes" / "mnist"
REFERENCE_ACCURACY = 0.994       # the reference ConvNet's published figure
TARGET_SECONDS = 600             # download + train, default config


def run_task(task: str, **params) -> float:
    """Run one cube task as the cube runs it; returns its wall time in seconds."""
    argv = [sys.executable, str(CUBE / "mnist.py"), task]
    argv += [f"--{k}={v}" for k, v in params.items()]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.time()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"task {task} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                 f"{proc.stderr[-4000:]}")
    return time.time() - started


def bench_cube(ws: Path) -> dict:
    for name in ("data.yaml", "train.yaml"):
        shutil.copy(CUBE / "workspace" / name, ws / name)
    download_s = run_task("download", data_config=ws / "data.yaml", data_dir=ws / "data",
                          log_dir=ws / "logs")
    print(f"  download: {download_s:.1f} s", flush=True)
    train_s = run_task("train", data_dir=ws / "data", train_config=ws / "train.yaml",
                       model_dir=ws / "model", log_dir=ws / "logs")
    metrics = json.loads((ws / "model" / "metrics.json").read_text())
    best = max(e["test_accuracy"] for e in metrics["epochs"])
    return {"name": "cube mnist ConvNet (default train.yaml)", "accuracy": metrics["test_accuracy"],
            "best_epoch_accuracy": best, "epochs": len(metrics["epochs"]),
            "seconds_per_epoch": metrics["seconds_per_epoch"], "download_s": download_s,
            "train_s": train_s, "total_s": download_s + train_s}


def bench_mlcube_example(data_dir: Path, epochs: int) -> dict:
    """MLCube's example model and hyper-parameters (adam, batch 32), on the same npz."""
    import keras
    import numpy as np

    with np.load(data_dir / "mnist.npz") as npz:
        x_train, y_train = npz["x_train"] / 255.0, npz["y_train"]
        x_test, y_test = npz["x_test"] / 255.0, npz["y_test"]
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(),
                              keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dropout(0.2), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.time()
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=2)
    train_s = time.time() - started
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return {"name": "MLCube example (dense 512)", "accuracy": float(accuracy), "epochs": epochs,
            "seconds_per_epoch": train_s / epochs, "train_s": train_s, "total_s": train_s}


def report(cube: dict, peer: dict, load_before, load_after) -> None:
    rows = [("reference ConvNet (published)", f"{REFERENCE_ACCURACY:.2%}", "-", "-", "-"),
            *[(r["name"], f"{r['accuracy']:.2%}", str(r["epochs"]), f"{r['seconds_per_epoch']:.1f}",
               f"{r['total_s']:.0f}") for r in (cube, peer)]]
    header = ("model", "test acc", "epochs", "s/epoch", "wall s")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    err_cube, err_peer = 1 - cube["accuracy"], 1 - peer["accuracy"]
    print(f"\ncube vs reference: {cube['accuracy'] - REFERENCE_ACCURACY:+.2%} accuracy "
          f"({'meets' if cube['accuracy'] >= REFERENCE_ACCURACY else 'misses'} 99.4%); "
          f"best epoch {cube['best_epoch_accuracy']:.2%}")
    print(f"cube vs MLCube example: {err_peer / max(err_cube, 1e-9):.2f}x fewer test errors "
          f"({err_cube * 10000:.0f} vs {err_peer * 10000:.0f} of 10,000); "
          f"{cube['seconds_per_epoch'] / peer['seconds_per_epoch']:.2f}x its seconds per epoch")
    print(f"download + train: {cube['total_s']:.0f} s (target {TARGET_SECONDS} s: "
          f"{'met' if cube['total_s'] <= TARGET_SECONDS else 'missed'}); "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, {load_after:.1f} after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="use and keep this workspace folder")
    parser.add_argument("--baseline-epochs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    ws = args.keep or Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    ws.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    try:
        print(f"cube mnist: download + train in {ws}", flush=True)
        cube = bench_cube(ws)
        print("MLCube example model:", flush=True)
        peer = bench_mlcube_example(ws / "data", args.baseline_epochs)
        print()
        report(cube, peer, load_before, os.getloadavg()[0])
        if args.json:
            args.json.write_text(json.dumps({"cube": cube, "mlcube_example": peer,
                                             "reference_accuracy": REFERENCE_ACCURACY}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
