"""The hub's store on both engines (SQLite and the session's PostgreSQL): migrations recorded once, the
portable dialect, one transaction per call, writers serialised across stores opened by several hubs."""

from __future__ import annotations

import threading
import time

import pytest

from sendense_nbd.errors import StoreError
from sendense_nbd.hub.db import Connection, Database, rows
from sendense_nbd.hub.db.migrations import MIGRATIONS


def test_opening_applies_every_migration_once(store_target: str) -> None:
    db = Database(store_target)
    try:
        assert [m.version for m in db.applied] == [m.version for m in MIGRATIONS]
        recorded = db.call(lambda c: [tuple(r) for r in c.execute("SELECT version, name FROM schema_version")])
        assert sorted(recorded) == [(m.version, m.name) for m in MIGRATIONS]
    finally:
        db.close()
    again = Database(store_target)
    try:
        assert again.applied == []
    finally:
        again.close()


def test_a_store_newer_than_the_code_is_refused(store_target: str) -> None:
    db = Database(store_target)
    try:
        db.call(lambda c: c.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (10_000,)))
    finally:
        db.close()
    with pytest.raises(StoreError, match="schema version 10000, newer than this sendense-nbd knows"):
        Database(store_target)


def test_rows_by_name_and_position_and_the_placeholder_dialect(store_target: str) -> None:
    db = Database(store_target)
    try:
        found = db.call(lambda c: rows(c.execute("SELECT '50%' AS pct, 'a?b' AS q, ? AS v", ("x",))))
        assert found == [{"pct": "50%", "q": "a?b", "v": "x"}]
        row = db.call(lambda c: c.execute("SELECT 1 AS one, 'two' AS two").fetchone())
        assert (row[0], row["two"], tuple(row)) == (1, "two", (1, "two"))
        db.call(
            lambda c: c.execute(
                "INSERT INTO nodes (name, url, configured, added, tls_pinned, up) VALUES (?, ?, ?, ?, ?, ?)",
                ("n1", "http://n1", "api", 1.5, True, False),
            )
        )
        stored = db.call(lambda c: c.execute("SELECT tls_pinned, up, added FROM nodes").fetchone())
        assert tuple(stored) == (1, 0, 1.5)  # booleans are integers in both
        total = db.call(lambda c: c.execute("SELECT SUM(tls_pinned), COUNT(*) FROM nodes").fetchone())
        assert tuple(total) == (1, 1) and type(total[0]) is int  # a sum reads back as a number
    finally:
        db.close()


def test_a_call_is_one_transaction(store_target: str) -> None:
    db = Database(store_target)

    def half(connection: Connection) -> None:
        connection.execute("INSERT INTO policies (name, spec, created, updated) VALUES ('p', '{}', 0, 0)")
        raise RuntimeError("half way")

    try:
        with pytest.raises(RuntimeError, match="half way"):
            db.call(half)
        assert db.call(lambda c: c.execute("SELECT COUNT(*) FROM policies").fetchone()[0]) == 0
        db.call(lambda c: c.execute("INSERT INTO policies (name, spec, created, updated) VALUES ('p', '{}', 0, 0)"))
        assert db.call(lambda c: c.execute("SELECT COUNT(*) FROM policies").fetchone()[0]) == 1
    finally:
        db.close()


def test_read_then_write_is_serialised_across_stores(store_target: str) -> None:
    """Two Database objects on one store (as two hub processes), two threads each: every increment
    reads the counter, waits, then writes it; none is lost."""
    stores = [Database(store_target), Database(store_target)]
    stores[0].call(lambda c: c.execute("INSERT INTO policies (name, spec, created, updated) VALUES ('n', '0', 0, 0)"))

    def increment(connection: Connection) -> None:
        (value,) = connection.execute("SELECT spec FROM policies WHERE name = 'n'").fetchone()
        time.sleep(0.002)  # another writer would slip in here without the writer lock
        connection.execute("UPDATE policies SET spec = ? WHERE name = 'n'", (str(int(value) + 1),))

    def work(db: Database) -> None:
        for _ in range(25):
            db.call(increment)

    threads = [threading.Thread(target=work, args=(db,)) for db in stores for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert stores[1].call(lambda c: c.execute("SELECT spec FROM policies WHERE name = 'n'").fetchone()[0]) == "100"
    finally:
        for db in stores:
            db.close()


def test_tables_ordered_by_insertion_number_their_rows(store_target: str) -> None:
    db = Database(store_target)
    try:
        for t in (5.0, 5.0, 1.0):
            db.call(
                lambda c, t=t: c.execute("INSERT INTO space_samples (t, total, used, free) VALUES (?, 9, 1, 8)", (t,))
            )
        found = db.call(lambda c: [tuple(r) for r in c.execute("SELECT t, seq FROM space_samples ORDER BY seq")])
        assert [t for t, _ in found] == [5.0, 5.0, 1.0] and len({seq for _, seq in found}) == 3
    finally:
        db.close()
