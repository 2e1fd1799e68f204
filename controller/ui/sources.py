"""Where a submitted cube comes from: the configured folder of cubes, an uploaded ZIP, or a git
URL. Uploads and clones are staged under $CUBE_HOME/ui/sources/<id>/ and stay there: the job's
outputs are pulled into the cube's workspace, so the folder must outlive the submission. A
staged id lets the form be re-submitted after a validation error without uploading again."""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from controller import paths
from controller.errors import CubeError
from controller.ui import gitsource, zipcheck

STAGED_ID = re.compile(r"^[0-9]{8}-[0-9a-f]{8}$")


def sources_dir() -> Path:
    return paths.cube_home() / "ui" / "sources"


def list_cubes(cubes_dir: Path | None) -> list[str]:
    """Sub-folders of the configured folder that hold an mlcube.yaml, by name."""
    if cubes_dir is None or not cubes_dir.is_dir():
        return []
    return sorted(p.parent.name for p in cubes_dir.glob("*/mlcube.yaml"))


def from_folder(cubes_dir: Path | None, name: str) -> Path:
    if name not in list_cubes(cubes_dir):  # only names listed: never a path from the form
        raise CubeError(f"No cube '{name}' in the folder of cubes ({cubes_dir}).",
                        "Choose one of the listed cubes.")
    assert cubes_dir is not None
    return cubes_dir / name


def _new_slot() -> tuple[str, Path]:
    staged = f"{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}"
    return staged, sources_dir() / staged


def from_zip(upload: BinaryIO, filename: str) -> tuple[str, Path]:
    """Check the upload (before writing anything), then extract it. -> (staged id, cube dir)"""
    plan = zipcheck.check_zip(upload)
    staged, slot = _new_slot()
    name = _folder_name(plan.prefix.rstrip("/") or Path(filename).stem)
    upload.seek(0)
    return staged, zipcheck.extract(upload, plan, slot / name)


def from_git(url: str, subdir: str = "", ref: str | None = None) -> tuple[str, Path]:
    """Clone into a temporary folder, keep it only when it holds a cube. -> (staged id, dir)"""
    gitsource.check_url(url)
    staged, slot = _new_slot()
    sources_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".clone-", dir=sources_dir()))
    try:
        repo = gitsource.clone(url, tmp / "repo", ref=ref or None)
        cube = _inside(repo, subdir)
        if not (cube / "mlcube.yaml").is_file():
            raise CubeError(f"{url} holds no mlcube.yaml" + (f" in '{subdir}'" if subdir else
                            " at its top") + ".", "Name the folder that holds the cube.")
        slot.mkdir(parents=True)
        name = _folder_name(cube.name if subdir else Path(url.rstrip("/")).stem)
        cube.rename(slot / name)
        return staged, slot / name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def staged_cube(staged: str) -> Path:
    """The cube dir of an earlier upload or clone, by its id (never a path from the form)."""
    slot = sources_dir() / staged
    dirs = [p for p in slot.iterdir() if p.is_dir()] if STAGED_ID.match(staged) and \
        slot.is_dir() else []
    if len(dirs) != 1:
        raise CubeError(f"The uploaded cube '{staged}' is gone.", "Upload it again.")
    return dirs[0]


def _inside(root: Path, subdir: str) -> Path:
    target = (root / subdir).resolve() if subdir else root
    if not target.is_relative_to(root.resolve()):
        raise CubeError(f"Folder '{subdir}' leaves the repository.")
    return target


def _folder_name(raw: str) -> str:
    """Cube names come from folders: keep it to a safe file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip(".-")
    return name or "cube"
