"""The hub's store: SQLite (one file in WAL mode, the default) or PostgreSQL (several hubs), one dialect.

:class:`Database` runs each callback in one writer transaction in the store's worker thread;
callbacks get a :class:`Connection` and write portable SQL: ``?`` placeholders, ``ON CONFLICT ... DO
UPDATE/NOTHING``, no ``rowid`` (tables ordered by insertion have a ``seq`` column), no ``PRAGMA``.
The schema is versioned by :mod:`~sendense_nbd.hub.db.migrations`.
"""

from __future__ import annotations

import sqlite3

from sendense_nbd.errors import StoreError
from sendense_nbd.hub.db.core import Connection, Cursor, rows
from sendense_nbd.hub.db.database import Database, open_database

#: What a failing store call raises: SQLite's own errors, or :class:`StoreError` (PostgreSQL's, translated).
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, StoreError)

__all__ = ["STORE_ERRORS", "Connection", "Cursor", "Database", "open_database", "rows"]
