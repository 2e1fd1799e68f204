"""The train task: the reference ConvNet (reported at 99.4% on MNIST), trained with Keras.

Model: three conv + batch-norm + ReLU blocks (6 channels 3x3; 12 channels 6x6 stride 2; 24
channels 6x6 stride 2), dense 200 + batch norm + ReLU + dropout 0.5, 10 logits. Optimizer: Adam
with the reference's exponential decay, lr(step) = base + initial * decay_rate ** (step /
decay_steps), decay_rate = 1/e (Fenwicks' exp_decay_lr: base 0.0001, initial 0.01, 2000 steps).

Optional augmentation (`shift_pixels`): each epoch every training image moves by up to that
many pixels in x and y. Not in the reference: on a 15-epoch CPU budget the plain net plateaus
near 99.3%, and small shifts are the cheapest regulariser that closes the gap.

Resuming: after every epoch the full model (weights + optimizer state, whose step counter drives
the learning rate) goes to model_dir/checkpoints/epoch-NNN.keras and the metrics so far to
checkpoints/state.json, both written atomically (the last two checkpoints are kept). A re-run
picks up after the last epoch listed there. Each epoch's shuffle is drawn from (seed, epoch), so a resumed run sees the same batches
as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger("mnist")

OPTIMIZERS = ("adam", "sgd", "rmsprop")
KIND_NAMES = {str: "a string", int: "a whole number", float: "a number", dict: "a mapping"}
REQUIRED = object()
KEEP_CHECKPOINTS = 2  # the newest resumes; one more in case it is damaged. 3 MB each.
# field -> (type, default); nested mapping for the learning-rate schedule.
TRAIN_FIELDS = {"optimizer": (str, REQUIRED), "epochs": (int, REQUIRED),
                "batch_size": (int, REQUIRED), "seed": (int, 0), "subset": (int, None),
                "shift_pixels": (int, 0),
                "learning_rate": (dict, REQUIRED)}
LR_FIELDS = {"initial": (float, REQUIRED), "base": (float, 0.0), "decay_steps": (int, REQUIRED),
             "decay_rate": (float, 1 / math.e)}


class ConfigError(Exception):
    """train.yaml is missing a field or has one of the wrong type."""


# ------------------------------------------------------------------------------ train.yaml

def load_train_config(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the train config ({err}).") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of hyper-parameters "
                          f"({', '.join(TRAIN_FIELDS)}).")
    cfg = _check_fields(path, data, TRAIN_FIELDS, "")
    cfg["learning_rate"] = _check_fields(path, cfg["learning_rate"], LR_FIELDS, "learning_rate.")
    _check_values(path, cfg)
    return cfg


def _check_fields(path: Path, data: dict, fields: dict, prefix: str) -> dict:
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown field '{prefix}{unknown[0]}'; known fields: "
                          f"{', '.join(prefix + f for f in fields)}.")
    out = {}
    for name, (kind, default) in fields.items():
        value = data.get(name, default)
        if value is REQUIRED:
            raise ConfigError(f"{path}: field '{prefix}{name}' is missing; add it "
                              f"({KIND_NAMES[kind]}).")
        if value is not None and not _is(value, kind):
            raise ConfigError(f"{path}: field '{prefix}{name}' must be {KIND_NAMES[kind]}, "
                              f"not {value!r}.")
        out[name] = float(value) if kind is float and value is not None else value
    return out


def _is(value, kind) -> bool:
    if isinstance(value, bool):  # YAML's true/false are ints to Python; never a number here
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _check_values(path: Path, cfg: dict) -> None:
    if cfg["optimizer"].lower() not in OPTIMIZERS:
        raise ConfigError(f"{path}: field 'optimizer' is {cfg['optimizer']!r}; use one of "
                          f"{', '.join(OPTIMIZERS)}.")
    for name in ("epochs", "batch_size", "subset"):
        if cfg[name] is not None and cfg[name] < 1:
            raise ConfigError(f"{path}: field '{name}' must be at least 1, not {cfg[name]}.")
    if not 0 <= cfg["shift_pixels"] <= 4:
        raise ConfigError(f"{path}: field 'shift_pixels' must be 0 (off) to 4, not "
                          f"{cfg['shift_pixels']}.")
    lr = cfg["learning_rate"]
    if lr["initial"] <= 0 or lr["base"] < 0 or lr["decay_steps"] < 1 or not 0 < lr["decay_rate"] <= 1:
        raise ConfigError(f"{path}: field 'learning_rate' needs initial > 0, base >= 0, "
                          "decay_steps >= 1 and 0 < decay_rate <= 1.")


# ------------------------------------------------------------------------------ the model

def _register_schedule():
    import keras

    @keras.saving.register_keras_serializable(package="mnist_cube")
    class ExpDecayToBase(keras.optimizers.schedules.LearningRateSchedule):
        """lr = base + initial * decay_rate ** (step / decay_steps) (the reference schedule)."""

        def __init__(self, initial, base, decay_steps, decay_rate):
            self.initial, self.base = initial, base
            self.decay_steps, self.decay_rate = decay_steps, decay_rate

        def __call__(self, step):
            exponent = keras.ops.cast(step, "float32") / self.decay_steps
            return self.base + self.initial * keras.ops.power(self.decay_rate, exponent)

        def get_config(self):
            return {"initial": self.initial, "base": self.base,
                    "decay_steps": self.decay_steps, "decay_rate": self.decay_rate}

    return ExpDecayToBase


def build_model(cfg: dict, synchronized: bool = False):
    """`synchronized`: batch norm over the global batch of every worker (multi-worker runs,
    mnist_distributed), so that its moving statistics stay the same on all of them."""
    import keras
    from keras import layers

    def batch_norm():
        return layers.BatchNormalization(synchronized=True) if synchronized \
            else layers.BatchNormalization()

    def conv_bn(filters, kernel, strides):
        # The bias is redundant before batch norm, which learns its own shift.
        return [layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False),
                batch_norm(), layers.ReLU()]

    model = keras.Sequential([
        keras.Input((28, 28, 1)), *conv_bn(6, 3, 1), *conv_bn(12, 6, 2), *conv_bn(24, 6, 2),
        layers.Flatten(), layers.Dense(200, use_bias=False), batch_norm(),
        layers.ReLU(), layers.Dropout(0.5), layers.Dense(10)], name="mnist_convnet")
    schedule = _register_schedule()(**cfg["learning_rate"])
    optimizer = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD,
                 "rmsprop": keras.optimizers.RMSprop}[cfg["optimizer"].lower()]
    model.compile(optimizer=optimizer(learning_rate=schedule), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


# ---------------------------------------------------------------------- checkpoints, resume

def _ckpt_dir(model_dir: Path) -> Path:
    return model_dir / "checkpoints"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _save_model(model, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")  # Keras insists on the .keras suffix
    model.save(tmp)
    os.replace(tmp, path)


def resume_state(model_dir: Path, cfg: dict):
    """(model, history) from the last checkpoint, or (None, []) when there is none."""
    import keras

    state_file = _ckpt_dir(model_dir) / "state.json"
    if not state_file.is_file():
        return None, []
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if _resumable(state.get("config")) != _resumable(cfg):
        log.warning("%s was written with another train config; starting afresh", state_file)
        return None, []
    _register_schedule()
    model = keras.models.load_model(_ckpt_dir(model_dir) / state["checkpoint"])
    log.info("resuming after epoch %d from %s (optimizer step %d)", len(state["history"]),
             state["checkpoint"], int(model.optimizer.iterations.numpy()))
    return model, state["history"]


def _resumable(cfg) -> dict:
    """The config a checkpoint must share to be resumed: anything but a longer `epochs`."""
    return {k: v for k, v in (cfg or {}).items() if k != "epochs"}


def _checkpoint(model, model_dir: Path, cfg: dict, history: list) -> None:
    name = f"epoch-{len(history):03d}.keras"
    _save_model(model, _ckpt_dir(model_dir) / name)
    _write_json(_ckpt_dir(model_dir) / "state.json",
                {"version": 1, "config": cfg, "checkpoint": name, "history": history})
    for old in sorted(_ckpt_dir(model_dir).glob("epoch-*.keras"))[:-KEEP_CHECKPOINTS]:
        old.unlink()


# ---------------------------------------------------------------------------------- training

def scale(images: np.ndarray) -> np.ndarray:
    return images.astype("float32")[..., None] / 255.0


def prepare(data, subset):
    """uint8 training images (shifted and scaled per epoch), scaled test images."""
    (x_train, y_train), (x_test, y_test) = data
    if subset:
        x_train, y_train = x_train[:subset], y_train[:subset]
    return (x_train, y_train.astype("int64")), (scale(x_test), y_test.astype("int64"))


def shift_images(images: np.ndarray, max_shift: int, rng) -> np.ndarray:
    """Move each image by up to max_shift pixels in x and y (zero fill): random crops of a
    padded copy, all at once through a strided view."""
    if max_shift == 0:
        return images
    n, size = len(images), images.shape[1]
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    return windows[np.arange(n), dy, dx]


def run_epoch(model, train_xy, test_xy, cfg, epoch, tensorboard) -> dict:
    x, y = train_xy
    rng = np.random.default_rng([cfg["seed"], epoch])
    order = rng.permutation(len(x))
    x_epoch = scale(shift_images(x[order], cfg["shift_pixels"], rng))
    started = time.time()
    fit = model.fit(x_epoch, y[order], batch_size=cfg["batch_size"], epochs=epoch + 1,
                    initial_epoch=epoch, shuffle=False, callbacks=tensorboard, verbose=2)
    seconds = time.time() - started
    test_loss, test_acc = model.evaluate(*test_xy, batch_size=1000, verbose=0)
    return {"epoch": epoch + 1, "loss": fit.history["loss"][-1],
            "accuracy": fit.history["accuracy"][-1], "test_loss": float(test_loss),
            "test_accuracy": float(test_acc), "seconds": round(seconds, 2),
            "learning_rate": float(model.optimizer.learning_rate.numpy())}


def train(cfg: dict, data, model_dir: Path, log_dir: Path) -> dict:
    import keras

    _ckpt_dir(model_dir).mkdir(parents=True, exist_ok=True)
    train_xy, test_xy = prepare(data, cfg["subset"])
    model, history = resume_state(model_dir, cfg)
    # Seeds weights and dropout; offset by the epoch so a resumed run does not replay epoch 1's.
    keras.utils.set_random_seed(cfg["seed"] + len(history))
    if model is None:
        model = build_model(cfg)
    tensorboard = _tensorboard(log_dir)
    if len(history) >= cfg["epochs"]:
        log.info("all %d epochs are already trained in %s", len(history), _ckpt_dir(model_dir))
    for epoch in range(len(history), cfg["epochs"]):
        history.append(run_epoch(model, train_xy, test_xy, cfg, epoch, tensorboard))
        _checkpoint(model, model_dir, cfg, history)
        log.info("epoch %d/%d: loss %.4f, accuracy %.4f, test accuracy %.4f, %.1f s",
                 epoch + 1, cfg["epochs"], history[-1]["loss"], history[-1]["accuracy"],
                 history[-1]["test_accuracy"], history[-1]["seconds"])
    return _finish(model, model_dir, cfg, history, len(train_xy[1]))


def _tensorboard(log_dir: Path) -> list:
    """TensorBoard's callback when the tensorboard package is there (it is in requirements.txt;
    TensorFlow >= 2.16 no longer pulls it in): training should not fail for want of a log."""
    import keras

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(log_dir / "tensorboard"))]


def _finish(model, model_dir: Path, cfg: dict, history: list, n_train: int) -> dict:
    _save_model(model, model_dir / "model.keras")
    seconds = [h["seconds"] for h in history]
    metrics = {"test_accuracy": history[-1]["test_accuracy"] if history else None,
               "epochs": history, "seconds_per_epoch": sum(seconds) / max(len(seconds), 1),
               "train_examples": n_train, "config": cfg}
    _write_json(model_dir / "metrics.json", metrics)
    return metrics
