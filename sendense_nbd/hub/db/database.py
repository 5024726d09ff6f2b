"""The :class:`Database`: one worker thread, one transaction per call, the engine a path or URL names."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sendense_nbd.errors import StoreError
from sendense_nbd.hub.db import migrations
from sendense_nbd.hub.db.core import Backend, Connection

if TYPE_CHECKING:
    from sendense_nbd.hub.db.postgres import Limits

T = TypeVar("T")


class Database:
    """``Database(path_or_url)``; ``await db.run(fn)`` calls ``fn(connection)`` in one transaction.

    A path or ``sqlite:PATH`` is an SQLite file (made mode 0600); ``postgresql://...`` is a PostgreSQL
    database. Opening applies the migrations the store lacks (:mod:`.migrations`).
    """

    def __init__(self, target: str, *, connect_timeout: float = 10.0, limits: Limits | None = None) -> None:
        self.engine = _backend(target, connect_timeout, limits)
        self.path = target
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hub-db")
        self._local = threading.local()
        self._connections: list[Connection] = []
        try:
            #: The migrations this open applied (none when the store was current).
            self.applied = self.call(lambda connection: migrations.upgrade(connection, self.engine))
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        """Where the store is, for messages (no password)."""
        return self.engine.name

    def _connection(self) -> Connection:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self.engine.connect()
            self._local.connection = connection
            self._connections.append(connection)
        return connection

    def _drop(self, connection: Connection) -> None:
        self._local.connection = None
        self._connections.remove(connection)
        try:
            self.engine.close(connection)
        except Exception:  # noqa: BLE001, S110 - it is gone already
            pass

    def _transaction(self, function: Callable[[Connection], T]) -> T:
        """``function`` in one transaction; a connection found dead before ``function`` ran (at BEGIN or
        the writer lock: the server restarted since the last call) is replaced and the call tried once more."""
        for attempt in (1, 2):
            connection: Connection | None = None
            ran = False

            def tracked(opened: Connection) -> T:
                nonlocal ran
                ran = True
                return function(opened)

            try:
                connection = self._connection()
                return self.engine.transaction(connection, tracked)
            except BaseException as exc:
                broken = connection is not None and self.engine.broken(connection)
                if connection is not None and broken:
                    self._drop(connection)
                if broken and not ran and attempt == 1 and isinstance(exc, Exception):
                    continue
                typed = self.engine.translate(exc)
                if typed is None:
                    raise
                raise typed from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def call(self, function: Callable[[Connection], T]) -> T:
        """Blocking: run ``function`` in one transaction in the worker thread."""
        return self._worker.submit(self._transaction, function).result()

    async def run(self, function: Callable[[Connection], T]) -> T:
        """Run ``function`` in one transaction in the worker thread, without blocking the event loop."""
        return await asyncio.wrap_future(self._worker.submit(self._transaction, function))

    def close(self) -> None:
        """Close every connection and stop the worker thread."""

        def close_all() -> None:
            for connection in self._connections:
                try:
                    self.engine.close(connection)
                except Exception:  # noqa: BLE001, S110 - closing a dropped connection
                    pass
            self._connections.clear()

        self._worker.submit(close_all).result()
        self._worker.shutdown()


def _backend(target: str, connect_timeout: float, limits: Limits | None) -> Backend:
    """The engine ``target`` names: ``postgresql://`` / ``postgres://`` URLs, else an SQLite path."""
    if target.startswith(("postgresql://", "postgres://")):
        from sendense_nbd.hub.db.postgres import PostgresBackend

        return PostgresBackend(target, connect_timeout=connect_timeout, limits=limits)
    from sendense_nbd.hub.db.sqlite import SqliteBackend

    return SqliteBackend(sqlite_path(target))


def sqlite_path(target: str) -> str:
    """The SQLite file ``target`` names (a path or ``sqlite:PATH``). Refused, without echoing it (it may
    hold a password): another scheme's URL, and anything with ``=`` or white space unless it starts with
    ``sqlite:`` (a libpq keyword conninfo such as ``host=db user=hub password=...`` is not a file name)."""
    if target.startswith("sqlite:"):
        return target.removeprefix("sqlite:")
    if "://" in target:
        raise StoreError(f"--db {target.split('://')[0][:20]}://...: give a path, sqlite:PATH or postgresql://...")
    if "=" in target or any(char.isspace() for char in target):
        raise StoreError(
            "--db holds '=' or white space: a PostgreSQL store is named by a postgresql://USER@HOST/DB URL "
            "(not libpq's key=value form); an SQLite file with such a name is given as sqlite:PATH"
        )
    return target


def open_database(target: str, *, connect_timeout: float = 10.0, limits: Limits | None = None) -> Database:
    """The store at ``target`` (a path, ``sqlite:PATH`` or ``postgresql://...``), migrated to this release;
    ``limits`` bound PostgreSQL's waits (:class:`~sendense_nbd.hub.db.postgres.Limits`)."""
    return Database(target, connect_timeout=connect_timeout, limits=limits)
