"""The hub's embedded store: one SQLite file in WAL mode, written by one thread.

Every statement runs in the store's single worker thread (:meth:`Database.run`),
so the event loop never blocks on SQLite and writes never race. Each
``run`` is one transaction (``BEGIN IMMEDIATE``), committed when the
function returns and rolled back when it raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    port INTEGER PRIMARY KEY,
    holder TEXT NOT NULL,
    job_id TEXT NOT NULL,
    disk_key INTEGER,
    purpose TEXT NOT NULL,
    since REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    vm_path TEXT NOT NULL,
    mode TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    deadline REAL NOT NULL,
    detail TEXT NOT NULL,
    progress TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_vm ON jobs (vm_path, created);
CREATE TABLE IF NOT EXISTS points (
    id TEXT PRIMARY KEY,
    vm_path TEXT NOT NULL,
    disk_key INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    backing TEXT,
    size INTEGER NOT NULL,
    change_id TEXT,
    disk_uuid TEXT,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    completed REAL,
    bytes_changed INTEGER,
    bytes_transferred INTEGER
);
CREATE INDEX IF NOT EXISTS points_disk ON points (vm_path, disk_key, created);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    token TEXT,
    tunnel_identity TEXT,
    configured TEXT NOT NULL,
    added REAL NOT NULL,
    last_contact REAL,
    last_check REAL,
    up INTEGER,
    version TEXT,
    running_jobs INTEGER,
    queued_jobs INTEGER,
    max_jobs INTEGER,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT,
    subject TEXT NOT NULL,
    message TEXT NOT NULL,
    detail TEXT NOT NULL,
    fired REAL NOT NULL,
    cleared REAL,
    delivered TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_condition ON alerts (kind, key, cleared);
CREATE TABLE IF NOT EXISTS policies (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS schedule_state (
    policy TEXT NOT NULL,
    purpose TEXT NOT NULL,
    last_slot REAL NOT NULL,
    next_run REAL,
    last_run REAL,
    note TEXT,
    PRIMARY KEY (policy, purpose)
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    purpose TEXT NOT NULL,
    slot REAL,
    started REAL NOT NULL,
    window_end REAL,
    ended REAL,
    state TEXT NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS runs_policy ON runs (policy, started);
CREATE TABLE IF NOT EXISTS run_items (
    run_id TEXT NOT NULL,
    vm_path TEXT NOT NULL,
    state TEXT NOT NULL,
    job_id TEXT,
    note TEXT,
    PRIMARY KEY (run_id, vm_path)
);
CREATE TABLE IF NOT EXISTS job_samples (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    t REAL NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS space_samples (
    t REAL NOT NULL,
    total INTEGER NOT NULL,
    used INTEGER NOT NULL,
    free INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS space_samples_time ON space_samples (t);
"""


class Database:
    """``Database(path)``; ``await db.run(fn)`` calls ``fn(connection)`` in one transaction."""

    def __init__(self, path: str) -> None:
        self.path = path
        # The store holds node tokens: the hub user's alone (SQLite gives its -wal and -shm the same mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hub-db")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        # executescript commits by itself: it runs outside a transaction.
        self._worker.submit(lambda: self._connection().executescript(SCHEMA)).result()
        self.call(_add_columns)
        self.call(_add_indexes)

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA busy_timeout=30000")
            self._local.connection = connection
            self._connections.append(connection)
        return connection

    def _transaction(self, function: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = function(connection)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return result

    def call(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Blocking: run ``function`` in one transaction in the worker thread."""
        return self._worker.submit(self._transaction, function).result()

    async def run(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function`` in one transaction in the worker thread, without blocking the event loop."""
        return await asyncio.wrap_future(self._worker.submit(self._transaction, function))

    def close(self) -> None:
        """Close every connection and stop the worker thread."""

        def close_all() -> None:
            for connection in self._connections:
                connection.close()

        self._worker.submit(close_all).result()
        self._worker.shutdown()


#: Columns added after a table was first released: ``(table, column, type)``, added to an older store on open.
ADDED_COLUMNS = (
    ("points", "bytes_changed", "INTEGER"),
    ("points", "bytes_transferred", "INTEGER"),
    ("points", "verify_state", "TEXT"),
    ("points", "verified_at", "REAL"),
    ("points", "bad_offset", "INTEGER"),
    ("points", "verify_error", "TEXT"),
    ("points", "digests", "TEXT"),
    ("jobs", "node", "TEXT"),
    ("jobs", "policy", "TEXT"),
    ("jobs", "full_reason", "TEXT"),
    ("jobs", "stages", "TEXT"),
    ("jobs", "bytes_changed", "INTEGER"),
    ("jobs", "bytes_sent", "INTEGER"),
    ("jobs", "expected_bytes", "INTEGER"),
    ("nodes", "transport", "TEXT NOT NULL DEFAULT 'tunnel'"),
    ("nodes", "nbd_host", "TEXT"),
    ("nodes", "hub_url", "TEXT"),
    ("nodes", "tls_pinned", "INTEGER NOT NULL DEFAULT 0"),
)


def _add_columns(connection: sqlite3.Connection) -> None:
    for table, column, kind in ADDED_COLUMNS:
        if column not in {row["name"] for row in connection.execute(f"PRAGMA table_info({table})")}:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


#: Indexes on columns an older store may lack until :data:`ADDED_COLUMNS` are added: ``(name, table, columns)``.
ADDED_INDEXES = (
    ("jobs_created", "jobs", "created"),
    ("jobs_kind", "jobs", "kind, created"),
    ("jobs_state", "jobs", "state, created"),
    ("jobs_policy", "jobs", "policy, created"),
    ("jobs_node", "jobs", "node, created"),
)


def _add_indexes(connection: sqlite3.Connection) -> None:
    for name, table, columns in ADDED_INDEXES:
        connection.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})")


def rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A query's rows as dicts keyed by column name."""
    return [dict(row) for row in cursor.fetchall()]
