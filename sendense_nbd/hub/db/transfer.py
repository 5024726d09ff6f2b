"""``db migrate``: copy every table of one store into another, empty one (SQLite -> PostgreSQL).

Both stores are first brought to this release's schema (opening them applies the migrations). The copy is
one transaction in the target: it refuses a target that holds any row, inserts every row of every table
(``seq`` included, so the order of insertion is kept), moves the target's ``seq`` sequences past the copied
values, checks each table's count against the source's, and commits only then. The source is only read:
stop its hub first, so nothing changes while it is copied.
"""

from __future__ import annotations

from typing import Any

import attrs

from sendense_nbd.errors import StoreError
from sendense_nbd.hub.db.core import Connection
from sendense_nbd.hub.db.database import Database

#: Bookkeeping tables not copied (the target has its own, from its migrations).
NOT_COPIED = frozenset({"schema_version"})


@attrs.frozen
class TableCopy:
    """One table's rows, as read from the source."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


def _read(connection: Connection, tables: list[str]) -> list[TableCopy]:
    found = []
    for table in tables:
        cursor = connection.execute(f"SELECT * FROM {table}")  # noqa: S608 - our own table names
        values = cursor.fetchall()
        columns = tuple(values[0].keys()) if values else ()
        found.append(TableCopy(table, columns, tuple(tuple(row) for row in values)))
    return found


def _refuse_rows(connection: Connection, tables: list[str], name: str) -> None:
    for table in tables:
        (count,) = connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()  # noqa: S608
        if count:
            raise StoreError(f"{name} is not empty ({table} has {count} rows): db migrate copies into an empty store")


def _write(connection: Connection, target: Database, copies: list[TableCopy]) -> dict[str, int]:
    for copy in copies:
        if copy.rows:
            marks = ", ".join("?" for _ in copy.columns)
            connection.executemany(
                f"INSERT INTO {copy.name} ({', '.join(copy.columns)}) VALUES ({marks})",  # noqa: S608
                copy.rows,
            )
        if "seq" in copy.columns:
            target.engine.follow_sequence(connection, copy.name, "seq")
    counts = {}
    for copy in copies:
        (count,) = connection.execute(f"SELECT COUNT(*) FROM {copy.name}").fetchone()  # noqa: S608
        if count != len(copy.rows):
            raise StoreError(f"{copy.name}: {count} rows in {target.name} after the copy, {len(copy.rows)} read")
        counts[copy.name] = int(count)
    return counts


def copy_store(source: Database, target: Database) -> dict[str, int]:
    """Copy every table of ``source`` into the empty ``target`` in one transaction; rows per table."""
    tables = sorted(source.call(source.engine.tables) - NOT_COPIED)
    missing = set(tables) - target.call(target.engine.tables)
    if missing:
        raise StoreError(f"{target.name} lacks the tables {', '.join(sorted(missing))}: not at the source's schema")
    copies = source.call(lambda connection: _read(connection, tables))

    def write(connection: Connection) -> dict[str, int]:
        _refuse_rows(connection, tables, target.name)
        return _write(connection, target, copies)

    return target.call(write)
