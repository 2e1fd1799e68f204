"""Online inference for a trained MNIST model: `cube serve MODEL_DIR`.

A FastAPI app over model_dir/model.keras (10 logits out):
  GET  /health   -> {"status": "ok", "model": path}
  POST /predict  -> {"digit", "probabilities": [10]} from either
                    a multipart upload (field `file`: PNG/JPEG of any size), or
                    JSON {"pixels": 28x28 numbers in 0..255, white digit on black as in MNIST}.
Bad input is a 4xx whose `detail` says what was wrong and what is expected, never a 500.

TensorFlow and FastAPI load only when serving, so the `cube` CLI starts fast without them.
The image steps below match cubes/mnist/mnist_images.py (the cube's infer task): the cube must
run without cube installed and this service without the cube's code, so each carries its own
copy; keep the two in step.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint's `request: Request`
# annotation at definition time, and Request is imported inside create_app.
import io
import json
from pathlib import Path

from controller.errors import CubeError

MAX_BODY_BYTES = 5 * 1024 * 1024
MODEL_FILE = "model.keras"
SERVE_HINT = "Install the serving extras: pip install 'cube[serve]'."


class BadInput(ValueError):
    """The request cannot be read as a digit; becomes a 4xx with this message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------- model loading

def _require_serving_stack() -> None:
    from importlib.util import find_spec  # noqa: PLC0415 (see the module doc: loaded only when serving)

    # (import names, pip name); python-multipart was importable as `multipart` before 0.0.13.
    needed = [(("tensorflow",), "tensorflow-cpu"), (("fastapi",), "fastapi"),
              (("uvicorn",), "uvicorn"), (("python_multipart", "multipart"), "python-multipart"),
              (("PIL",), "pillow")]
    missing = [pip for names, pip in needed if not any(find_spec(n) for n in names)]
    if missing:
        raise CubeError(f"`cube serve` needs {', '.join(missing)}, which "
                        f"{'is' if len(missing) == 1 else 'are'} not installed.", SERVE_HINT)


def load_model(model_dir: Path):
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise CubeError(f"No trained model at {path}.",
                        "Pass the model_dir a train task wrote (it holds model.keras), e.g. "
                        "cubes/mnist/workspace/model.")
    _require_serving_stack()
    import keras  # noqa: PLC0415 (see the module doc: loaded only when serving)

    try:
        # compile=False: no optimizer or learning-rate schedule is needed to predict.
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # Keras raises many types for a bad file
        raise CubeError(f"{path} is not a loadable Keras model ({err}).",
                        "Re-run the train task to write it again.") from err
    if tuple(model.input_shape[1:]) != (28, 28, 1) or model.output_shape[-1] != 10:
        raise CubeError(f"{path} takes {model.input_shape} and gives {model.output_shape}; "
                        "`cube serve` serves MNIST models (28x28x1 in, 10 logits out).")
    return model


def predict(model, pixels) -> dict:
    """28x28 uint8 (white on black) -> {"digit", "probabilities"}."""
    import numpy as np  # noqa: PLC0415 (see the module doc: loaded only when serving)
    import tensorflow as tf  # noqa: PLC0415 (see the module doc: loaded only when serving)

    x = np.asarray(pixels, dtype="float32").reshape(1, 28, 28, 1) / 255.0
    probs = tf.nn.softmax(model(x, training=False)).numpy()[0]
    return {"digit": int(probs.argmax()), "probabilities": [round(float(p), 6) for p in probs]}


# -------------------------------------------------------------------- inputs -> 28x28 uint8

def pixels_from_json(body: bytes):
    import numpy as np  # noqa: PLC0415 (see the module doc: loaded only when serving)

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadInput(f"The request body is not valid JSON ({err}).", 400) from err
    if not isinstance(data, dict) or "pixels" not in data:
        raise BadInput("Missing field 'pixels': send {\"pixels\": [[...28 numbers...], ...28 "
                       "rows]} with values 0..255, or upload an image as multipart field 'file'.")
    try:
        arr = np.asarray(data["pixels"], dtype="float64")
    except (ValueError, TypeError) as err:
        raise BadInput("Field 'pixels' must be a 28x28 array of numbers (rows of equal "
                       "length).") from err
    if arr.shape != (28, 28):
        raise BadInput(f"Field 'pixels' has shape {list(arr.shape)}; it must be 28x28.")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise BadInput("Field 'pixels' has values outside 0..255; send grayscale pixel values "
                       "0..255, white digit on black as in MNIST.")
    return np.rint(arr).astype("uint8")


def pixels_from_image(data: bytes, name: str = "upload"):
    import numpy as np  # noqa: PLC0415 (see the module doc: loaded only when serving)
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 (see the module doc: loaded only when serving)

    if not data:
        raise BadInput(f"The uploaded file '{name}' is empty.")
    try:
        with Image.open(io.BytesIO(data)) as img:
            gray = np.asarray(img.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadInput(f"The uploaded file '{name}' is not a readable PNG or JPEG image.") from err
    return to_mnist(gray)


def to_mnist(gray):
    """Same steps as the cube's infer task: invert a light background; a 28x28 image stays as
    it is; any other size is cropped to the ink, fit in 20x20 and centred by mass in 28x28."""
    import numpy as np  # noqa: PLC0415 (see the module doc: loaded only when serving)

    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if float(np.median(border)) > 127:
        gray = 255.0 - gray
    if gray.shape == (28, 28):
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return _center(_fit_20(_crop_to_ink(gray)))


def _crop_to_ink(gray):
    import numpy as np  # noqa: PLC0415 (see the module doc: loaded only when serving)

    rows, cols = np.nonzero(gray > 0.1 * max(float(gray.max()), 1.0))
    if len(rows) == 0:
        return gray
    return gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _fit_20(gray):
    import numpy as np  # noqa: PLC0415 (see the module doc: loaded only when serving)
    from PIL import Image  # noqa: PLC0415 (see the module doc: loaded only when serving)

    h, w = gray.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)


def _center(digit):
    import numpy as np  # noqa: PLC0415 (see the module doc: loaded only when serving)

    h, w = digit.shape
    total = float(digit.sum())
    cy, cx = ((np.indices(digit.shape) * digit).sum(axis=(1, 2)) / total
              if total > 0 else (h / 2, w / 2))
    top = int(np.clip(round(14 - cy), 0, 28 - h))
    left = int(np.clip(round(14 - cx), 0, 28 - w))
    out = np.zeros((28, 28), dtype=np.float32)
    out[top:top + h, left:left + w] = digit
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ app

async def read_pixels(request):
    """Either content type -> 28x28 uint8; every failure is a BadInput."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise BadInput(f"The request is {int(length):,} bytes; the limit is "
                       f"{MAX_BODY_BYTES:,} bytes (5 MiB).", 413)
    body = await _read_limited(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return pixels_from_json(body)
    if ctype == "multipart/form-data":
        return await _pixels_from_form(request)
    raise BadInput(f"Unsupported content type '{ctype or 'none'}': upload an image as "
                   "multipart/form-data field 'file', or send application/json "
                   "{\"pixels\": 28x28}.", 415)


async def _read_limited(request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():  # Content-Length can be absent or wrong
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadInput(f"The request is over the limit of {MAX_BODY_BYTES:,} bytes "
                           "(5 MiB).", 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette reuses a read body for .form()
    return body


async def _pixels_from_form(request):
    try:
        form = await request.form()
    except Exception as err:  # python-multipart's parse errors have no common base
        raise BadInput(f"The multipart body cannot be parsed ({err}).", 400) from err
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise BadInput("Missing field 'file': upload the image as multipart/form-data field "
                       "'file' (e.g. curl -F file=@digit.png ...).")
    return pixels_from_image(await upload.read(), upload.filename or "upload")


def create_app(model_dir: Path):
    """The FastAPI app serving the model in model_dir (loaded once, here)."""
    model = load_model(Path(model_dir))
    from fastapi import FastAPI, Request  # noqa: PLC0415 (see the module doc: loaded only when serving)
    from fastapi.responses import JSONResponse  # noqa: PLC0415 (see the module doc: loaded only when serving)

    app = FastAPI(title="cube serve: MNIST digits", version="1")

    @app.exception_handler(BadInput)
    async def _bad_input(_request, err: BadInput):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": str(Path(model_dir) / MODEL_FILE)}

    @app.post("/predict")
    async def predict_digit(request: Request):
        return predict(model, await read_pixels(request))

    return app


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Loopback only: off loopback a token is needed, which `cube serve --token` adds."""
    from controller.ui.auth import is_loopback  # noqa: PLC0415 (see the module doc: loaded only when serving)

    if not is_loopback(host):
        raise CubeError(f"Refusing to serve on {host} without a token.",
                        "Use `cube serve --host ADDR` (it sets a token), or bind 127.0.0.1.")
    app = create_app(model_dir)
    import uvicorn  # noqa: PLC0415 (see the module doc: loaded only when serving)

    uvicorn.run(app, host=host, port=port, log_level="info")
