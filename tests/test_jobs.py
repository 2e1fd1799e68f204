"""The ledger (controller/jobs.py): schema migrations, one connection per command."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from controller.errors import CubeError
from controller.jobs import SCHEMA_VERSION, Job, Ledger
from tests.conftest import REPO

V1_LEDGER = REPO / "tests" / "fixtures" / "ledgers" / "ledger-v1.db"  # written by cube 0.1.0


def test_a_ledger_written_by_the_first_release_migrates_without_losing_a_job(tmp_path):
    path = tmp_path / "ledger.db"
    shutil.copy(V1_LEDGER, path)
    with Ledger(path) as ledger:
        assert ledger.version == SCHEMA_VERSION
        jobs = ledger.list()
    assert [j.id for j in jobs] == ["hello-20261130-020000-ab2c", "hello-20261130-010000-ab1c",
                                    "hello-20261130-000000-ab0c"]
    running, failed, succeeded = jobs
    assert (succeeded.state, succeeded.exit_code, succeeded.outputs_pulled) == ("succeeded", 0,
                                                                                 True)
    assert (failed.state, failed.exit_code) == ("failed", 3)
    assert running.name == "nightly" and running.tasks == ["greet", "summarize"]
    assert running.params == {"names": "workspace/names.yaml", "api_token": "***"}
    assert running.outputs == ["greetings", "report/summary.txt"]
    assert all(j.launcher == "agent" for j in jobs)   # the only launcher 0.1.0 had


def test_a_migrated_ledger_takes_new_jobs_and_is_not_migrated_twice(tmp_path):
    path = tmp_path / "ledger.db"
    shutil.copy(V1_LEDGER, path)
    with Ledger(path) as ledger:
        ledger.save(Job(id="hello-20261201-000000-ffff", cube="hello", host="lab2",
                        tasks=["greet"], launcher="agent"))
        assert ledger.record("hello-20261130-000000-ab0c") is None   # no records before v3
        ledger.save_record("hello-20261201-000000-ffff", {"state": "succeeded"})
    with Ledger(path) as ledger:
        assert len(ledger.list()) == 4 and ledger.get("hello-20261201").host == "lab2"
        assert ledger.record("hello-20261201-000000-ffff") == {"state": "succeeded"}


def test_a_ledger_from_a_newer_cube_is_refused_untouched(tmp_path):
    path = tmp_path / "ledger.db"
    shutil.copy(V1_LEDGER, path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(CubeError, match="newer than this cube understands"):
        Ledger(path)
    assert path.read_bytes() == before


def test_a_failed_migration_leaves_the_old_ledger_intact(tmp_path, monkeypatch):
    path = tmp_path / "ledger.db"
    shutil.copy(V1_LEDGER, path)
    monkeypatch.setitem(__import__("controller.jobs").jobs.MIGRATIONS, 2,
                        ["ALTER TABLE jobs ADD COLUMN launcher TEXT", "NOT SQL"])
    with pytest.raises(sqlite3.OperationalError):
        Ledger(path)
    db = sqlite3.connect(path)
    columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1 and "launcher" not in columns
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 3


def test_a_new_ledger_starts_at_the_current_schema(tmp_path):
    with Ledger(tmp_path / "new.db") as ledger:
        assert ledger.version == SCHEMA_VERSION and ledger.list() == []
