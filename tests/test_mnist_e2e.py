"""The whole chain with a real framework: `cube remote run` provisions a venv with real
TensorFlow on a lab host, runs download, a short train, evaluate and infer, brings the model and
metrics back; then `cube serve` answers a real prediction with that model."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.test_remote import copy_cube, cube, cube_cmd

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"cube serve exited early: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    raise AssertionError("cube serve never became healthy")


def post_image(url: str, image: Path) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{image.name}\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body += image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_mnist_trains_remotely_and_serves_a_prediction(lab_home, tmp_path):
    mnist = copy_cube("mnist", tmp_path)
    ws = mnist / "workspace"
    result = cube("remote", "run", str(mnist), "--host", "lab1",
                  "--task", "download,train,evaluate,infer", "train_config=train-smoke.yaml",
                  timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]

    assert (ws / "data" / "mnist.npz").exists()
    assert (ws / "model" / "model.keras").stat().st_size > 10_000
    train_metrics = json.loads((ws / "model" / "metrics.json").read_text())
    assert len(train_metrics["epochs"]) == 1
    evaluation = json.loads((ws / "eval" / "metrics.json").read_text())
    assert 0.5 < evaluation["test_accuracy"] <= 1.0  # one epoch on 2,000 images: well above chance
    matrix = evaluation["confusion_matrix"]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 10_000
    with open(ws / "predictions" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    samples = sorted(p.name for p in (ws / "samples").iterdir())
    assert sorted(Path(r["file"]).name for r in rows) == samples
    assert all(0 <= int(r["digit"]) <= 9 and 0 < float(r["confidence"]) <= 1 for r in rows)

    port = free_port()
    server = subprocess.Popen(cube_cmd("serve", str(ws / "model"), "--port", str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}/health", server)
        assert health["status"] == "ok"
        sample = ws / "samples" / samples[0]
        answer = post_image(f"http://127.0.0.1:{port}/predict", sample)
        assert 0 <= answer["digit"] <= 9
        assert len(answer["probabilities"]) == 10
        assert abs(sum(answer["probabilities"]) - 1) < 1e-3
        by_file = {Path(r["file"]).name: int(r["digit"]) for r in rows}
        assert answer["digit"] == by_file[sample.name]  # same model, same preprocessing
    finally:
        server.terminate()
        server.wait(timeout=30)
