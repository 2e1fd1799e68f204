"""The local job ledger: one SQLite file recording every remote job (who, cube, host, task,
params, env hash, state, times, exit code).

SQLite gives atomic updates and safe concurrent readers for free, which a JSON file would not
(a cron job and an interactive `cube remote list` may touch it at once).
"""

from __future__ import annotations

import builtins
import getpass
import json
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from controller import paths
from controller.errors import CubeError

SCHEMA_VERSION = 5
FINAL_STATES = {"succeeded", "failed", "cancelled", "lost"}

# Parameter or variable names whose values must never be stored.
_SECRET_NAME = re.compile(r"pass(word)?|secret|token|api[_-]?key|credential", re.IGNORECASE)

_COLUMNS = """
    id TEXT PRIMARY KEY, name TEXT, user TEXT, cube TEXT, cube_path TEXT, host TEXT,
    tasks TEXT, params TEXT, env_hash TEXT, runtime TEXT, state TEXT, created_at REAL,
    started_at REAL, ended_at REAL, exit_code INTEGER, remote_dir TEXT, workspace TEXT,
    outputs TEXT, outputs_pulled INTEGER DEFAULT 0, log_path TEXT, inventory TEXT,
    launcher TEXT DEFAULT 'agent', slurm_job_id TEXT, reason TEXT, sweep TEXT, variant TEXT
"""

# Each entry upgrades the schema from the version before it to its own; a ledger is migrated
# step by step inside one transaction, so a crash leaves it at its old version, intact.
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE jobs ADD COLUMN launcher TEXT DEFAULT 'agent'"],
    3: ["CREATE TABLE records (job_id TEXT PRIMARY KEY, record TEXT NOT NULL)"],
    4: ["ALTER TABLE jobs ADD COLUMN slurm_job_id TEXT", "ALTER TABLE jobs ADD COLUMN reason TEXT"],
    5: ["ALTER TABLE jobs ADD COLUMN sweep TEXT", "ALTER TABLE jobs ADD COLUMN variant TEXT",
        "CREATE TABLE sweeps (id TEXT PRIMARY KEY, cube TEXT, created_at REAL, spec TEXT NOT NULL)"],
}
# Tables added after the first release, made at once in a new ledger (sweeps: controller/sweeps.py).
_NEW_TABLES = [*MIGRATIONS[3], MIGRATIONS[5][-1]]


@dataclass
class Job:
    id: str
    cube: str
    host: str
    tasks: list[str]
    name: str | None = None
    user: str = field(default_factory=getpass.getuser)
    cube_path: str = ""
    params: dict[str, str] = field(default_factory=dict)
    env_hash: str = ""
    runtime: str = "python"
    state: str = "pending"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    remote_dir: str = ""
    workspace: str = ""
    outputs: list[str] = field(default_factory=list)  # workspace-relative output paths
    outputs_pulled: bool = False
    log_path: str = ""
    inventory: str = ""  # --inventory the job was started with, to reach its host again
    launcher: str = "agent"  # what started it (controller.launchers)
    slurm_job_id: str | None = None  # a Slurm host's job id (controller.slurm)
    reason: str | None = None  # why it waits or ended so: Slurm's reason, the agent's error
    sweep: str | None = None  # the sweep it is a variant of (controller/sweeps.py), and which
    variant: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def new_job_id(cube_name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{cube_name}-{stamp}-{secrets.token_hex(2)}"


def redact(values: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if _SECRET_NAME.search(k) else v) for k, v in values.items()}


_JSON_FIELDS = {"tasks", "params", "outputs"}


def _to_row(job: Job) -> dict:
    row = {f.name: getattr(job, f.name) for f in fields(Job)}
    row["params"] = redact(job.params)
    for key in _JSON_FIELDS:
        row[key] = json.dumps(row[key])
    row["outputs_pulled"] = int(job.outputs_pulled)
    return row


def _from_row(row: sqlite3.Row) -> Job:
    data = dict(row)
    for key in _JSON_FIELDS:
        data[key] = json.loads(data[key] or "null") or ([] if key != "params" else {})
    data["outputs_pulled"] = bool(data["outputs_pulled"])
    return Job(**data)


class Ledger:
    """The ledger file, opened (and migrated to SCHEMA_VERSION) once per command; use it as a
    context manager so it is closed."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path or paths.ledger_file())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.row_factory = sqlite3.Row
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        # Explicit BEGIN: sqlite3 would otherwise run the DDL outside any transaction.
        self._db.isolation_level = None
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._upgrade()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        finally:
            self._db.isolation_level = "DEFERRED"   # sqlite3's default: implicit transactions

    def _upgrade(self) -> None:
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
        if not exists:
            self._db.execute(f"CREATE TABLE jobs ({_COLUMNS})")
            for statement in _NEW_TABLES:
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        found = self.version or 1   # version 1 ledgers may not have set user_version
        if found > SCHEMA_VERSION:
            raise CubeError(f"The ledger {self.path} has schema version {found}, newer than "
                            f"this cube understands ({SCHEMA_VERSION}).",
                            "Upgrade cube, or point CUBE_HOME elsewhere.")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                self._db.execute(statement)
        if found != SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def save(self, job: Job) -> None:
        row = _to_row(job)
        names = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._db:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({names}) VALUES ({marks})", row)

    def get(self, ref: str) -> Job:
        """A job by id, unique id prefix, or name (newest of that name)."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE id = ? OR id LIKE ? OR name = ? ORDER BY created_at DESC",
            (ref, ref + "%", ref),
        ).fetchall()
        exact = [r for r in rows if r["id"] == ref or r["name"] == ref]
        if exact:
            return _from_row(exact[0])
        if len(rows) == 1:
            return _from_row(rows[0])
        if not rows:
            raise CubeError(f"No job '{ref}' in the ledger {self.path}.",
                            "List jobs with `cube remote list`.")
        ids = ", ".join(r["id"] for r in rows[:5])
        raise CubeError(f"Job reference '{ref}' is ambiguous: {ids}.", "Give more of the id.")

    def list(self, host: str | None = None, limit: int = 50) -> list[Job]:
        query = "SELECT * FROM jobs"
        args: tuple[str, ...] = ()
        if host:
            query, args = query + " WHERE host = ?", (host,)
        rows = self._db.execute(query + " ORDER BY created_at DESC LIMIT ?", (*args, limit))
        return [_from_row(r) for r in rows]

    def save_record(self, job_id: str, record: dict) -> None:
        """A job's run record (controller/records.py); its large parts live in files."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO records (job_id, record) VALUES (?, ?)",
                             (job_id, json.dumps(record, sort_keys=True)))

    def record(self, job_id: str) -> dict | None:
        row = self._db.execute("SELECT record FROM records WHERE job_id = ?",
                               (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    # -- sweeps (controller/sweeps.py): the sweep's spec as JSON; its jobs carry its id

    def save_sweep(self, spec: dict) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO sweeps (id, cube, created_at, spec) "
                             "VALUES (?, ?, ?, ?)", (spec["id"], spec["cube"], spec["created_at"],
                                                     json.dumps(spec, sort_keys=True)))

    def sweep(self, ref: str) -> dict:
        """A sweep by id or unique id prefix."""
        rows = self._db.execute("SELECT id, spec FROM sweeps WHERE id = ? OR id LIKE ? "
                                "ORDER BY created_at DESC", (ref, ref + "%")).fetchall()
        exact = [r for r in rows if r["id"] == ref]
        if exact or len(rows) == 1:
            return json.loads((exact or rows)[0]["spec"])
        if not rows:
            raise CubeError(f"No sweep '{ref}' in the ledger {self.path}.",
                            "List sweeps with `cube sweep list`.")
        raise CubeError(f"Sweep reference '{ref}' is ambiguous: "
                        f"{', '.join(r['id'] for r in rows[:5])}.", "Give more of the id.")

    def sweeps(self, limit: int = 50) -> builtins.list[dict]:
        rows = self._db.execute("SELECT spec FROM sweeps ORDER BY created_at DESC LIMIT ?",
                                (limit,))
        return [json.loads(r["spec"]) for r in rows]

    def sweep_jobs(self, sweep_id: str) -> builtins.list[Job]:
        """Every job of a sweep, oldest first (a retried variant has several)."""
        rows = self._db.execute("SELECT * FROM jobs WHERE sweep = ? ORDER BY created_at",
                                (sweep_id,))
        return [_from_row(r) for r in rows]

    def close(self) -> None:
        self._db.close()
