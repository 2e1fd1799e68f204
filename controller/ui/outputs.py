"""A job's outputs as pulled into its local workspace: browse, download, ZIP a folder, find the
per-epoch metrics and a Keras model.

Only the job's declared outputs are served, and every path is resolved (links followed) and must
stay inside the job's workspace: `..`, absolute paths and links that leave it are refused.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from controller.errors import CubeError
from controller.jobs import Job

MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.json"
SEARCH_DEPTH = 3


class OutsideWorkspace(CubeError):
    status = 404


@dataclass
class Entry:
    rel: str      # workspace-relative, posix
    name: str
    is_dir: bool
    size: int


def workspace(job: Job) -> Path:
    return Path(job.workspace).resolve()


def resolve(job: Job, rel: str) -> Path:
    """The real path of `rel`, which must be one of the job's outputs or inside one."""
    root = workspace(job)
    clean = rel.strip("/")
    allowed = [o.strip("/") for o in job.outputs]
    inside_an_output = any(clean == o or clean.startswith(o + "/") for o in allowed)
    if ".." in clean.split("/") or not clean or not inside_an_output:
        raise OutsideWorkspace(f"'{rel}' is not an output of job {job.id}.",
                               f"Its outputs: {', '.join(job.outputs) or 'none'}.")
    target = (root / clean).resolve()
    if not target.is_relative_to(root) or not target.exists():
        raise OutsideWorkspace(f"'{rel}' is not in the workspace of job {job.id}.",
                               "Fetch the outputs first (the fetch button).")
    return target


def top_level(job: Job) -> list[Entry]:
    """The job's declared outputs that exist locally."""
    root = workspace(job)
    found = []
    for out in job.outputs:
        path = (root / out.strip("/")).resolve()
        if path.is_relative_to(root) and path.exists():
            found.append(_entry(root, path, out.strip("/")))
    return found


def listing(job: Job, rel: str) -> list[Entry]:
    folder = resolve(job, rel)
    root = workspace(job)
    entries = [_entry(root, p, f"{rel.strip('/')}/{p.name}") for p in sorted(folder.iterdir())
               if p.resolve().is_relative_to(root)]
    return sorted(entries, key=lambda e: (not e.is_dir, e.name))


def _entry(root: Path, path: Path, rel: str) -> Entry:
    is_dir = path.is_dir()
    return Entry(rel=rel, name=Path(rel).name, is_dir=is_dir,
                 size=0 if is_dir else path.stat().st_size)


def zip_folder(job: Job, rel: str) -> IO[bytes]:
    """A ZIP of the folder in a spooled temp file (memory first, disk when large)."""
    folder = resolve(job, rel)
    root = workspace(job)
    out = tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        if folder.is_file():
            archive.write(folder, folder.name)
        for dirpath, dirnames, filenames in os.walk(folder):
            # links are followed only when they stay inside the workspace
            dirnames[:] = [d for d in dirnames
                           if (Path(dirpath) / d).resolve().is_relative_to(root)]
            for name in filenames:
                path = Path(dirpath) / name
                if path.resolve().is_relative_to(root) and path.is_file():
                    archive.write(path, path.relative_to(folder.parent).as_posix())
    out.seek(0)
    return out


def _files_named(job: Job, filename: str) -> list[Path]:
    root = workspace(job)
    found = []
    for entry in top_level(job):
        base = root / entry.rel
        if not entry.is_dir:
            if base.name == filename:
                found.append(base)
            continue
        for depth in range(SEARCH_DEPTH):
            found += sorted(p for p in base.glob("/".join(["*"] * depth + [filename]))
                            if p.resolve().is_relative_to(root) and p.is_file())
    return found


def metrics(job: Job) -> dict | None:
    """{"file", "epochs": [{"epoch", name: number, ...}], "series": [names]} from the first
    metrics.json among the outputs that holds a list of per-epoch records."""
    for path in _files_named(job, METRICS_FILE):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        epochs = data.get("epochs") if isinstance(data, dict) else None
        if isinstance(epochs, list) and epochs and all(isinstance(e, dict) for e in epochs):
            names = sorted({k for e in epochs for k, v in e.items()
                            if k not in ("epoch", "seconds") and isinstance(v, (int, float))})
            return {"file": path.relative_to(workspace(job)).as_posix(), "epochs": epochs,
                    "series": names}
    return None


def model_dir(job: Job) -> Path | None:
    """The folder of the first model.keras among the job's outputs."""
    found = _files_named(job, MODEL_FILE)
    return found[0].parent if found else None
