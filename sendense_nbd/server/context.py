"""What a connection gets from its server: a frozen context and an admission desk.

:class:`~sendense_nbd.server.connection.ServerConnection` never sees the
:class:`~sendense_nbd.server.NBDServer` itself. It is built from a
:class:`ConnectionContext` (fixed for the server's life) and reports the
stages of its life to :class:`Admission`, the one place that counts
connections and clients against the limits. The modules form a line:
``server`` imports ``connection``, which imports this one; nothing points back.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any, Protocol

import attrs

from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.protocol.handshake import ExportInfo
from sendense_nbd.server.buffers import Budget, BufferPool
from sendense_nbd.server.writes import WriteQueue
from sendense_nbd.storage.base import BlockDevice

#: An export's check of the client that picks it: (export name, the client's verified certificate as
#: ``SSLObject.getpeercert()`` gives it, None without TLS) -> why the client is refused, or None.
AdmitPeer = Callable[[str, Mapping[str, Any] | None], str | None]

log = logging.getLogger(__name__)


class Tracked(Protocol):
    """What admission and shutdown need of a connection."""

    @property
    def peer(self) -> str:
        """The client's address, for logs."""

    @property
    def bytes_read(self) -> int:
        """READ payload bytes served so far."""

    @property
    def bytes_written(self) -> int:
        """WRITE payload bytes received so far."""

    async def finish(self) -> None:
        """Let requests in flight complete, then close."""


class Admission:
    """Counts connections and clients against ``max_handshakes`` and ``shared``.

    A connection is *accepted* when it arrives, *admitted* as a client when it
    picks an export, *negotiated* when its handshake ends and *released* when
    it is gone. ``stop`` is the server's: admission refuses clients once it is
    set, and sets it when the last client leaves a server that is not
    ``persistent``.
    """

    def __init__(self, *, shared: int, persistent: bool, max_handshakes: int, stop: asyncio.Event) -> None:
        self.shared = shared
        self.persistent = persistent
        self.max_handshakes = max_handshakes
        self._stop = stop
        self.connections: set[Tracked] = set()
        self.clients: set[Tracked] = set()
        self.handshaking: set[Tracked] = set()
        self.clients_served = 0
        self._bytes_done = [0, 0]  # read, written by connections that are gone

    @property
    def bytes_read(self) -> int:
        """READ payload bytes served, over the server's life."""
        return self._bytes_done[0] + sum(c.bytes_read for c in self.connections)

    @property
    def bytes_written(self) -> int:
        """WRITE payload bytes received, over the server's life."""
        return self._bytes_done[1] + sum(c.bytes_written for c in self.connections)

    def accept(self, connection: Tracked) -> bool:
        """A new connection: False when too many are still negotiating."""
        self.connections.add(connection)
        if len(self.handshaking) >= self.max_handshakes:
            log.warning(
                "closing connection %s: %d connections are still negotiating", connection.peer, self.max_handshakes
            )
            return False
        self.handshaking.add(connection)
        return True

    def admit(self, connection: Tracked) -> str | None:
        """Admit a client that picked an export, or return why it is refused."""
        if self._stop.is_set():
            return "the server is shutting down"
        if len(self.clients) >= self.shared:
            log.warning("refusing client %s: %d clients already connected", connection.peer, self.shared)
            return f"the server allows {self.shared} simultaneous client(s) (--shared)"
        self.clients.add(connection)
        self.clients_served += 1
        return None

    def negotiated(self, connection: Tracked) -> None:
        """The connection's handshake is over: it no longer counts as negotiating."""
        self.handshaking.discard(connection)

    def release(self, connection: Tracked) -> None:
        """The connection is gone; keep its byte counts."""
        if connection in self.connections:
            self._bytes_done[0] += connection.bytes_read
            self._bytes_done[1] += connection.bytes_written
        self.connections.discard(connection)
        self.handshaking.discard(connection)
        if connection in self.clients:
            self.clients.discard(connection)
            if not self.clients and not self.persistent:
                self._stop.set()


@attrs.frozen(slots=True)
class ConnectionContext:
    """Everything a connection needs from its server, fixed for the server's life."""

    #: What the handshake tells about each export ('' is the default one).
    catalog: Mapping[str, ExportInfo]
    #: The device behind each name of ``catalog``.
    devices: Mapping[str, BlockDevice]
    budget: Budget
    buffers: BufferPool
    #: Runs the storage calls.
    executor: Executor
    #: Per export name, for devices that write one request at a time: their queue on ``executor``.
    write_queues: Mapping[str, WriteQueue]
    admission: Admission
    #: Seconds to pick an export; 0: no limit.
    handshake_limit: float
    #: Seconds a WRITE payload or unread replies may make no progress; 0: no limit.
    io_timeout: float
    #: Seconds between a connection's watchdog checks.
    tick: float
    #: TCP congestion control of accepted TCP sockets, set once at accept (None: the system's).
    congestion: str | None
    #: Send and receive buffer (kernel units) of accepted TCP sockets, where autotuning stops short of it
    #: (None: the kernel's autotuning alone); see :func:`sendense_nbd.tcp.tune_socket`.
    socket_buffer: int | None = None
    #: Whether clients may or must upgrade to TLS with ``NBD_OPT_STARTTLS``.
    tls: TLSMode = TLSMode.OFF
    #: The server's TLS credentials; set unless ``tls`` is OFF.
    tls_context: ssl.SSLContext | None = None
    #: Asked when a client picks an export (GO, EXPORT_NAME), before it counts against ``shared``: the export's
    #: name and the client's certificate (``SSLObject.getpeercert()``; None without TLS) -> why the client is
    #: refused, or None to admit it.
    admit_peer: AdmitPeer | None = None
