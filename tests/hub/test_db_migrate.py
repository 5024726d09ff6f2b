"""``sendense-nbd db migrate`` moves a hub from its SQLite file to PostgreSQL: every table copied with its
count checked, a second copy into the now non-empty target refused, and the hub started on the target
(``--db``) sees its old jobs, points, policies and nodes and goes on from them.

The copy streams (``copy_store``): tables of several batches are copied value for value, the source is
read a batch at a time (never more than one batch read and not yet written, counted at the drivers: an
SQLite cursor's rows, a PostgreSQL server-side cursor's fetches), and a failure after some batches were
written (a row the target refuses, an error injected, a count that differs) leaves the target empty."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sendense_nbd.errors import StoreError
from sendense_nbd.hub.db import Connection, Database, postgres, transfer
from sendense_nbd.hub.db.postgres import PostgresConnection
from sendense_nbd.hub.db.transfer import copy_store
from tests.conftest import PostgresCluster, run
from tests.hub.conftest import Api, HubProcess

MIB = 1 << 20
DISKS = [{"key": 2000, "capacity": 4 * MIB}, {"key": 2001, "capacity": 2 * MIB}]


def _backup(api: Api, vm_path: str, change: str) -> dict[str, Any]:
    """A backup of DISKS through the API alone (the completion as a node would post it)."""
    status, job = api.post("/backups", {"vm_path": vm_path, "mode": "auto", "disks": DISKS})
    assert status == 201, job
    report = {"job_id": job["job_id"], "stage": "transferring", "status": "running", "bytes_transferred": MIB}
    assert api.post(f"/backups/{job['job_id']}/progress", report)[0] == 200
    done = {
        "status": "completed",
        "vm_path": vm_path,
        "disks": [{"disk_key": d["key"], "change_id": f"{change}-{d['key']}", "disk_uuid": None} for d in DISKS],
    }
    status, job = api.post(f"/backups/{job['job_id']}/complete", done)
    assert status == 200 and job["state"] == "completed", job
    return api.wait_job(job["job_id"])  # and its retention (a stage recorded after the answer)


def _counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as connection:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        found = {t: connection.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
    connection.close()
    return {t: n for t, n in found.items() if t != "schema_version"}


def _migrate(source: Path, target: str, check: bool = True) -> Any:
    command = ["db", "migrate", "--from", f"sqlite:{source}", "--to", target, "--output", "json"]
    return run(sys.executable, "-m", "sendense_nbd", *command, check=check)


def _old_hub(hub_factory: Callable[..., HubProcess], repo: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A hub on SQLite with a node, a policy and three backups (two of one VM), stopped: its jobs and policy."""
    hub = hub_factory(None, "--db", f"sqlite:{repo / 'hub.db'}", repo=repo)
    api = Api(hub.url)
    assert api.post("/nodes", {"name": "site-b", "url": "http://127.0.0.1:9", "token": "t"})[0] == 201
    policy = {"name": "nightly", "node": "site-b", "vms": {"include": ["/DC/vm/a*"]}, "schedule": {"every": 3600}}
    assert api.post("/policies", policy)[0] == 201
    for vm_path, change in (("/DC/vm/a1", "52 aa/1"), ("/DC/vm/a1", "52 aa/2"), ("/DC/vm/a2", "52 aa/3")):
        _backup(api, vm_path, change)
    jobs = api.get("/backups")[1]["backups"]
    stored = api.get("/policies/nightly")[1]
    assert hub.stop() == 0
    return jobs, stored


def test_a_hub_moves_from_sqlite_to_postgresql(
    hub_factory: Callable[..., HubProcess], postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    jobs, policy = _old_hub(hub_factory, repo)
    target = postgres_cluster.new_database()
    counts = _counts(repo / "hub.db")
    summary = json.loads(_migrate(repo / "hub.db", target).stdout)
    assert summary["tables"] == counts and summary["rows"] == sum(counts.values())
    assert counts["jobs"] == 3 and counts["points"] == 6 and counts["policies"] == 1 and counts["job_samples"] > 0
    refused = _migrate(repo / "hub.db", target, check=False)
    assert refused.returncode == 1
    assert "is not empty" in refused.stderr and "db migrate copies into an empty store" in refused.stderr
    hub = hub_factory(None, "--db", target, repo=repo)
    api = Api(hub.url)
    assert api.get("/backups")[1]["backups"] == jobs
    assert api.get("/policies/nightly")[1] == policy
    assert [n["name"] for n in api.get("/nodes")[1]["nodes"]] == ["site-b"]
    status, change = api.get("/backups/changeid?vm_path=/DC/vm/a1&disk_key=2000")
    assert status == 200 and change["change_id"] == "52 aa/2-2000"
    job = _backup(api, "/DC/vm/a1", "52 aa/4")  # the chain goes on from the copied points
    assert [d["sync_type"] for d in job["detail"]["disks"]] == ["incremental", "incremental"]
    assert len(api.get("/backups")[1]["backups"]) == 4


def test_sqlites_own_tables_are_not_copied(postgres_cluster: PostgresCluster, tmp_path: Path) -> None:
    source = tmp_path / "hub.db"
    Database(f"sqlite:{source}").close()
    with sqlite3.connect(source) as connection:  # sqlite_sequence (kept after its table goes) and sqlite_stat1
        connection.execute("CREATE TABLE counted (id INTEGER PRIMARY KEY AUTOINCREMENT)")
        connection.execute("INSERT INTO counted DEFAULT VALUES")
        connection.execute("DROP TABLE counted")
        connection.execute("INSERT INTO policies (name, spec, created, updated) VALUES ('p', '{}', 0, 0)")
        connection.execute("ANALYZE")
        internal = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE name LIKE 'sqlite_%'")}
    connection.close()
    assert {"sqlite_sequence", "sqlite_stat1"} <= internal
    source_db, target_db = Database(f"sqlite:{source}"), Database(postgres_cluster.new_database())
    try:
        counts = copy_store(source_db, target_db)
    finally:
        source_db.close()
        target_db.close()
    assert counts["policies"] == 1 and not any(name.startswith("sqlite_") for name in counts)


def test_a_target_that_is_not_a_postgresql_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    source = tmp_path / "hub.db"
    source.touch()
    refused = _migrate(source, "host=db user=hub password=s3cret-pw", check=False)
    assert refused.returncode == 2 and "give postgresql://USER@HOST/DB" in refused.stderr
    assert "s3cret-pw" not in refused.stderr + refused.stdout
    upgrade = ["db", "upgrade", "--db", "host=db user=hub password=s3cret-pw"]
    refused = run(sys.executable, "-m", "sendense_nbd", *upgrade, check=False)
    assert refused.returncode == 2 and "not libpq's key=value form" in refused.stderr
    assert "s3cret-pw" not in refused.stderr + refused.stdout
    assert list(tmp_path.iterdir()) == [source]


#: Values the copy must keep exactly: text beyond ASCII, quotes, ``%`` and ``?`` (the placeholder
#: translation), a long text, floats with every bit used, integers near 2**62, NULL.
ODD_TEXT = "vm-é✓ 'quoted' 100% ? \\ \t" + "x" * 3000
SAMPLE_COLUMNS = "INSERT INTO job_samples (job_id, seq, t, bytes) VALUES (?, ?, ?, ?)"
SPACE_COLUMNS = "INSERT INTO space_samples (t, total, used, free) VALUES (?, ?, ?, ?)"


def _samples(count: int) -> list[tuple[Any, ...]]:
    return [(f"job-{i % 7}-{ODD_TEXT[: i % 40]}", i, 1.7e9 + i / 3, (1 << 62) - i) for i in range(count)]


def _space(count: int) -> list[tuple[Any, ...]]:
    return [(1.7e9 + i * 0.1, 1 << 40, i * 4097, (1 << 40) - i * 4097) for i in range(count)]


def _policies(count: int, spec_size: int) -> list[tuple[Any, ...]]:
    return [(f"p{i:03}-{ODD_TEXT[:20]}", ODD_TEXT[:spec_size], 1.0 + i, 2.5) for i in range(count)]


def _fill(connection: Any, samples: int, space: int = 0, policies: int = 0, spec_size: int = 100) -> None:
    """Rows of job_samples, space_samples (``seq`` from the store) and policies, through ``connection``
    (sqlite3's, or the store's :class:`Connection`)."""
    connection.executemany(SAMPLE_COLUMNS, _samples(samples))
    if space:
        connection.executemany(SPACE_COLUMNS, _space(space))
    if policies:
        insert = "INSERT INTO policies (name, spec, created, updated) VALUES (?, ?, ?, ?)"
        connection.executemany(insert, _policies(policies, spec_size))


def _sqlite_source(path: Path, samples: int, space: int = 0, policies: int = 0, spec_size: int = 100) -> str:
    """An SQLite store at this release's schema holding :func:`_fill`'s rows: its ``sqlite:`` name."""
    Database(f"sqlite:{path}").close()
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        _fill(connection, samples, space, policies, spec_size)
    return f"sqlite:{path}"


def _dump(db: Database) -> dict[str, list[tuple[tuple[str, Any], ...]]]:
    """Every copied table's rows (column, value) in a stable order: what two stores compare by."""

    def read(connection: Connection) -> dict[str, list[tuple[tuple[str, Any], ...]]]:
        tables = sorted(db.engine.tables(connection) - transfer.NOT_COPIED)
        return {
            table: sorted(
                (tuple(sorted(dict(row).items())) for row in connection.execute(f"SELECT * FROM {table}")),  # noqa: S608
                key=repr,
            )
            for table in tables
        }

    return db.call(read)


@contextlib.contextmanager
def _stores(source: str, target: str) -> Iterator[tuple[Database, Database]]:
    source_db = Database(source)
    try:
        target_db = Database(target)
        try:
            yield source_db, target_db
        finally:
            target_db.close()
    finally:
        source_db.close()


def _empty(db: Database) -> bool:
    return not any(_dump(db).values())


def test_tables_of_many_batches_are_copied_value_for_value(postgres_cluster: PostgresCluster, tmp_path: Path) -> None:
    samples, space = 4 * transfer.BATCH_ROWS + 321, 2 * transfer.BATCH_ROWS + 7
    source = _sqlite_source(tmp_path / "hub.db", samples, space, policies=5, spec_size=3000)
    with _stores(source, postgres_cluster.new_database()) as (source_db, target_db):
        before = _dump(source_db)
        counts = copy_store(source_db, target_db)
        assert counts["job_samples"] == samples and counts["space_samples"] == space and counts["policies"] == 5
        assert counts == {table: len(rows) for table, rows in before.items()}
        assert _dump(target_db) == before
        assert _dump(source_db) == before  # only read
        # The target's sequence follows the copied seq values: a new row numbers past them.
        target_db.call(lambda c: c.execute(SPACE_COLUMNS, (2e9, 1, 1, 0)))
        (top,) = target_db.call(lambda c: c.execute("SELECT MAX(seq) FROM space_samples WHERE t < 2e9").fetchone())
        (new,) = target_db.call(lambda c: c.execute("SELECT seq FROM space_samples WHERE t = 2e9").fetchone())
        assert top == space and new == space + 1


class _Ledger:
    """Rows the source's cursors handed out, and what each INSERT batch into the target held."""

    def __init__(self) -> None:
        self.read = 0
        self.fetches: list[int] = []
        self.inserts: list[tuple[str, int, int]] = []  # (table, rows in the batch, rows read not yet written)
        self.written = 0

    def wrap_inserts(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Record every ``executemany`` into a PostgreSQL store."""
        original = PostgresConnection.executemany
        ledger = self

        def executemany(self: PostgresConnection, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any:
            batch = list(parameters)
            ledger.inserts.append((sql.split()[2], len(batch), ledger.read - ledger.written))
            ledger.written += len(batch)
            return original(self, sql, batch)

        monkeypatch.setattr(PostgresConnection, "executemany", executemany)

    def batches(self, table: str) -> list[int]:
        return [size for name, size, _ in self.inserts if name == table]


def _counting_sqlite(monkeypatch: pytest.MonkeyPatch, path: Path, ledger: _Ledger) -> None:
    """Connections to the SQLite file ``path`` whose ``SELECT *`` cursors count the rows they hand out."""

    class Counted(sqlite3.Cursor):
        star = False

        def execute(self, sql: str, parameters: Any = (), /) -> Counted:
            self.star = sql.startswith("SELECT * FROM")
            return super().execute(sql, parameters)  # type: ignore[return-value]

        def __next__(self) -> Any:
            row = super().__next__()
            ledger.read += self.star
            return row

        def fetchmany(self, size: int | None = 1) -> list[Any]:
            rows = super().fetchmany(size)
            ledger.read += len(rows) * self.star
            return rows

        def fetchall(self) -> list[Any]:
            rows = super().fetchall()
            ledger.read += len(rows) * self.star
            return rows

    class Counting(sqlite3.Connection):
        def execute(self, sql: str, parameters: Any = (), /) -> Any:
            return self.cursor(Counted).execute(sql, parameters)

    connect = sqlite3.connect

    def counting(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        return connect(database, *args, **({"factory": Counting} if str(database) == str(path) else {}), **kwargs)

    monkeypatch.setattr(sqlite3, "connect", counting)


def test_an_sqlite_source_is_read_one_batch_at_a_time(
    postgres_cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "BATCH_ROWS", 7)
    monkeypatch.setattr(transfer, "BATCH_BYTES", 3000)  # policies' specs: 1000 characters each
    source = _sqlite_source(tmp_path / "hub.db", 50, 20, policies=10, spec_size=1000)
    ledger = _Ledger()
    _counting_sqlite(monkeypatch, tmp_path / "hub.db", ledger)
    ledger.wrap_inserts(monkeypatch)
    with _stores(source, postgres_cluster.new_database()) as (source_db, target_db):
        counts = copy_store(source_db, target_db)
        read = ledger.read  # (before _dump reads the source too)
        assert _dump(target_db) == _dump(source_db)
    assert counts["job_samples"] == 50 and counts["space_samples"] == 20 and counts["policies"] == 10
    assert ledger.batches("job_samples") == [7] * 7 + [1]
    assert ledger.batches("space_samples") == [7, 7, 6]
    assert ledger.batches("policies") == [3, 3, 3, 1]  # the byte budget ends these batches
    assert read == ledger.written == sum(counts.values())  # every row went through the cursors
    assert max(pending for _, _, pending in ledger.inserts) <= 7  # never more than a batch in hand


def test_a_postgresql_source_is_read_through_a_server_side_cursor(
    postgres_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "BATCH_ROWS", 7)
    monkeypatch.setattr(postgres, "STREAM_ROWS", 5)
    source = postgres_cluster.new_database()
    filler = Database(source)
    try:
        filler.call(lambda c: _fill(c, 50, 20, policies=3))
    finally:
        filler.close()
    ledger = _Ledger()
    fetchmany = psycopg.ServerCursor.fetchmany

    def counted(cursor: psycopg.ServerCursor[Any], size: int = 0) -> list[Any]:
        rows = fetchmany(cursor, size)
        ledger.fetches.append(size)
        ledger.read += len(rows)
        return rows

    monkeypatch.setattr(psycopg.ServerCursor, "fetchmany", counted)
    ledger.wrap_inserts(monkeypatch)
    with _stores(source, postgres_cluster.new_database()) as (source_db, target_db):
        counts = copy_store(source_db, target_db)
        assert _dump(target_db) == _dump(source_db)
    assert counts["job_samples"] == 50 and counts["space_samples"] == 20 and counts["policies"] == 3
    assert ledger.batches("job_samples") == [7] * 7 + [1]
    assert set(ledger.fetches) == {5} and ledger.read == ledger.written == 73
    assert max(pending for _, _, pending in ledger.inserts) <= 7 + 5 - 1  # a batch, and one fetch's rest


def test_a_target_that_holds_rows_is_refused_and_left_as_it_was(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    source = _sqlite_source(tmp_path / "hub.db", 30, 5, policies=2)
    target = postgres_cluster.new_database()
    with _stores(source, target) as (source_db, target_db):
        target_db.call(lambda c: _fill(c, 0, 3))
        before = _dump(target_db)
        with pytest.raises(StoreError, match=r"is not empty \(space_samples has 3 rows\)"):
            copy_store(source_db, target_db)
        assert _dump(target_db) == before and len(before["space_samples"]) == 3
        with pytest.raises(StoreError, match="not into itself"):
            copy_store(source_db, source_db)


def _alert(connection: Any) -> None:
    """An alert: a table copied before job_samples (tables go in name order)."""
    connection.execute(
        "INSERT INTO alerts (id, kind, subject, message, detail, fired, delivered) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ("a1", "space", "repo", "low", "{}", 1.0, "[]"),
    )


def test_a_row_the_target_refuses_after_many_batches_leaves_it_empty(
    postgres_cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "BATCH_ROWS", 100)
    path = tmp_path / "hub.db"
    source = _sqlite_source(path, 3000, 250)
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        _alert(connection)  # SQLite keeps text in an INTEGER column; PostgreSQL's bigint refuses it
        connection.execute("UPDATE job_samples SET bytes = 'many' WHERE seq = 2500")
    ledger = _Ledger()
    ledger.wrap_inserts(monkeypatch)
    with _stores(source, postgres_cluster.new_database()) as (source_db, target_db):
        with pytest.raises(StoreError, match="refused a statement.*bigint"):
            copy_store(source_db, target_db)
        assert len(ledger.batches("job_samples")) == 26  # 25 batches were written before the refused one
        assert ledger.batches("alerts") == [1]
        assert _empty(target_db)
        with contextlib.closing(sqlite3.connect(path)) as connection, connection:
            connection.execute("UPDATE job_samples SET bytes = 2500 WHERE seq = 2500")
        counts = copy_store(source_db, target_db)  # the target was left empty: a second copy is taken
        assert counts["job_samples"] == 3000 and counts["alerts"] == 1 and counts["space_samples"] == 250
        assert _dump(target_db) == _dump(source_db)


def test_an_error_after_the_first_batch_leaves_the_target_empty_and_the_source_usable(
    postgres_cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "BATCH_ROWS", 10)
    source = _sqlite_source(tmp_path / "hub.db", 100)
    executemany = PostgresConnection.executemany
    calls: list[int] = []

    def failing(self: PostgresConnection, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected after two batches")
        return executemany(self, sql, parameters)

    with _stores(source, postgres_cluster.new_database()) as (source_db, target_db):
        source_db.call(_alert)
        before = _dump(source_db)
        monkeypatch.setattr(PostgresConnection, "executemany", failing)
        with pytest.raises(RuntimeError, match="injected"):
            copy_store(source_db, target_db)
        assert len(calls) == 3 and _empty(target_db)
        assert _dump(source_db) == before
        source_db.call(lambda c: c.execute(SPACE_COLUMNS, (1.0, 2, 1, 1)))  # its transaction and cursor ended


def test_a_count_that_differs_from_the_sources_is_refused_and_nothing_is_kept(
    postgres_cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "BATCH_ROWS", 10)
    source = _sqlite_source(tmp_path / "hub.db", 95, 12)
    with _stores(source, postgres_cluster.new_database()) as (source_db, target_db):
        stream = source_db.engine.stream

        def losing(connection: Connection, sql: str) -> Any:
            rows = stream(connection, sql)
            yield from (row for row in rows if "job_samples" not in sql or row["seq"] != 42)
            rows.close()

        monkeypatch.setattr(source_db.engine, "stream", losing)
        with pytest.raises(StoreError, match=r"job_samples: 95 rows in .*hub.db, 94 read, 94 in postgresql://"):
            copy_store(source_db, target_db)
        assert _empty(target_db)
