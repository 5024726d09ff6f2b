"""The SQLite engine: one file in WAL mode (mode 0600), ``BEGIN IMMEDIATE`` transactions.

The only module that speaks SQLite's own dialect (``PRAGMA``, ``sqlite_master``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from sendense_nbd.hub.db.core import Connection

T = TypeVar("T")

#: Columns added before the store had migrations: ``(table, column, type)``. A store made then has some of
#: them; :meth:`SqliteBackend.adopt` adds the rest before the first migration (which has them all).
LEGACY_COLUMNS = (
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
    ("offsite_copies", "target", "TEXT"),
    ("offsite_uploads", "copy_id", "TEXT"),
)


class SqliteBackend:
    """An SQLite file: made (mode 0600: the store holds node tokens) when it does not exist."""

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = path
        # The hub user's alone (SQLite gives its -wal and -shm the same mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)

    def connect(self) -> Connection:
        """A connection in autocommit mode (transactions are explicit), WAL, full sync, 30 s busy wait."""
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=30000")
        return connection

    def transaction(self, connection: Connection, function: Callable[[Connection], T]) -> T:
        """``BEGIN IMMEDIATE`` (the write lock, taken at once), ``function``, then COMMIT or ROLLBACK."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = function(connection)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return result

    def broken(self, connection: Connection) -> bool:
        """A local file's connection stays usable."""
        return False

    def translate(self, exc: BaseException) -> BaseException | None:
        """SQLite's errors are raised as they are."""
        return None

    def close(self, connection: Connection) -> None:
        """Close it."""
        assert isinstance(connection, sqlite3.Connection)
        connection.close()

    def tables(self, connection: Connection) -> set[str]:
        """From ``sqlite_master``, without SQLite's own (``sqlite_sequence``, ``sqlite_stat1``, ...)."""
        found = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in found if not row[0].startswith("sqlite_")}

    def adopt(self, connection: Connection) -> None:
        """Add the :data:`LEGACY_COLUMNS` a store made before migrations lacks (to the tables it has)."""
        tables = self.tables(connection)
        for table, column, kind in LEGACY_COLUMNS:
            if table in tables and column not in _columns(connection, table):
                connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def script(self, connection: Connection, text: str) -> None:
        """Each complete statement of ``text`` in turn (``executescript`` would commit)."""
        statement = ""
        for line in text.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                connection.execute(statement)
                statement = ""
        if statement.strip():
            connection.execute(statement)

    def follow_sequence(self, connection: Connection, table: str, column: str) -> None:
        """Nothing to move: a new row's ``seq`` is its rowid (``db migrate`` copies into PostgreSQL only)."""

    def server_time(self, connection: Connection) -> float | None:
        """None: the file is on this machine, read with its clock."""
        return None

    def stream(self, connection: Connection, sql: str) -> Generator[Any, None, None]:
        """The cursor's rows as it steps through them (one row read ahead), closed at the end."""
        assert isinstance(connection, sqlite3.Connection)
        cursor = connection.execute(sql)
        try:
            yield from cursor
        finally:
            cursor.close()


def _columns(connection: Connection, table: str) -> set[str]:
    return {row["name"] for row in connection.execute(f"PRAGMA table_info({table})")}
