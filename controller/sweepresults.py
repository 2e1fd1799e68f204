"""A sweep's results: the varied values beside each variant's metrics, as rows for a table,
CSV or JSON.

Metrics come from the JSON files among a variant's pulled outputs (its folder
workspace/sweeps/<sweep>/<variant>/): the file `metrics:` in metadata.yaml names (e.g.
`model/metrics.json`, relative to the workspace as the outputs are), else every `*.json` file
of at most 1 MiB there. Each top-level number (not a boolean) is a metric named by its key;
a key already taken by an earlier file (in path order) is named `<file stem>.<key>`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from controller.errors import CubeError
from controller.jobs import Job

MAX_JSON_BYTES = 1 << 20
FIXED = ("variant", "job", "host", "state", "exit_code")


def metrics_files(folder: Path, declared: str | None) -> list[Path]:
    if declared:
        return [folder / declared] if (folder / declared).is_file() else []
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.json")
                  if p.is_file() and p.stat().st_size <= MAX_JSON_BYTES)


def read_metrics(folder: Path, declared: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for path in metrics_files(folder, declared):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for key, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key if key not in out else f"{path.stem}.{key}"] = value
    return out


def rows(spec: dict, latest: dict[str, Job]) -> list[dict[str, Any]]:
    """One row per variant, in the sweep's order: who ran it, its values, its metrics."""
    workspace = Path(spec["workspace"])
    out = []
    for variant in spec["variants"]:
        job = latest.get(variant["name"])
        metrics = read_metrics(workspace / variant["folder"], spec.get("metrics_file"))
        state = job.state if job else ("not started" if variant.get("error") else "submitting")
        out.append({"variant": variant["name"], "job": job.id if job else None,
                    "host": job.host if job else None, "state": state,
                    "exit_code": job.exit_code if job else None, "values": variant["values"],
                    "metrics": metrics, "folder": str(workspace / variant["folder"]),
                    "error": None if job else variant.get("error"),
                    "slurm_job": job.slurm_job_id if job else None})
    return out


def metric_names(table: list[dict]) -> list[str]:
    return list(dict.fromkeys(name for row in table for name in row["metrics"]))


def sort_rows(table: list[dict], by: str, ascending: bool = False) -> list[dict]:
    """Sorted by a metric or a varied key, highest first unless `ascending`; rows without
    it last."""
    known = metric_names(table) + list(dict.fromkeys(k for r in table for k in r["values"]))
    if by not in known:
        raise CubeError(f"The sweep has no metric or varied key '{by}'.",
                        f"Sort by one of: {', '.join(known) or '(none yet)'}.")

    def key(row: dict) -> tuple:
        value = row["metrics"].get(by, row["values"].get(by))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return (1, 0.0, str(value))
        return (0, value if ascending else -value, "")

    return sorted(table, key=key)


def flat(table: list[dict], keys: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Columns and cells: the fixed ones, each varied key, each metric."""
    names = metric_names(table)
    header = [*FIXED, *keys, *names]
    cells = [[row[c] for c in FIXED] + [row["values"].get(k) for k in keys]
             + [row["metrics"].get(m) for m in names] for row in table]
    return header, cells


def to_csv(table: list[dict], keys: list[str]) -> str:
    header, cells = flat(table, keys)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if c is None else c for c in row] for row in cells)
    return out.getvalue()
