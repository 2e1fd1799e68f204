"""MNIST cube: `python mnist.py TASK --param=PATH ...` (MLCube style).

Tasks
  download  --data_config=FILE --data_dir=DIR --log_dir=DIR
  train     --data_dir=DIR --train_config=FILE --model_dir=DIR --log_dir=DIR
  evaluate  --data_dir=DIR --model_dir=DIR --metrics=FILE
  infer     --model_dir=DIR --input_dir=DIR --predictions=FILE

Errors the user can fix (bad config, hash mismatch, corrupt archive) print one sentence naming
the file and field and exit with code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

# TensorFlow's C++ start-up chatter (CPU features, oneDNN) drowns the task's own log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mnist_data import DataError, fetch_dataset, load_dataset
from mnist_distributed import train_distributed
from mnist_images import IMAGE_SUFFIXES, ImageError, load_digit
from mnist_train import ConfigError, load_train_config, train

log = logging.getLogger("mnist")

TASK_PARAMS = {
    "download": ("data_config", "data_dir", "log_dir"),
    "train": ("data_dir", "train_config", "model_dir", "log_dir"),
    "evaluate": ("data_dir", "model_dir", "metrics"),
    "infer": ("model_dir", "input_dir", "predictions"),
}


def setup_logging(log_dir: str | None, task: str) -> None:
    """Log to stdout and, when the task has a log_dir, to log_dir/<task>.log as well."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir) / f"{task}.log", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_model(model_dir: str):
    import keras

    path = Path(model_dir) / "model.keras"
    if not path.is_file():
        raise DataError(f"{path}: no trained model there; run the train task first "
                        "(or pass --model_dir=DIR of a trained model).")
    # compile=False: inference needs neither the optimizer nor its schedule.
    return keras.models.load_model(path, compile=False)


def predict_probabilities(model, images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> softmax probabilities [N,10] (the model outputs logits)."""
    import tensorflow as tf

    x = images.astype("float32")[..., None] / 255.0
    logits = model.predict(x, batch_size=1000, verbose=0)
    return tf.nn.softmax(logits).numpy()


# ------------------------------------------------------------------------------------ tasks

def task_download(args) -> None:
    path = fetch_dataset(Path(args.data_config), Path(args.data_dir))
    log.info("dataset ready: %s", path)


def task_train(args) -> None:
    cfg = load_train_config(Path(args.train_config))
    data = load_dataset(Path(args.data_dir))
    # TF_CONFIG: one worker of a multi-node run (cube remote run --nodes N); else as ever.
    run = train_distributed if os.environ.get("TF_CONFIG") else train
    metrics = run(cfg, data, Path(args.model_dir), Path(args.log_dir))
    log.info("final test accuracy %.4f", metrics["test_accuracy"])


def task_evaluate(args) -> None:
    (_, _), (x_test, y_test) = load_dataset(Path(args.data_dir))
    probs = predict_probabilities(load_model(args.model_dir), x_test)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (y_test, predicted), 1)  # rows: true digit, columns: predicted digit
    report = {"test_accuracy": float((predicted == y_test).mean()), "test_examples": len(y_test),
              "confusion_matrix": confusion.tolist(),
              "confusion_matrix_layout": "rows are the true digit, columns the predicted digit"}
    write_atomic(Path(args.metrics), json.dumps(report, indent=2).encode())
    log.info("test accuracy %.4f on %d images -> %s", report["test_accuracy"], len(y_test),
             args.metrics)


def task_infer(args) -> None:
    files = sorted(p for p in Path(args.input_dir).iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{args.input_dir}: no images there (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)}); put PNG or JPEG files in --input_dir.")
    images = np.stack([load_digit(p.read_bytes(), str(p)) for p in files])
    probs = predict_probabilities(load_model(args.model_dir), images)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "digit", "confidence"])
    for path, p in zip(files, probs):
        writer.writerow([path.name, int(p.argmax()), f"{p.max():.4f}"])
    write_atomic(Path(args.predictions), out.getvalue().encode())
    log.info("predicted %d images -> %s", len(files), args.predictions)


TASKS = {"download": task_download, "train": task_train, "evaluate": task_evaluate,
         "infer": task_infer}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mnist.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    for name in sorted({p for params in TASK_PARAMS.values() for p in params}):
        parser.add_argument(f"--{name}", metavar="PATH")
    args = parser.parse_args(argv)
    missing = [p for p in TASK_PARAMS[args.task] if getattr(args, p) is None]
    if missing:
        parser.error(f"task '{args.task}' needs " + ", ".join(f"--{p}=PATH" for p in missing))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(getattr(args, "log_dir", None), args.task)
    started = time.time()
    try:
        TASKS[args.task](args)
    except (DataError, ConfigError, ImageError) as err:
        log.error("%s", err)
        return 2
    log.info("task %s finished in %.1f s", args.task, time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
