"""A YAML config file parsed for validation: its data, plus each dotted field's line number,
so every ConfigError names the file, the field, the line and the fix. Also the small field
readers that mlcube.yaml and metadata.yaml share."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from controller.errors import ConfigError


class Source:
    """A parsed YAML file with a map from dotted field paths to line numbers, for errors."""

    def __init__(self, path: Path):
        self.path = path
        text = read_text(path)
        try:
            self.data = yaml.safe_load(text)
            self.node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.lines = yaml_line_map(self.node)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(path, f"is not valid YAML: {problem}.",
                              "Fix the YAML syntax at that line (indentation, a missing ':' "
                              "or an unclosed quote or bracket).",
                              line=mark.line + 1 if mark else None) from None
        if self.data is None:
            self.data = {}
        if not isinstance(self.data, dict):
            raise ConfigError(path, "must be a YAML mapping (key: value pairs) at the top level.",
                              "Start the file with keys such as 'name:' and 'tasks:'.", line=1)

    def error(self, fld: str, message: str, hint: str) -> ConfigError:
        return ConfigError(self.path, message, hint, field=fld, line=line_of(self.lines, fld))

    def raw_scalar(self, fld: str) -> str | None:
        """A scalar as written: `version: 2.10` is the float 2.1 to YAML, "2.10" here."""
        node = self.node
        for part in fld.split("."):
            if not isinstance(node, yaml.MappingNode):
                return None
            node = next((v for k, v in node.value if str(k.value) == part), None)
        return node.value if isinstance(node, yaml.ScalarNode) else None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(path, f"is not UTF-8 text ({err.reason}).",
                          "Save the file as UTF-8.") from None


def yaml_line_map(text_or_node) -> dict[str, int]:
    """Dotted field path -> 1-based line, from the YAML node tree (list items by index)."""
    out: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                out.setdefault(path, key.start_mark.line + 1)
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                path = f"{prefix}.{i}" if prefix else str(i)
                out.setdefault(path, value.start_mark.line + 1)
                walk(value, path)

    node = text_or_node
    if isinstance(node, str):
        node = yaml.compose(node, Loader=yaml.SafeLoader)
    walk(node, "")
    return out


def line_of(lines: dict[str, int], fld: str) -> int | None:
    """Line of `fld`, or of its nearest parent that exists (a missing key's owner)."""
    parts = fld.split(".")
    while parts:
        line = lines.get(".".join(parts))
        if line is not None:
            return line
        parts.pop()
    return None


def unknown_key_warnings(src: Source, known: tuple[str, ...]) -> list[str]:
    out = []
    for key in src.data:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(known)}."
        line = src.lines.get(str(key))
        where = f"{src.path}:{line}" if line else str(src.path)
        out.append(f"{where}: unknown top-level key '{key}' is ignored.{hint}")
    return out


def mapping_field(src: Source, fld: str, data: dict | None = None, key: str | None = None) -> dict:
    data = src.data if data is None else data
    value = data.get(key or fld)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise src.error(fld, f"must be a mapping (key: value pairs), not {kind_of(value)}.",
                        f"Indent the entries of '{(key or fld)}:' under it as 'key: value'.")
    return value


def optional_str(src: Source, fld: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, int, float)):
        raise src.error(fld, f"must be a string, not {kind_of(value)}.",
                        f"Write it as '{fld}: ...'.")
    return str(value)


def kind_of(value) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)
