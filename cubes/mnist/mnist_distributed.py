"""The train task across several workers: `tf.distribute.MultiWorkerMirroredStrategy`.

Used only when TF_CONFIG is set (cube sets it on every rank of `cube remote run --nodes N`);
without it the train task is mnist_train.train, unchanged. Every worker runs the same steps on
its shard of each global batch (batch_size stays the global batch) and the strategy all-reduces
the gradients, so every worker ends with the same weights: each logs the sha256 of its final
weights so that a run can be checked.

Only the chief (worker 0) writes where the user looks: the model and metrics.json (no
TensorBoard logs in this mode). The others save to a temporary folder that is removed (every
worker takes part in saving, as the strategy's variables may be read across workers). No
resume: a multi-worker run starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from mnist_train import _finish, _write_json, build_model, prepare, scale, shift_images

log = logging.getLogger("mnist")


def cluster() -> tuple[int, int]:
    """(this worker's index, number of workers) from TF_CONFIG."""
    config = json.loads(os.environ["TF_CONFIG"])
    workers = config.get("cluster", {}).get("worker", [])
    return int(config.get("task", {}).get("index", 0)), len(workers)


def weights_digest(model) -> str:
    """sha256 of the weights' bytes, in the model's order: equal on every worker."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(weights.tobytes())
    return digest.hexdigest()


def train_distributed(cfg: dict, data, model_dir: Path, log_dir: Path) -> dict:
    import keras
    import tensorflow as tf

    index, workers = cluster()
    chief = index == 0
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    scratch = None if chief else Path(tempfile.mkdtemp(prefix=f"mnist-worker{index}-"))
    out_dir = model_dir if chief else scratch / "model"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        train_xy, test_xy = prepare(data, cfg["subset"])
        keras.utils.set_random_seed(cfg["seed"])  # the same start on every worker
        with strategy.scope():
            model = build_model(cfg, synchronized=True)
            steps = Steps(strategy, model)
        log.info("worker %d of %d (%s)", index, workers, "chief" if chief else "not chief")
        history: list[dict] = []
        for epoch in range(cfg["epochs"]):
            history.append(steps.epoch(train_xy, test_xy, cfg, epoch))
            log.info("epoch %d/%d: loss %.4f, accuracy %.4f, test accuracy %.4f, %.1f s",
                     epoch + 1, cfg["epochs"], history[-1]["loss"], history[-1]["accuracy"],
                     history[-1]["test_accuracy"], history[-1]["seconds"])
        with strategy.scope():
            digest = weights_digest(model)
            log.info("worker %d: final weights sha256 %s", index, digest)
            metrics = _finish(model, out_dir, cfg, history, len(train_xy[1]))
        metrics.update(workers=workers, weights_sha256=digest)
        if chief:
            _write_json(out_dir / "metrics.json", metrics)
        return metrics
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


class Steps:
    """A training loop of our own: Keras 3.15's fit and evaluate reduce their logs across
    workers in ways MultiWorkerMirroredStrategy refuses (an eager MEAN of a first batch, a
    MEAN along axis 0 of scalars). The model, its optimizer and its schedule are the same."""

    def __init__(self, strategy, model):
        import tensorflow as tf

        self.tf, self.strategy, self.model = tf, strategy, model
        self.loss = keras_loss()
        self.train_step = tf.function(self._train_step)
        self.test_step = tf.function(self._test_step)

    def _dataset(self, x, y, batch_size):
        tf = self.tf
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = \
            tf.data.experimental.AutoShardPolicy.DATA  # every worker holds all the data
        return self.strategy.experimental_distribute_dataset(dataset.with_options(options))

    def _train_step(self, batch):
        tf, model = self.tf, self.model

        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.nn.compute_average_loss(self.loss(y, logits))
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return self._sums(y, logits)

        return self._reduce(self.strategy.run(step, args=batch))

    def _test_step(self, batch):
        return self._reduce(self.strategy.run(
            lambda x, y: self._sums(y, self.model(x, training=False)), args=batch))

    def _sums(self, y, logits):
        tf = self.tf
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=1), y), tf.float32)
        return tf.reduce_sum(self.loss(y, logits)), tf.reduce_sum(correct), \
            tf.cast(tf.size(y), tf.float32)

    def _reduce(self, sums):
        return [self.strategy.reduce("SUM", s, axis=None) for s in sums]

    def _totals(self, step, dataset) -> tuple[float, float]:
        loss = correct = count = 0.0
        for batch in dataset:
            b_loss, b_correct, b_count = step(batch)
            loss, correct, count = loss + float(b_loss), correct + float(b_correct), \
                count + float(b_count)
        return loss / max(count, 1), correct / max(count, 1)

    def epoch(self, train_xy, test_xy, cfg: dict, epoch: int) -> dict:
        """One epoch as mnist_train.run_epoch draws it (same order, same shifts)."""
        x, y = train_xy
        rng = np.random.default_rng([cfg["seed"], epoch])
        order = rng.permutation(len(x))
        x_epoch = scale(shift_images(x[order], cfg["shift_pixels"], rng))
        started = time.time()
        loss, accuracy = self._totals(self.train_step,
                                      self._dataset(x_epoch, y[order], cfg["batch_size"]))
        seconds = time.time() - started
        test_loss, test_acc = self._totals(self.test_step, self._dataset(*test_xy, 1000))
        return {"epoch": epoch + 1, "loss": loss, "accuracy": accuracy, "test_loss": test_loss,
                "test_accuracy": test_acc, "seconds": round(seconds, 2),
                "learning_rate": float(self.model.optimizer.learning_rate.numpy())}


def keras_loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None)  # per example: the strategy averages
