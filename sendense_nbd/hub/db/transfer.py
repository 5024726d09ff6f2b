"""``db migrate``: copy every table of one store into another, empty one (SQLite -> PostgreSQL).

Both stores are first brought to this release's schema (opening them applies the migrations). The copy
streams: each table is read through a cursor (:meth:`Backend.stream`: SQLite's steps row by row, a
PostgreSQL source is read through a server-side cursor) and written in batches of at most
:data:`BATCH_ROWS` rows and about :data:`BATCH_BYTES` bytes of values, so the copy holds one batch of a
table at a time (plus the source engine's read-ahead), however large the store.

One transaction in the source holds the whole read, and one transaction in the target the whole write:
the target's runs inside the source's (the source's worker thread waits in its transaction while the
target's thread reads batches through the source's connection, so one thread uses a connection at a
time). Each holds its store's writer lock, so no hub writes to the source while it is read: every table
is read at one moment. The target's transaction refuses a target that holds any row, inserts every row of
every table (``seq`` included, so the order of insertion is kept), moves the target's ``seq`` sequences
past the copied values, checks each table's count (rows read, the source's ``COUNT(*)`` in the same
transaction, and the target's after the inserts), and commits only then: a failure anywhere (a row the
target refuses, a lost connection, a count that differs) rolls it back and leaves the target empty. The
source is only read: stop its hub first (it would wait for the source's writer lock during the copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from sendense_nbd.errors import StoreError
from sendense_nbd.hub.db.core import Connection
from sendense_nbd.hub.db.database import Database

#: Bookkeeping tables not copied (the target has its own, from its migrations).
NOT_COPIED = frozenset({"schema_version"})
#: Rows inserted per statement batch at most.
BATCH_ROWS = 1000
#: A batch is written once its values reach this size (text and blobs by their length, other values 8
#: bytes): a batch holds at most this much and one row more.
BATCH_BYTES = 4 << 20


def copy_store(source: Database, target: Database) -> dict[str, int]:
    """Copy every table of ``source`` into the empty ``target`` in one transaction, in bounded batches;
    the rows copied per table."""
    if source is target:
        raise StoreError(f"db migrate copies a store into another one, not into itself ({source.name})")

    def read(reading: Connection) -> dict[str, int]:
        return target.call(lambda writing: _copy(source, reading, target, writing))

    return source.call(read)


def _copy(source: Database, reading: Connection, target: Database, writing: Connection) -> dict[str, int]:
    """Every table, in the source's transaction (``reading``) and the target's (``writing``)."""
    tables = sorted(source.engine.tables(reading) - NOT_COPIED)
    missing = set(tables) - target.engine.tables(writing)
    if missing:
        raise StoreError(f"{target.name} lacks the tables {', '.join(sorted(missing))}: not at the source's schema")
    _refuse_rows(writing, tables, target.name)
    return {table: _copy_table(source, reading, target, writing, table) for table in tables}


def _refuse_rows(connection: Connection, tables: list[str], name: str) -> None:
    for table in tables:
        (count,) = connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()  # noqa: S608
        if count:
            raise StoreError(f"{name} is not empty ({table} has {count} rows): db migrate copies into an empty store")


def _copy_table(source: Database, reading: Connection, target: Database, writing: Connection, table: str) -> int:
    """One table, batch by batch; its row count, checked three ways."""
    (expected,) = reading.execute(f"SELECT COUNT(*) FROM {table}").fetchone()  # noqa: S608
    copied = 0
    columns: tuple[str, ...] = ()
    with contextlib.closing(source.engine.stream(reading, f"SELECT * FROM {table}")) as rows:  # noqa: S608
        for batch in _batches(rows):
            columns = columns or tuple(batch[0].keys())
            marks = ", ".join("?" for _ in columns)
            writing.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
                [tuple(row) for row in batch],
            )
            copied += len(batch)
    if "seq" in columns:
        target.engine.follow_sequence(writing, table, "seq")
    (count,) = writing.execute(f"SELECT COUNT(*) FROM {table}").fetchone()  # noqa: S608
    if not count == copied == expected:
        raise StoreError(
            f"{table}: {expected} rows in {source.name}, {copied} read, {count} in {target.name} after the copy"
        )
    return int(count)


def _batches(rows: Iterable[Any]) -> Iterator[list[Any]]:
    """``rows`` in lists of at most :data:`BATCH_ROWS` rows, each ended once its values reach
    :data:`BATCH_BYTES`; the next rows are read only when the list before was consumed. The list is
    reused (emptied when the next is asked for), so the previous batch is never held with the next."""
    batch: list[Any] = []
    size = 0
    for row in rows:
        batch.append(row)
        size += sum(len(value) if isinstance(value, str | bytes) else 8 for value in row)
        if len(batch) >= BATCH_ROWS or size >= BATCH_BYTES:
            yield batch
            batch.clear()
            size = 0
    if batch:
        yield batch
