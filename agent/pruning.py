"""The `prune` verb: what a host can lose, and losing it.

Removed: finished jobs' folders (ended before the cutoff), environments (envs/<hash>) and
images that no job used since the cutoff, and cube copies (cubes/<name>) that no kept job uses
and none used since the cutoff. Never touched: a pending, queued or running job, or anything it
uses. Uses are recorded at launch (`record_use`: ROOT/used/<kind>-<key>, its mtime the last use)
and read from every kept job's spec, so a job's environment stays while its folder does.

Images: only those this root's jobs ran (recorded), since an engine's images are shared by
every user of the host; `ENGINE rmi` (never -f) refuses one a container still uses.
`--dry-run` computes the same list and removes nothing.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import re
import shutil
import subprocess
import time

from .jobstate import ACTIVE_STATES, all_states, load_json
from .protocol import arg, verb

ENGINES = ("docker", "podman")
ENGINE_TIMEOUT_S = 120.0


# -- recording uses

def used_dir(root):
    return os.path.join(root, "used")


def record_use(root, spec):
    """Touch ROOT/used/<kind>-<key> for the job's environment or image and its cube copy."""
    folder = used_dir(root)
    os.makedirs(folder, exist_ok=True)
    for kind, key, extra in job_uses(root, spec):
        path = os.path.join(folder, "%s-%s" % (kind, safe(key)))
        with open(path, "w") as handle:
            json.dump(dict(extra, kind=kind, key=key), handle)


def safe(key):
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def job_uses(root, spec):
    """[(kind, key, extra)]: env/<hash>, image/<id> (with its engine) and cube/<name> a spec
    uses; paths under ROOT found in its argv and environment count too (older specs)."""
    text = json.dumps(spec)
    uses = {}
    envs = set(re.findall(re.escape(os.path.join(root, "envs")) + r"/([0-9a-f]{16})\b", text))
    cubes = set(re.findall(re.escape(os.path.join(root, "cubes")) + r"/([^/\"\\]+)", text))
    key = spec.get("env_key") or ""
    engine = spec.get("container_engine")
    if key and engine:
        uses[("image", key)] = {"engine": engine}
    elif key:
        envs.add(key)
    if spec.get("cube_dir"):
        cubes.add(os.path.basename(spec["cube_dir"].rstrip("/")))
    for env in envs:
        uses[("env", env)] = {}
    for cube in cubes:
        uses[("cube", cube)] = {}
    return [(kind, k, extra) for (kind, k), extra in sorted(uses.items())]


def recorded_uses(root):
    """{(kind, key): (last use, record)} from ROOT/used/."""
    found = {}
    folder = used_dir(root)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        try:
            record = load_json(path)
            found[(record["kind"], record["key"])] = (os.stat(path).st_mtime, record, path)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


# -- sizes and times

def tree_bytes(path):
    """Bytes of the files (and links) under `path`, as `du --apparent-size` counts them."""
    if os.path.islink(path) or os.path.isfile(path):
        return os.lstat(path).st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def parse_time(stamp):
    """state.json's "2024-05-01T10:00:00.123456Z" -> epoch seconds (None when absent)."""
    if not stamp:
        return None
    with contextlib.suppress(ValueError):
        return calendar.timegm(time.strptime(stamp.split(".")[0].rstrip("Z"),
                                             "%Y-%m-%dT%H:%M:%S"))
    return None


# -- the plan

def plan_prune(root, older_than):
    """(items to remove, items kept because in use): each {kind, path|id, bytes, ...}."""
    cutoff = time.time() - older_than
    states = all_states(root)  # judges vanished jobs lost first
    removed, kept_jobs = [], []
    for state in states:
        path = os.path.join(root, "jobs", state["job_id"])
        ended = parse_time(state.get("ended_at")) or parse_time(state.get("created_at"))
        if state["state"] not in ACTIVE_STATES and ended is not None and ended < cutoff:
            removed.append({"kind": "job", "path": path, "state": state["state"],
                            "bytes": tree_bytes(path)})
        else:
            kept_jobs.append(path)
    in_use: set = set()
    for path in kept_jobs:
        with contextlib.suppress(OSError, ValueError):
            in_use.update((kind, key) for kind, key, _ in
                          job_uses(root, load_json(os.path.join(path, "spec.json"))))
    records = recorded_uses(root)
    removed += stale_envs(root, cutoff, in_use, records)
    removed += stale_cubes(root, cutoff, in_use, records)
    removed += stale_images(cutoff, in_use, records)
    return removed, sorted("%s:%s" % use for use in in_use)


def last_use(kind, key, path, records):
    record = records.get((kind, key))
    if record:
        return record[0]
    with contextlib.suppress(OSError):
        return os.stat(path).st_mtime
    return 0.0


def stale_envs(root, cutoff, in_use, records):
    folder = os.path.join(root, "envs")
    items = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not os.path.isdir(path) or os.path.islink(path) or name.startswith("."):
            continue
        if ".tmp-" in name or ("env", name) in in_use:
            continue  # a build under way, or a kept job's environment
        if last_use("env", name, path, records) >= cutoff:
            continue
        log = path + ".pip.log"
        items.append({"kind": "env", "path": path, "bytes": tree_bytes(path) + (
            tree_bytes(log) if os.path.exists(log) else 0)})
    return items


def stale_cubes(root, cutoff, in_use, records):
    folder = os.path.join(root, "cubes")
    items = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if ("cube", name) in in_use or last_use("cube", name, path, records) >= cutoff:
            continue
        items.append({"kind": "cube", "path": path, "bytes": tree_bytes(path)})
    return items


def stale_images(cutoff, in_use, records):
    items = []
    for (kind, key), (used_at, record, _) in sorted(records.items()):
        engine = record.get("engine")
        if kind != "image" or engine not in ENGINES or ("image", key) in in_use or \
                used_at >= cutoff or not shutil.which(engine):
            continue
        size = image_size(engine, key)
        if size is not None:
            items.append({"kind": "image", "id": key, "engine": engine, "bytes": size})
    return items


def image_size(engine, image):
    """The image's size, or None when the engine does not have it (any more)."""
    try:
        out = subprocess.run([engine, "image", "inspect", "--format", "{{.Size}}", image],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=ENGINE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout.strip()
    return int(text) if out.returncode == 0 and text.isdigit() else None


# -- removing

def remove(root, item):
    """Remove one planned item; an error message, or None."""
    if item["kind"] == "image":
        try:
            out = subprocess.run([item["engine"], "rmi", item["id"]], stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            return str(err)
        if out.returncode != 0:
            return (out.stderr or out.stdout).strip() or "exit %d" % out.returncode
        forget(root, "image", item["id"])
        return None
    try:
        shutil.rmtree(item["path"])
    except OSError as err:
        return str(err)
    if item["kind"] == "env":
        with contextlib.suppress(OSError):
            os.unlink(item["path"] + ".pip.log")
    if item["kind"] in ("env", "cube"):
        forget(root, item["kind"], os.path.basename(item["path"]))
    return None


def forget(root, kind, key):
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(used_dir(root), "%s-%s" % (kind, safe(key))))


@verb("prune", arg("--older-than", type=float, default=14 * 86400.0,
                   help="seconds: keep what was used or finished more recently"),
      arg("--dry-run", action="store_true", help="list what would go; remove nothing"))
def prune(args):
    items, in_use = plan_prune(args.root, max(0.0, args.older_than))
    errors = []
    if not args.dry_run:
        for item in items:
            error = remove(args.root, item)
            if error:
                item["error"] = error
                errors.append(item)
    freed = sum(item["bytes"] for item in items if "error" not in item)
    return {"root": args.root, "dry_run": args.dry_run, "older_than": args.older_than,
            "removed": items, "bytes": freed, "errors": len(errors), "in_use": in_use}
