"""Sweep variants, before any cube or host is involved: the grid that `--vary` builds, the list
that a `--sweep FILE` gives, and setting a value at a key path of a YAML document with the
key's type kept. controller/sweeps.py applies them to a cube's input files.

    --vary PARAM:KEY.PATH=V1,V2,...    one axis of the grid (PARAM: may be left out when the
                                       run has one YAML input file)
    sweep file:                        variants: [{name?, PARAM: {KEY.PATH: VALUE, ...}}, ...]
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.errors import CubeError
from controller.yamlsource import Source, kind_of

# {param: {key path: value}}: strings as typed after --vary, YAML values from a sweep file.
Values = dict[str, dict[str, Any]]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FILE_KEYS = ("variants",)
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


@dataclass(frozen=True)
class Vary:
    param: str | None        # None: the run's one YAML input file
    key: str                 # dotted key path inside that file
    values: tuple[str, ...]  # as typed; converted to the key's type when applied


@dataclass
class Variant:
    name: str | None                        # from the sweep file; else numbered later
    values: Values = field(default_factory=dict)


def parse_vary(text: str) -> Vary:
    """`PARAM:KEY.PATH=V1,V2` or `KEY.PATH=V1,V2`."""
    head, sep, tail = text.partition("=")
    param, colon, key = head.partition(":")
    if not colon:
        param, key = "", head
    values = tuple(v.strip() for v in tail.split(","))
    if not sep or not key.strip() or not tail.strip() or (colon and not param.strip()):
        raise CubeError(f"--vary '{text}' is not PARAM:KEY.PATH=V1,V2,...",
                        "e.g. --vary train_config:learning_rate.initial=0.01,0.003")
    if "" in values:
        raise CubeError(f"--vary '{text}' has an empty value.",
                        "Separate values with single commas: epochs=5,10.")
    return Vary(param.strip() or None, key.strip(), values)


def grid(varies: list[Vary]) -> list[Values]:
    """The cartesian product of the axes, the first --vary changing slowest."""
    seen: set[tuple[str | None, str]] = set()
    for vary in varies:
        if (vary.param, vary.key) in seen:
            raise CubeError(f"--vary names {vary.param or ''}:{vary.key} twice.",
                            "Give all its values in one --vary: KEY=V1,V2,V3.")
        seen.add((vary.param, vary.key))
    combos = itertools.product(*[[(v.param, v.key, value) for value in v.values] for v in varies])
    out = []
    for combo in combos:
        values: Values = {}
        for param, key, value in combo:
            values.setdefault(param or "", {})[key] = value
        out.append(values)
    return out


def load_sweep_file(path: Path) -> list[Variant]:
    """A sweep file's variants. Keys may be dotted paths or nested mappings (flattened)."""
    src = Source(path)
    for key in src.data:
        if key not in FILE_KEYS:
            raise src.error(str(key), f"is not a sweep file key (known: {', '.join(FILE_KEYS)}).",
                            "Write `variants: [{train_config: {epochs: 5}}, ...]`.")
    items = src.data.get("variants")
    if not isinstance(items, list) or not items:
        raise src.error("variants", "must be a non-empty list of variants.",
                        "Write `variants:` followed by items like `- train_config: {epochs: 5}`.")
    variants = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not item:
            raise src.error(f"variants.{i}", f"must be a mapping, not {kind_of(item)}.",
                            "Each variant maps a file parameter to {KEY.PATH: VALUE}.")
        name = item.get("name")
        if name is not None and not (isinstance(name, str) and NAME_RE.match(name)):
            raise src.error(f"variants.{i}.name", f"'{name}' cannot name a folder.",
                            "Use letters, digits, '.', '_' and '-' (64 at most).")
        values: Values = {}
        for param, keys in item.items():
            if param == "name":
                continue
            if not isinstance(keys, dict) or not keys:
                raise src.error(f"variants.{i}.{param}", "must map key paths to values.",
                                f"e.g. `{param}: {{learning_rate.initial: 0.01}}`.")
            values[str(param)] = flatten(keys)
        variants.append(Variant(name, values))
    return variants


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def combine(listed: list[Variant], axes: list[Values]) -> list[Variant]:
    """Every listed variant crossed with every grid point (either side may be empty); a named
    variant crossed with several points becomes NAME-01, NAME-02, ..."""
    if not listed:
        return [Variant(None, values) for values in axes]
    if not axes:
        return listed
    out = []
    width = max(2, len(str(len(axes))))
    for variant, (i, point) in itertools.product(listed, enumerate(axes, 1)):
        merged = copy.deepcopy(variant.values)
        for param, keys in point.items():
            for key in keys:
                if key in merged.get(param, {}):
                    raise CubeError(f"{key} is set by the sweep file and by --vary.",
                                    "Set each key in one place.")
            merged.setdefault(param, {}).update(keys)
        named = variant.name and len(axes) > 1
        out.append(Variant(f"{variant.name}-{i:0{width}d}" if named else variant.name, merged))
    return out


def variant_names(variants: list[Variant]) -> list[str]:
    """Given names, else v01, v02, ... (wide enough to sort); duplicates are an error."""
    width = max(2, len(str(len(variants))))
    names = [v.name or f"v{i:0{width}d}" for i, v in enumerate(variants, 1)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CubeError(f"Variant name(s) used twice: {', '.join(dupes)}.",
                        "Give every variant in the sweep file its own name.")
    return names


# ---- setting a value in a YAML document ------------------------------------------------------

def set_key(doc: Any, key: str, value: Any, where: str) -> Any:
    """Set `key` (a dotted path; list items by index) in `doc` to `value` converted to the
    type the key has there; returns the converted value. An unknown path is a CubeError."""
    parts = key.split(".")
    node = doc
    for depth, part in enumerate(parts):
        container, index = node, _index(node, part, parts[:depth], where, key)
        if depth == len(parts) - 1:
            converted = convert(value, container[index], f"{where}: {key}")
            container[index] = converted
            return converted
        node = container[index]
    raise AssertionError("unreachable")


def _index(node: Any, part: str, above: list[str], where: str, key: str) -> Any:
    at = ".".join(above) or "the top level"
    if isinstance(node, dict):
        if part in node:
            return part
        known = ", ".join(str(k) for k in node) or "(none)"
        raise CubeError(f"{where} has no key '{key}' ('{part}' is not under {at}).",
                        f"Keys under {at}: {known}.")
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return int(part)
        raise CubeError(f"{where} has no key '{key}': {at} is a list of {len(node)}.",
                        f"Use an index from 0 to {len(node) - 1}.")
    raise CubeError(f"{where} has no key '{key}': {at} is {kind_of(node)}, not a mapping.",
                    f"Vary {at} itself.")


def convert(value: Any, current: Any, where: str) -> Any:
    """`value` as the type of `current` (the key's value in the base file): an int stays an
    int, a float a float, a bool a bool; a value that does not fit is a CubeError."""
    kind = _kind(current)
    try:
        if isinstance(value, str) and kind != "string":
            return _from_text(value, kind)
        return _from_yaml(value, kind)
    except ValueError:
        raise CubeError(f"{where}: {value!r} is not {_article(kind)} (the key holds "
                        f"{current!r}).", f"Give {_article(kind)} value for it.") from None


def _kind(current: Any) -> str:
    if isinstance(current, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping"}.get(type(current), "any")


def _article(kind: str) -> str:
    return {"any": "a YAML value", "integer": "an integer"}.get(kind, f"a {kind}")


def _from_text(text: str, kind: str) -> Any:
    if kind == "boolean":
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(text)
    if kind == "integer":
        return int(text)
    if kind == "number":
        return float(text)
    parsed = yaml.safe_load(text)
    return parsed if kind == "any" else _from_yaml(parsed, kind)


def _from_yaml(value: Any, kind: str) -> Any:
    ok = {"any": True, "boolean": isinstance(value, bool),
          "integer": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "string": isinstance(value, (str, int, float)) and not isinstance(value, bool),
          "list": isinstance(value, list), "mapping": isinstance(value, dict)}[kind]
    if not ok:
        raise ValueError(value)
    if kind == "number":
        return float(value)
    return str(value) if kind == "string" else value
