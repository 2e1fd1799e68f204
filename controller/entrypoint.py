"""What command runs a cube: the entry point from metadata.yaml, or the Dockerfile's
ENTRYPOINT for published MLCube cubes, with container paths (`/workspace/mnist.py`) mapped to
the cube's own files (`mnist.py`)."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from controller.errors import ConfigError
from controller.yamlsource import Source, read_text

if TYPE_CHECKING:
    from controller.cube import Cube


def is_python(word: str) -> bool:
    return bool(re.fullmatch(r"python(\d+(\.\d+)*)?", os.path.basename(word)))


def metadata_entry(cube: Cube, src: Source, value) -> list[str]:
    if isinstance(value, str):
        words = shlex.split(value)
    elif isinstance(value, list) and all(isinstance(w, str) for w in value):
        words = list(value)
    else:
        words = []
    if not words:
        raise src.error("entry_point", "must name the script to run.",
                        "Write 'entry_point: mnist.py' (relative to the cube folder).")
    if words[0].endswith(".py"):
        words = ["python3", *words]
    script = words[1] if is_python(words[0]) and len(words) > 1 else words[0]
    if not is_python(script) and not (cube.root / script).exists():
        raise src.error("entry_point", f"names '{script}', which is not in the cube.",
                        f"Give a path relative to {cube.root}, e.g. 'entry_point: main.py'.")
    return words


def find_dockerfile(cube: Cube) -> Path | None:
    context = cube.root / str(cube.docker.get("build_context") or ".")
    candidates = [context / str(cube.docker.get("build_file") or "Dockerfile"),
                  cube.root / "Dockerfile"]
    return next((p for p in candidates if p.is_file()), None)


def dockerfile_entry(cube: Cube, dockerfile: Path) -> tuple[list[str], str]:
    """ENTRYPOINT ["python3", "/workspace/mnist.py"] -> ["python3", "mnist.py"]."""
    words, line = _parse_entrypoint(dockerfile)
    if not words:
        return [], ""

    def error(word: str) -> ConfigError:
        name = Path(word).name
        return ConfigError(dockerfile, f"has ENTRYPOINT script '{word}', but no file named "
                           f"'{name}' is in the cube folder {cube.root}.",
                           f"Put {name} in the cube folder, or add metadata.yaml with "
                           "'entry_point: <script>.py'.", field="ENTRYPOINT", line=line)

    where = dockerfile.relative_to(cube.root) if dockerfile.is_relative_to(cube.root) else dockerfile
    return map_command(cube, words, error), f"{where}:{line} ENTRYPOINT"


def _parse_entrypoint(dockerfile: Path) -> tuple[list[str], int | None]:
    """The last ENTRYPOINT instruction (exec or shell form) and its line; continuations joined."""
    found: tuple[list[str], int | None] = ([], None)
    lines = read_text(dockerfile).splitlines()
    i = 0
    while i < len(lines):
        start, text = i + 1, lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i]
        i += 1
        m = re.match(r"\s*ENTRYPOINT\s+(.*)$", text, re.IGNORECASE)
        if m:
            found = (_entrypoint_words(dockerfile, m.group(1).strip(), start), start)
    return found


def _entrypoint_words(dockerfile: Path, arg: str, line: int) -> list[str]:
    if not arg.startswith("["):
        return shlex.split(arg)
    try:
        words = json.loads(arg)
    except json.JSONDecodeError:
        words = None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ConfigError(dockerfile, f"has an ENTRYPOINT that is not a JSON list of strings: {arg}",
                          'Write it in exec form: ENTRYPOINT ["python3", "/workspace/main.py"].',
                          field="ENTRYPOINT", line=line)
    return words


def _map_script(cube: Cube, word: str) -> str | None:
    """'/workspace/mnist.py' -> 'mnist.py': the file of the same name in the cube, or None."""
    name = Path(word).name
    if (cube.root / name).is_file():
        return name
    skip = {cube.root / "workspace", cube.root / ".git"}
    for match in sorted(cube.root.rglob(name)):
        if match.is_file() and not any(match.is_relative_to(s) for s in skip):
            return match.relative_to(cube.root).as_posix()
    return None


def map_command(cube: Cube, words: list[str], error) -> list[str]:
    """Map a container command's script to the cube's own file: the script after a python
    interpreter (`python3 -u /workspace/x.py`) or a bare `x.py` must exist in the cube,
    else `error(word)` is raised. Other commands (`/bin/bash`, `run.sh`) are mapped when the
    cube has them and kept as they are otherwise: they may live in the image."""
    out = list(words)
    if out and is_python(out[0]):
        out[0] = os.path.basename(out[0])
        i = 1
        while i < len(out) and out[i].startswith("-") and out[i] not in ("-m", "-c"):
            i += 1
        if i < len(out) and not out[i].startswith("-"):
            out[i] = _required_script(cube, out[i], error)
    elif out and out[0].endswith(".py"):
        out = ["python3", _required_script(cube, out[0], error), *out[1:]]
    else:
        for i, word in enumerate(out[:2]):
            if "/" in word or word.endswith(".sh"):
                out[i] = _map_script(cube, word) or word
    return out


def _required_script(cube: Cube, word: str, error) -> str:
    mapped = _map_script(cube, word)
    if mapped is None:
        raise error(word)
    return mapped
