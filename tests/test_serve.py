"""`cube serve` (controller/serve.py): the FastAPI app over a real tiny Keras model trained by the
mnist cube, called through FastAPI's TestClient (httpx). The model is barely trained, so these
tests check the contract (shapes, probabilities, errors), not which digit it answers."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from tests.test_mnist import CUBE, mnist_base, mnist_data, tiny_model  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tiny_model):  # noqa: F811
    from fastapi.testclient import TestClient

    from controller.serve import create_app

    with TestClient(create_app(tiny_model)) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_model):  # noqa: F811
    from controller.serve import load_model

    return load_model(tiny_model)


@pytest.fixture(scope="module")
def test_digit(mnist_data):  # noqa: F811
    with np.load(mnist_data / "mnist.npz") as npz:
        return npz["x_test"][0]


def png_bytes(pixels: np.ndarray, mode: str = "L", size=None) -> bytes:
    from PIL import Image

    img = Image.fromarray(pixels).convert(mode)
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def model_digit(model, pixels: np.ndarray) -> int:
    x = pixels.astype("float32").reshape(1, 28, 28, 1) / 255.0
    return int(np.argmax(model.predict(x, verbose=0)[0]))


def check_prediction(body: dict) -> None:
    probs = body["probabilities"]
    assert len(probs) == 10 and all(0 <= p <= 1 for p in probs)
    assert sum(probs) == pytest.approx(1, abs=1e-4)
    assert body["digit"] == int(np.argmax(probs))


# ----------------------------------------------------------------------------- good input

def test_health_names_the_model(client, tiny_model):  # noqa: F811
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "model": str(tiny_model / "model.keras")}


def test_predict_from_a_png_upload_matches_the_model(client, model, test_digit):
    resp = client.post("/predict", files={"file": ("digit.png", png_bytes(test_digit), "image/png")})
    assert resp.status_code == 200, resp.text
    check_prediction(resp.json())
    assert resp.json()["digit"] == model_digit(model, test_digit)


def test_predict_from_a_pixel_array_matches_the_model(client, model, test_digit):
    resp = client.post("/predict", json={"pixels": test_digit.tolist()})
    assert resp.status_code == 200, resp.text
    check_prediction(resp.json())
    assert resp.json()["digit"] == model_digit(model, test_digit)


def test_png_and_pixels_of_the_same_digit_give_the_same_answer(client, test_digit):
    by_file = client.post("/predict", files={"file": ("d.png", png_bytes(test_digit), "image/png")})
    by_array = client.post("/predict", json={"pixels": test_digit.tolist()})
    assert by_file.json() == by_array.json()


def test_predict_accepts_a_large_dark_on_light_rgb_image(client):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(img).line([(150, 30), (150, 170)], fill="black", width=18)  # a "1"
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    resp = client.post("/predict", files={"file": ("one.jpg", buf.getvalue(), "image/jpeg")})
    assert resp.status_code == 200, resp.text
    check_prediction(resp.json())


def test_serve_and_infer_turn_images_into_the_same_28x28(test_digit):
    sys.path.insert(0, str(CUBE))
    try:
        import mnist_images
    finally:
        sys.path.remove(str(CUBE))
    from controller.serve import pixels_from_image

    rng = np.random.default_rng(0)
    cases = [png_bytes(test_digit), png_bytes(255 - test_digit, "RGB", (90, 120)),
             png_bytes(rng.integers(0, 256, (50, 37), dtype=np.uint8))]
    for data in cases:
        assert np.array_equal(pixels_from_image(data), mnist_images.load_digit(data))
    assert np.array_equal(pixels_from_image(cases[0]), test_digit)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs,status,words", [
    ({"files": {"file": ("x.png", b"not an image at all", "image/png")}}, 422,
     "'x.png' is not a readable PNG or JPEG image"),
    ({"files": {"file": ("empty.png", b"", "image/png")}}, 422, "'empty.png' is empty"),
    ({"files": {"other": ("x.png", b"abc", "image/png")}}, 422, "Missing field 'file'"),
    ({"json": {"pixels": [[0] * 28] * 27}}, 422, "has shape [27, 28]; it must be 28x28"),
    ({"json": {"pixels": [[0] * 28] * 27 + [[0] * 27]}}, 422, "must be a 28x28 array"),
    ({"json": {"pixels": [[300] * 28] * 28}}, 422, "values outside 0..255"),
    ({"json": {"pixels": [[-1] * 28] * 28}}, 422, "values outside 0..255"),
    ({"json": {"pixels": [["a"] * 28] * 28}}, 422, "must be a 28x28 array of numbers"),
    ({"json": {"image": []}}, 422, "Missing field 'pixels'"),
    ({"json": [1, 2, 3]}, 422, "Missing field 'pixels'"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     "not valid JSON"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
     "Unsupported content type 'text/plain'"),
    ({"content": b"x" * (5 * 1024 * 1024 + 1), "headers": {"content-type": "application/json"}},
     413, "the limit is 5,242,880 bytes"),
])
def test_bad_input_is_a_4xx_with_a_clear_message(client, kwargs, status, words):
    resp = client.post("/predict", **kwargs)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["detail"]


def test_oversized_upload_without_content_length_is_refused(client):
    def chunks():  # a streamed body has no Content-Length: the server must count
        for _ in range(6):
            yield b"\0" * (1024 * 1024)

    resp = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert "over the limit" in resp.json()["detail"]


def test_serving_a_folder_without_a_model_is_a_cube_error(tmp_path):
    from controller.errors import CubeError
    from controller.serve import create_app

    with pytest.raises(CubeError, match="No trained model at .*model.keras"):
        create_app(tmp_path)


def test_cube_serve_without_a_model_exits_2_with_the_message(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-c", "from controller.cli import main; main()",
                           "serve", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "No trained model at" in proc.stderr and "hint:" in proc.stderr
