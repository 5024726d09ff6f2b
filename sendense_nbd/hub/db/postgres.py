"""The PostgreSQL engine, through psycopg 3: the store several hubs share.

Each worker thread has its own connection (autocommit; :meth:`PostgresBackend.transaction` opens the
transactions). Every transaction first takes a transaction-level advisory lock (:data:`WRITER_LOCK`),
so writers serialise across hub processes as SQLite's ``BEGIN IMMEDIATE`` makes them: read-then-write code
stays correct. The portable SQL of the callbacks is translated here: ``?`` placeholders become ``%s`` (a
literal ``%`` is doubled), booleans are stored as integers, and sums (``numeric``) read back as ``int`` or
``float``. Rows are indexable by position and by column name, as ``sqlite3.Row``.

A server that cannot be reached, or a connection that drops, raises :class:`StoreUnavailable` naming the
server (never the password); the dropped connection is discarded and the next call connects again.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict

from sendense_nbd.errors import StoreError, StoreUnavailable
from sendense_nbd.hub.db.core import Connection, Cursor

T = TypeVar("T")

#: The advisory lock every transaction takes first (``pg_advisory_xact_lock``): "SNDNHUB1" as a bigint.
WRITER_LOCK = int.from_bytes(b"SNDNHUB1", "big")
#: Rows a server-side cursor (:meth:`PostgresBackend.stream`) fetches per round trip.
STREAM_ROWS = 100
#: Names of those cursors, unique in the process.
_CURSORS = itertools.count(1)
#: TCP keepalives (seconds idle, then between 3 probes): a server that vanished without closing the
#: connection is noticed in about 20 s.
KEEPALIVE_IDLE = 5


class Limits(NamedTuple):
    """How long one call may wait on the server (seconds): never reached in normal operation, where a
    transaction takes milliseconds; they turn a stuck writer-lock holder or a hung server into
    :class:`StoreUnavailable` instead of blocking the store's one thread (the API, lease renewal, close())."""

    #: Waiting for the writer lock (or any row lock): ``lock_timeout``.
    lock: float = 60.0
    #: One statement: ``statement_timeout``.
    statement: float = 120.0
    #: A session idle inside an open transaction (a hub that hung mid-call): the server ends it and
    #: releases its locks (``idle_in_transaction_session_timeout``).
    idle_in_transaction: float = 120.0
    #: Data sent but not acknowledged by the server's TCP (``tcp_user_timeout``).
    tcp_user: float = 60.0

    def options(self) -> str:
        """The server settings, as libpq's ``options``."""
        settings = {
            "lock_timeout": self.lock,
            "statement_timeout": self.statement,
            "idle_in_transaction_session_timeout": self.idle_in_transaction,
        }
        return " ".join(f"-c {name}={_ms(seconds)}" for name, seconds in settings.items())


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class Row(tuple[Any, ...]):
    """A row: a tuple whose values can also be read by column name (``row["id"]``, ``dict(row)``)."""

    _index: dict[str, int]

    def __new__(cls, values: Sequence[Any], index: dict[str, int]) -> Row:
        """A row of ``values`` whose columns are at ``index``."""
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(self._index[key])
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        """The column names, in order."""
        return list(self._index)


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    description = cursor.description or ()
    index = {column.name: i for i, column in enumerate(description)}
    return lambda values: Row(values, index)


class _NumberLoader(Loader):
    """``numeric`` (what ``SUM`` of a bigint gives) as ``int`` when whole, else ``float``."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        try:
            return int(text)
        except ValueError:
            return float(text)


@functools.lru_cache(maxsize=1024)
def placeholders(sql: str) -> str:
    """``sql`` with ``?`` placeholders as psycopg's ``%s`` (a ``%`` doubled; a ``?`` in a string literal kept).

    Only single-quoted literals are recognised: a ``?`` in a comment, a double-quoted identifier or a
    dollar-quoted string would be translated too, so the dialect has none (docs/DATABASE.md)."""
    out, quoted = [], False
    for char in sql:
        if char == "'":
            quoted = not quoted
        if char == "%":
            out.append("%%")
        elif char == "?" and not quoted:
            out.append("%s")
        else:
            out.append(char)
    return "".join(out)


def _values(parameters: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(int(value) if isinstance(value, bool) else value for value in parameters)


class PostgresConnection:
    """A psycopg connection speaking the portable dialect (:class:`~sendense_nbd.hub.db.Connection`)."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        """Run one statement."""
        return self.raw.execute(placeholders(sql), _values(parameters))

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor:
        """Run one statement once per parameter sequence."""
        cursor = self.raw.cursor()
        cursor.executemany(placeholders(sql), [_values(p) for p in parameters])
        return cursor


def describe(url: str) -> str:
    """``url`` for messages: user, host, port and database, never the password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(an unparsable URL)"
    user = f"{info['user']}@" if info.get("user") else ""
    host, port, name = info.get("host") or "localhost", info.get("port"), info.get("dbname") or ""
    place = f"[{host}]" if "/" in str(host) else str(host)
    return f"postgresql://{user}{place}{f':{port}' if port else ''}/{name}"


class PostgresBackend:
    """A PostgreSQL database named by a ``postgresql://`` URL."""

    dialect = "postgresql"

    def __init__(self, url: str, *, connect_timeout: float = 10.0, limits: Limits | None = None) -> None:
        try:
            conninfo_to_dict(url)
        except psycopg.Error as exc:
            reason = _redacted(_first_line(exc), url)
            raise StoreError(f"--db postgresql://...: not a valid PostgreSQL URL ({reason})") from None
        self._url = url
        self.name = describe(url)
        self.connect_timeout = max(2, round(connect_timeout))
        self.limits = limits or Limits()

    def connect(self) -> Connection:
        """A new connection (autocommit: :meth:`transaction` opens each transaction)."""
        try:
            raw = psycopg.connect(
                self._url,
                autocommit=True,
                connect_timeout=self.connect_timeout,
                application_name="sendense-nbd hub",
                row_factory=_row_factory,
                keepalives=1,
                keepalives_idle=KEEPALIVE_IDLE,
                keepalives_interval=KEEPALIVE_IDLE,
                keepalives_count=3,
                tcp_user_timeout=_ms(self.limits.tcp_user),
                options=self.limits.options(),
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"cannot connect to the hub store {self.name}: {_first_line(exc)} "
                "(is PostgreSQL running and reachable, and do the --db URL's user, password and database match?)"
            ) from exc
        raw.adapters.register_loader("numeric", _NumberLoader)
        # Each transaction sees what the writer before it committed, whatever the server's or role's
        # default_transaction_isolation: under repeatable read the snapshot would predate the writer lock.
        raw.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        return PostgresConnection(raw)

    def transaction(self, connection: Connection, function: Callable[[Connection], T]) -> T:
        """BEGIN, the writer lock, ``function``, then COMMIT (ROLLBACK when it raises)."""
        assert isinstance(connection, PostgresConnection)
        with connection.raw.transaction():
            connection.raw.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (WRITER_LOCK,))
            return function(connection)

    def broken(self, connection: Connection) -> bool:
        """Whether the server closed the connection (or it broke)."""
        assert isinstance(connection, PostgresConnection)
        return connection.raw.closed or connection.raw.broken

    def translate(self, exc: BaseException) -> BaseException | None:
        """psycopg's errors as :class:`StoreUnavailable` (the server or the connection is gone) or
        :class:`StoreError` (a statement failed)."""
        if not isinstance(exc, psycopg.Error):
            return None
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return StoreUnavailable(
                f"the hub store {self.name} is locked: the writer lock was not free within {self.limits.lock:g} s "
                "(another hub or client holds it: see pg_stat_activity and pg_locks for a stuck session)"
            )
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return StoreUnavailable(
                f"the hub store {self.name} did not answer within {self.limits.statement:g} s: "
                f"{_first_line(exc)} (is the server overloaded or a session stuck? see pg_stat_activity)"
            )
        if isinstance(exc, psycopg.OperationalError) and _lost(exc):
            return StoreUnavailable(
                f"the connection to the hub store {self.name} failed: {_first_line(exc)} "
                "(is PostgreSQL running and reachable? the next call connects again)"
            )
        return StoreError(f"the hub store {self.name} refused a statement: {_first_line(exc)}")

    def close(self, connection: Connection) -> None:
        """Close it."""
        assert isinstance(connection, PostgresConnection)
        connection.raw.close()

    def tables(self, connection: Connection) -> set[str]:
        """The tables of the connection's schema."""
        found = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        return {row[0] for row in found}

    def adopt(self, connection: Connection) -> None:
        """Nothing: PostgreSQL stores are made by the migrations."""

    def script(self, connection: Connection, text: str) -> None:
        """The statements of ``text`` in one go (no parameters: psycopg sends several statements)."""
        assert isinstance(connection, PostgresConnection)
        connection.raw.execute(text.encode())

    def follow_sequence(self, connection: Connection, table: str, column: str) -> None:
        """The identity column's sequence moved past the highest value copied in."""
        connection.execute(
            f"SELECT setval(pg_get_serial_sequence(?, ?), COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)",  # noqa: S608
            (table, column),
        )

    def server_time(self, connection: Connection) -> float | None:
        """The server's ``clock_timestamp()`` (its clock now, not the transaction's start), epoch seconds."""
        return float(connection.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0])

    def stream(self, connection: Connection, sql: str) -> Generator[Any, None, None]:
        """A server-side cursor's rows, fetched :data:`STREAM_ROWS` at a time (a client-side cursor would
        hold the whole result), closed at the end."""
        assert isinstance(connection, PostgresConnection)
        with connection.raw.cursor(name=f"sendense_stream_{next(_CURSORS)}") as cursor:
            cursor.execute(placeholders(sql), ())
            while found := cursor.fetchmany(STREAM_ROWS):
                yield from found


def _lost(exc: psycopg.OperationalError) -> bool:
    """A connection problem (class 08, the server shutting down 57P, or no SQLSTATE: the socket)."""
    state = exc.sqlstate or ""
    return not state or state.startswith(("08", "57P"))


def _redacted(message: str, url: str) -> str:
    """``message`` (libpq's, which may quote the URL) without the URL's user information or any
    ``password=`` value."""
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0]
    secrets = {userinfo, *userinfo.split(":")[1:]} if userinfo else set()
    secrets |= set(re.findall(r"password=([^&\s]*)", url))
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        message = message.replace(secret, "***")
    return re.sub(r"password=[^&\s\"']*", "password=***", message)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
