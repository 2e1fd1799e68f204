"""The agent package as one reproducible zipapp, named by its content hash.

Hosts run `python3 ROOT/agent/<digest>.pyz`: one file to upload, one `test -f` to know it is
there, and a new version never overwrites one a running job's supervisor still executes. The
archive is built in memory with sorted entries, a fixed timestamp (1980-01-01, the zip
epoch), fixed permissions, no bytecode and no compression (zlib's output may differ between
its versions; the agent is ~100 KB), so the same source always gives the same bytes and the
same digest, whichever machine or checkout builds it.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from controller import paths

EPOCH = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o100644 << 16   # a regular file, rw-r--r--, in the zip's external attributes
# The archive's own entry point: the package's, imported so that it runs as `agent.__main__`.
# Python cannot cache compiled modules inside a zip, so a zipapp compiles every module from
# source at every start (0.15 s of each agent process on a 2-core host). The first start
# therefore unpacks the package beside the archive (<digest>.pyz.d, by temp folder + rename),
# and every start imports from there, where Python keeps its __pycache__. Where the folder
# cannot be written, the agent runs from the archive as before.
MAIN = b'''import os
import sys


def _unpacked(archive):
    target = archive + ".d"
    if os.path.isdir(os.path.join(target, "agent")):
        return target
    import shutil
    import zipfile
    tmp = "%s.tmp-%d" % (target, os.getpid())
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp, [n for n in zf.namelist() if n.startswith("agent/")])
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target if os.path.isdir(os.path.join(target, "agent")) else None


_folder = _unpacked(os.path.abspath(sys.path[0])) if sys.path[0].endswith(".pyz") else None
if _folder:
    sys.path.insert(0, _folder)

from agent.__main__ import main  # noqa: E402

sys.exit(main())
'''


@dataclass(frozen=True)
class Bundle:
    data: bytes
    digest: str          # first 16 hex of the archive's sha256

    @property
    def filename(self) -> str:
        return f"{self.digest}.pyz"


def build(package_dir: Path | None = None) -> Bundle:
    """Zip the package's *.py files (under `agent/` in the archive) plus a top-level
    __main__.py. Deterministic: see the module doc."""
    package_dir = Path(package_dir or paths.agent_package())
    entries = {"__main__.py": MAIN}
    for path in package_dir.rglob("*.py"):
        rel = path.relative_to(package_dir)
        if "__pycache__" not in rel.parts:
            entries["agent/" + rel.as_posix()] = path.read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=EPOCH)
            info.external_attr = FILE_MODE
            info.create_system = 3     # unix, whatever builds it
            archive.writestr(info, entries[name])
    data = buf.getvalue()
    return Bundle(data, hashlib.sha256(data).hexdigest()[:16])


@lru_cache(maxsize=1)
def bundle() -> Bundle:
    """The agent of this controller process, built once (the source does not change under a
    running controller; tests that need a fresh build call `build`)."""
    return build()


def cached_file(directory: Path, the_bundle: Bundle | None = None) -> Path:
    """The bundle as a file `directory/<digest>.pyz` (written once: temp name, then rename),
    for running the agent on this machine."""
    the_bundle = the_bundle or bundle()
    path = Path(directory) / the_bundle.filename
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.write_bytes(the_bundle.data)
        tmp.replace(path)
    return path
