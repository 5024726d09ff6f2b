"""A hub.db made before the store had migrations upgrades in place.

data/hub_before_migrations.sql is the dump of a hub.db written by the release before migrations
(main at 88665cd): its hub ran with a node, a policy, three completed backups of two disks (with
progress samples), a cancelled one and a running one; two alerts and two offsite object versions were
added to its tables by hand. ``sendense-nbd db upgrade`` applies the migrations; every table then has
the columns a new store has, the rows ordered by insertion keep SQLite's rowid order, and the hub's
stores read them back.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

from sendense_nbd.hub.copy_records import UploadJournal
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.db.migrations import MIGRATIONS
from sendense_nbd.hub.jobs import JobQuery, JobStore
from sendense_nbd.hub.policies import PolicyStore
from sendense_nbd.hub.repository import Repository
from sendense_nbd.policy.offsite import CopyTarget
from tests.conftest import run

DUMP = Path(__file__).resolve().parent / "data" / "hub_before_migrations.sql"
_TARGET = {"endpoint": "http://s3", "bucket": "bucket", "access_key": "a", "secret_file": "/s", "retain": 86400}
ORDERED = ("jobs", "points", "alerts", "space_samples", "offsite_copies", "offsite_objects")


def _old_store(path: Path) -> dict[str, list[int]]:
    """The old hub.db at ``path``; the rowids of each table ordered by insertion."""
    with sqlite3.connect(path) as connection:
        connection.executescript(DUMP.read_text())
        found = {t: [r[0] for r in connection.execute(f"SELECT rowid FROM {t} ORDER BY rowid")] for t in ORDERED}
    connection.close()
    return found


def _columns(path: Path) -> dict[str, list[str]]:
    with sqlite3.connect(path) as connection:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        found = {t: [r[1] for r in connection.execute(f"PRAGMA table_info({t})")] for t in tables}
    connection.close()
    return found


async def test_an_old_hub_db_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    rowids = _old_store(path)
    done = run(sys.executable, "-m", "sendense_nbd", "db", "upgrade", "--db", f"sqlite:{path}")
    assert done.stdout.splitlines() == [
        *(f"applied {m.version}: {m.name}" for m in MIGRATIONS),
        f"{path}: schema version {MIGRATIONS[-1].version}",
    ]
    Database(str(tmp_path / "new.db")).close()
    assert _columns(path) == _columns(tmp_path / "new.db")
    db = Database(str(path))
    try:
        assert db.applied == []
        for table, before in rowids.items():
            seqs = db.call(lambda c, t=table: [r[0] for r in c.execute(f"SELECT seq FROM {t} ORDER BY seq")])
            assert seqs == before, table
        jobs = await JobStore(db).query(JobQuery())
        assert [j.state.value for j in jobs] == ["running", "cancelled", "completed", "completed", "completed"]
        points = await Repository(str(tmp_path / "repo"), db).points("/DC/vm/a1")
        assert [(p.disk_key, p.kind.value, p.change_id) for p in points] == [
            (2000, "full", "52 aa/1-2000"), (2000, "incremental", "52 aa/2-2000"),
            (2001, "full", "52 aa/1-2001"), (2001, "incremental", "52 aa/2-2001"),
        ]  # fmt: skip
        assert [p.policy.name for p in await PolicyStore(db).all()] == ["nightly"]
        target = CopyTarget.from_json(_TARGET, "t")
        assert await _newest_version(db, target) == "v0"  # the version recorded last, as rowid had it
    finally:
        db.close()


async def _newest_version(db: Database, target: CopyTarget) -> str | None:
    return await asyncio.to_thread(UploadJournal(db, target, "c1", "hub").version, "k/img")
