"""What callbacks and engines see: the :class:`Connection` protocol, the :class:`Backend` protocol, :func:`rows`.

Every statement runs in the store's single worker thread (:meth:`Database.run`),
so the event loop never blocks on the database and one hub process's writes
never race. Each ``run`` is one transaction that first takes the store's writer
lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-level advisory
lock), committed when the function returns and rolled back when it raises: so
read-then-write code stays correct across hub processes too. (``db migrate`` alone lends one store's
connection to another's thread, while the lender's thread waits in its transaction: see :mod:`.transfer`.)
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Cursor(Protocol):
    """A statement's result: rows (indexable by position and by column name), ``rowcount``."""

    @property
    def rowcount(self) -> int:
        """Rows an ``UPDATE``/``DELETE``/``INSERT`` touched."""

    def fetchone(self) -> Any:
        """The next row, or None."""

    def fetchall(self) -> list[Any]:
        """The remaining rows."""

    def __iter__(self) -> Iterator[Any]:
        """The remaining rows, one by one."""


class Connection(Protocol):
    """What a :meth:`Database.run` callback gets: portable SQL with ``?`` placeholders."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        """Run one statement."""

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor:
        """Run one statement once per parameter sequence."""


class Backend(Protocol):
    """One database engine, as :class:`Database` drives it (all calls in the worker thread)."""

    #: ``"sqlite"`` or ``"postgresql"``: picks a migration's text.
    dialect: str
    #: Where the store is, for messages and logs (never a password).
    name: str

    def connect(self) -> Connection:
        """A new connection."""

    def transaction(self, connection: Connection, function: Callable[[Connection], T]) -> T:
        """``function(connection)`` in one transaction holding the writer lock."""

    def broken(self, connection: Connection) -> bool:
        """Whether ``connection`` can no longer be used (dropped: the next call connects again)."""

    def translate(self, exc: BaseException) -> BaseException | None:
        """The typed error the engine's ``exc`` stands for (None: raise ``exc`` as it is)."""

    def close(self, connection: Connection) -> None:
        """Close ``connection``."""

    def tables(self, connection: Connection) -> set[str]:
        """The tables the store holds."""

    def adopt(self, connection: Connection) -> None:
        """Bring a store made before migrations existed to the first migration's schema."""

    def script(self, connection: Connection, text: str) -> None:
        """Run a migration's statements (inside the current transaction)."""

    def follow_sequence(self, connection: Connection, table: str, column: str) -> None:
        """After rows were copied in with their ``column`` values: new rows number past them."""

    def server_time(self, connection: Connection) -> float | None:
        """The database server's real-time clock (epoch seconds) as one statement reads it; None where the
        store is on this machine (SQLite: no other clock to compare with)."""

    def stream(self, connection: Connection, sql: str) -> Generator[Any, None, None]:
        """The rows of the query ``sql`` (no parameters), read from the store as they are consumed, never all
        at once (close the generator to end the read early); inside the current transaction."""


def rows(cursor: Cursor) -> list[dict[str, Any]]:
    """A query's rows as dicts keyed by column name."""
    return [dict(row) for row in cursor.fetchall()]
