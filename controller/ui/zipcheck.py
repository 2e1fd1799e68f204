"""An uploaded cube ZIP: checked before anything is written, then extracted with the same limits.

Refused (each a `ZipRejected` whose message the page shows, with a 4xx status): not a ZIP,
encrypted entries, paths that leave the folder (absolute, `..`, backslashes, NUL), links and
other special files, too many entries or too many bytes once uncompressed (a ZIP bomb), and a
ZIP without `mlcube.yaml` at its top or in its one top-level folder. Declared sizes can lie, so
extraction counts the bytes it really writes and stops at the same limits.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from controller.errors import CubeError

MAX_ENTRIES = 5000
MAX_TOTAL_BYTES = 256 * 1024 * 1024   # uncompressed
MAX_UPLOAD_BYTES = 64 * 1024 * 1024   # the ZIP itself
CHUNK = 1024 * 1024


class ZipRejected(CubeError):
    """An upload refused; `status` is the HTTP status the page answers with."""

    def __init__(self, message: str, hint: str | None = None, status: int = 400):
        super().__init__(message, hint)
        self.status = status


@dataclass
class ZipPlan:
    """What an accepted ZIP holds: its file entries and the folder inside it that is the cube."""
    files: list[zipfile.ZipInfo]
    prefix: str            # "" when mlcube.yaml is at the top, else "folder/"
    total_bytes: int


def check_zip(source: BinaryIO | Path, *, max_entries: int = MAX_ENTRIES,
              max_total: int = MAX_TOTAL_BYTES) -> ZipPlan:
    """Every refusal happens here, before a byte is extracted."""
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ZipRejected(f"The upload is not a readable ZIP archive ({err}).",
                          "Zip the cube's folder (zip -r cube.zip mycube/) and upload that."
                          ) from err
    with archive:
        entries = archive.infolist()
        if len(entries) > max_entries:
            raise ZipRejected(f"The ZIP holds {len(entries):,} entries; the limit is "
                              f"{max_entries:,}.", "Leave data out of the upload.", status=413)
        for info in entries:
            _check_entry(info)
        files = [i for i in entries if not i.is_dir()]
        total = sum(i.file_size for i in files)
        if total > max_total:
            raise ZipRejected(f"The ZIP expands to {total:,} bytes; the limit is {max_total:,} "
                              "bytes (a ZIP bomb, or data that should not travel with the code).",
                              "Leave data out of the upload.", status=413)
        return ZipPlan(files=files, prefix=_cube_prefix(files), total_bytes=total)


def _check_entry(info: zipfile.ZipInfo) -> None:
    name = info.filename
    if info.flag_bits & 0x1:
        raise ZipRejected(f"ZIP entry '{name}' is encrypted.", "Upload an unencrypted ZIP.")
    if "\\" in name or "\0" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ZipRejected(f"ZIP entry '{name}' has a path that leaves the folder.",
                          "Entries must be relative paths inside the cube's folder.")
    if ".." in name.split("/"):
        raise ZipRejected(f"ZIP entry '{name}' has a path that leaves the folder ('..').",
                          "Entries must be relative paths inside the cube's folder.")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ZipRejected(f"ZIP entry '{name}' is a symbolic link; links are not accepted.",
                          "Replace the link with a copy of the file.")
    kind = stat.S_IFMT(mode)  # 0 when the ZIP was not written on Unix: a plain file
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise ZipRejected(f"ZIP entry '{name}' is not a regular file or folder.")


def _cube_prefix(files: list[zipfile.ZipInfo]) -> str:
    names = {i.filename for i in files}
    if "mlcube.yaml" in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        top = tops.pop() + "/"
        if top + "mlcube.yaml" in names:
            return top
    raise ZipRejected("The ZIP holds no mlcube.yaml at its top (or in its one top-level "
                      "folder), so it is not a cube.",
                      "Zip the folder that holds mlcube.yaml.", status=422)


def extract(source: BinaryIO | Path, plan: ZipPlan, dest: Path, *,
            max_total: int = MAX_TOTAL_BYTES) -> Path:
    """Extract the cube folder of a checked ZIP into `dest` (which must not exist yet). Counts
    real bytes: an entry larger than it declared, or a total over the limit, stops it and
    removes what was written."""
    dest.mkdir(parents=True)
    try:
        with zipfile.ZipFile(source) as archive:
            written = 0
            for info in plan.files:
                rel = posixpath.normpath(info.filename[len(plan.prefix):])
                written = _extract_one(archive, info, dest / rel, written, max_total)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        shutil.rmtree(dest, ignore_errors=True)
        raise ZipRejected(f"The ZIP is corrupt ({err}).", "Zip the cube's folder again.") from err
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _extract_one(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path,
                 written: int, max_total: int) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with archive.open(info) as src, open(target, "xb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            written += len(chunk)
            if size > info.file_size or written > max_total:
                raise ZipRejected(f"ZIP entry '{info.filename}' expands past its declared "
                                  "size or the upload limit (a ZIP bomb).", status=413)
            out.write(chunk)
    if (info.external_attr >> 16) & 0o111:
        target.chmod(0o755)  # keep scripts runnable; nothing else of the ZIP's modes
    return written
