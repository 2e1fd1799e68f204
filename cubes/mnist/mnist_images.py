"""Turn any PNG/JPEG of a digit into MNIST's format: 28x28 uint8, white digit on black.

A 28x28 image is taken as it is (after inversion, if needed): it already is MNIST-shaped.
Any other size goes through MNIST's own normalisation: crop to the ink, scale the longer side
to 20 pixels keeping the aspect ratio, and place it in a 28x28 frame with its centre of mass
at the centre. A light background (photos, scans: dark ink on white paper) is inverted first.

controller/serve.py (`cube serve`) carries the same steps, so the CLI service and the infer task
read an image the same way; keep the two in step.
"""

from __future__ import annotations

import io

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageError(ValueError):
    """The bytes are not a readable image."""


def load_digit(data: bytes, name: str = "image") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            gray = np.asarray(img.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{name} is not a readable PNG or JPEG image ({err}).") from err
    return to_mnist(gray)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """2-D grayscale array (0..255) of any size -> 28x28 uint8 in MNIST's layout."""
    if _light_background(gray):
        gray = 255.0 - gray
    if gray.shape == (28, 28):
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return _center(_fit_20(_crop_to_ink(gray)))


def _light_background(gray: np.ndarray) -> bool:
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(np.median(border)) > 127


def _crop_to_ink(gray: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(gray > 0.1 * max(float(gray.max()), 1.0))
    if len(rows) == 0:  # a blank image stays blank
        return gray
    return gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _fit_20(gray: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = gray.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)


def _center(digit: np.ndarray) -> np.ndarray:
    h, w = digit.shape
    total = float(digit.sum())
    cy, cx = ((np.indices(digit.shape) * digit).sum(axis=(1, 2)) / total
              if total > 0 else (h / 2, w / 2))
    top = int(np.clip(round(14 - cy), 0, 28 - h))
    left = int(np.clip(round(14 - cx), 0, 28 - w))
    out = np.zeros((28, 28), dtype=np.float32)
    out[top:top + h, left:left + w] = digit
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
