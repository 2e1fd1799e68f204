"""What differs between two run records: code files, requirements, frozen packages, parameters
and inputs, runtime, host and hardware. `cube diff` / `cube remote diff` print it and exit 0
when nothing differs, like diff(1).

Derived values are left out so that one cause is named once: the python env hash follows from
the requirements and the interpreter, and the argv from the parameters and the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HOST_FIELDS = ("name", "hostname", "os", "cpus", "memory_bytes")
HARDWARE_FIELDS = ("gpus", "driver")


@dataclass(frozen=True)
class Difference:
    section: str      # code, requirements, frozen, params, inputs, config, runtime, host, hardware
    what: str         # the file, package, parameter or field
    a: Any
    b: Any

    def __str__(self) -> str:
        return f"{self.section}: {self.what}: {_show(self.a)} -> {_show(self.b)}"


def _show(value: Any) -> str:
    return "(none)" if value is None else str(value)


def diff_records(a: dict, b: dict) -> list[Difference]:
    requirements = _requirements(a, b)
    return [*_code(a, b, skip_requirements_file=bool(requirements)), *requirements,
            *_frozen(a, b), *_params(a, b), *_inputs(a, b), *_config(a, b), *_runtime(a, b),
            *_fields("host", a.get("host") or {}, b.get("host") or {}, HOST_FIELDS),
            *_fields("hardware", a.get("host") or {}, b.get("host") or {}, HARDWARE_FIELDS)]


def _changed(section: str, old: dict, new: dict) -> list[Difference]:
    """Keys added, removed or changed between two flat mappings."""
    return [Difference(section, key, old.get(key), new.get(key))
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _code(a: dict, b: dict, *, skip_requirements_file: bool) -> list[Difference]:
    files_a, files_b = a.get("files") or {}, b.get("files") or {}
    if skip_requirements_file:   # its change is named under requirements, once
        for record, files in ((a, files_a), (b, files_b)):
            name = (record.get("cube") or {}).get("requirements_file")
            files.pop(name, None)
    return [Difference("code", d.what, _short(d.a), _short(d.b))
            for d in _changed("code", files_a, files_b)]


def _short(sha: str | None) -> str | None:
    return sha[:12] if sha else None


def _requirements(a: dict, b: dict) -> list[Difference]:
    return _changed("requirements", _by_name(a.get("requirements") or []),
                    _by_name(b.get("requirements") or []))


def _by_name(requirements: list[str]) -> dict[str, str]:
    """"six==1.16 # why" -> {"six": "six==1.16"}: a pin that changed is one difference."""
    out = {}
    for line in requirements:
        spec = line.split("#", 1)[0].strip()
        name = spec
        for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", ";", " "):
            name = name.split(sep, 1)[0]
        out[name.strip().lower().replace("_", "-")] = spec
    return out


def _frozen(a: dict, b: dict) -> list[Difference]:
    if a.get("frozen") is None or b.get("frozen") is None:
        return []
    return _changed("frozen", _freeze(a["frozen"]), _freeze(b["frozen"]))


def _freeze(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name.lower().replace("_", "-")] = version or line
    return out


def _params(a: dict, b: dict) -> list[Difference]:
    pa, pb = a.get("params") or {}, b.get("params") or {}
    diffs = _changed("params", pa.get("overrides") or {}, pb.get("overrides") or {})
    ra, rb = pa.get("resolved") or {}, pb.get("resolved") or {}
    for task in sorted(set(ra) | set(rb)):
        diffs += [Difference("params", f"{task}.{d.what}", d.a, d.b)
                  for d in _changed("params", ra.get(task) or {}, rb.get(task) or {})]
    return diffs


def _inputs(a: dict, b: dict) -> list[Difference]:
    ia, ib = a.get("inputs") or {}, b.get("inputs") or {}
    diffs = []
    for name in sorted(set(ia) | set(ib)):
        old, new = ia.get(name), ib.get(name)
        if old is None or new is None:
            diffs.append(Difference("inputs", name, old and "present", new and "present"))
        elif old["sha256"] != new["sha256"]:
            if "content" in old and "content" in new:
                diffs += [Difference("inputs", f"{name}: {key}", x, y)
                          for key, x, y in _nested(old["content"], new["content"])]
            else:
                diffs.append(Difference("inputs", name, old["sha256"][:12], new["sha256"][:12]))
    return diffs


def _nested(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted key paths whose values differ between two parsed YAML/JSON documents."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += _nested(old.get(key), new.get(key), path)
        return out
    return [] if old == new else [(prefix or "(whole file)", old, new)]


def _config(a: dict, b: dict) -> list[Difference]:
    ca, cb = a.get("config") or [], b.get("config") or []
    return [] if ca == cb else [Difference("config", "-P", ca, cb)]


def _runtime(a: dict, b: dict) -> list[Difference]:
    ra, rb = a.get("runtime") or {}, b.get("runtime") or {}
    diffs = _changed("runtime", {"name": ra.get("name"), "python": ra.get("python")},
                     {"name": rb.get("name"), "python": rb.get("python")})
    if ra.get("name") != "python" or rb.get("name") != "python":
        # a container's image id is what it ran; a venv's hash only echoes the requirements
        diffs += _changed("runtime", {"image": ra.get("env_key"), "digests": ra.get("image_digests")},
                          {"image": rb.get("env_key"), "digests": rb.get("image_digests")})
    return diffs


def _fields(section: str, a: dict, b: dict, names: tuple[str, ...]) -> list[Difference]:
    return _changed(section, {n: a.get(n) for n in names}, {n: b.get(n) for n in names})
