"""The asyncio NBD server: listeners, client admission, lifecycle.

Usage from asyncio code::

    async with NBDServer([Export("disk", device)], port=0) as server:
        print(server.port)
        await server.wait_closed()   # until close(), or the last client left

Admission, as qemu-nbd: a connection counts as a client (against
``shared``) from the moment it picks an export with ``NBD_OPT_GO`` or
``NBD_OPT_EXPORT_NAME``; over the limit that option is refused with
``NBD_REP_ERR_POLICY`` and a message. A port probe (connect and close) or
an ``NBD_OPT_INFO``/``LIST`` client therefore never keeps a real client
out. Connections still negotiating are bounded separately
(``max_handshakes``) and must pick an export within ``handshake_limit``.

Lifecycle, as qemu-nbd: without ``persistent`` the server stops after the
last negotiated client leaves. :meth:`NBDServer.close` (what SIGTERM and SIGINT call)
stops accepting, lets requests in flight finish, flushes every writable
export and closes the connections.

TLS, as qemu-nbd: ``tls`` ALLOW or REQUIRE offers ``NBD_OPT_STARTTLS`` with
``tls_context`` (see :func:`sendense_nbd.tls.server_context`); under
REQUIRE nothing is served before the upgrade. A context that requires client
certificates (mutual TLS) goes with REQUIRE only: under ALLOW a client that
skips TLS would be served without one. ``admit_peer`` (optional) sees the
export a client picks and its verified certificate, and may refuse it (the
option gets ``NBD_REP_ERR_POLICY`` with the reason, which is logged): the
hub binds an export to the node whose job it serves.

TCP connections get the congestion control ``congestion`` (default BBR,
None: the system's) and send/receive buffers of ``socket_buffer`` bytes where
the kernel's autotuning stops short of them (default: the tunnel's, for
1 Gbit/s at 100 ms; None: autotuning alone) once at accept
(:mod:`sendense_nbd.tcp`): a direct TLS transport over a WAN needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType, TracebackType

from sendense_nbd.errors import ServerError
from sendense_nbd.protocol.constants import DEFAULT_PORT, TLSMode
from sendense_nbd.server.buffers import Budget, BufferPool
from sendense_nbd.server.connection import ServerConnection
from sendense_nbd.server.context import Admission, AdmitPeer, ConnectionContext
from sendense_nbd.server.export import Export
from sendense_nbd.server.writes import WriteQueue
from sendense_nbd.tcp import DEFAULT_CONGESTION, DEFAULT_SOCKET_BUFFER

log = logging.getLogger(__name__)

#: Bytes of request buffers (WRITE payloads, READ results) held at once.
DEFAULT_BUDGET = 24 * 1024 * 1024
DEFAULT_CONNECTION_BUDGET = 16 * 1024 * 1024
#: Idle request buffers kept for reuse.
DEFAULT_POOL = 8 * 1024 * 1024
#: Seconds a connection may take to pick an export (qemu-nbd's --handshake-limit default).
DEFAULT_HANDSHAKE_LIMIT = 10.0
#: Seconds a WRITE payload or unread replies may make no progress.
DEFAULT_IO_TIMEOUT = 60.0
#: Connections still negotiating at once; more are closed on accept.
DEFAULT_MAX_HANDSHAKES = 128


def _check_tls(tls: TLSMode, tls_context: ssl.SSLContext | None) -> None:
    if tls is not TLSMode.OFF and tls_context is None:
        raise ServerError(f"--tls {tls.value} needs the server's credentials (--tls-creds)")
    if tls is TLSMode.OFF and tls_context is not None:
        raise ServerError("TLS credentials were given with --tls off: use --tls allow or require")
    if tls is TLSMode.ALLOW and tls_context is not None and tls_context.verify_mode == ssl.CERT_REQUIRED:
        raise ServerError(
            "client certificates (--tls-verify-client) need --tls require: under allow a client that "
            "skips TLS would be served without one"
        )


def _check_limits(
    exports: Sequence[Export], shared: int, handshake_limit: float, io_timeout: float, max_handshakes: int
) -> None:
    if not exports:
        raise ServerError("a server needs at least one export")
    if shared < 1:
        raise ServerError("--shared must be at least 1")
    if handshake_limit < 0 or io_timeout < 0:
        raise ServerError("--handshake-limit and --io-timeout must be 0 (none) or more seconds")
    if max_handshakes < 1:
        raise ServerError("--max-handshakes must be at least 1")


class NBDServer:
    """Serves exports over TCP, a unix socket, or inherited listening sockets."""

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        host: str = "127.0.0.1",
        port: int | None = DEFAULT_PORT,
        unix_path: str | None = None,
        sockets: Sequence[socket.socket] = (),
        shared: int = 1,
        persistent: bool = False,
        budget: int = DEFAULT_BUDGET,
        workers: int = 4,
        handshake_limit: float = DEFAULT_HANDSHAKE_LIMIT,
        io_timeout: float = DEFAULT_IO_TIMEOUT,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        congestion: str | None = DEFAULT_CONGESTION,
        socket_buffer: int | None = DEFAULT_SOCKET_BUFFER,
        tls: TLSMode = TLSMode.OFF,
        tls_context: ssl.SSLContext | None = None,
        admit_peer: AdmitPeer | None = None,
    ) -> None:
        _check_limits(exports, shared, handshake_limit, io_timeout, max_handshakes)
        _check_tls(tls, tls_context)
        self._exports = {export.name: export for export in exports}
        if len(self._exports) != len(exports):
            raise ServerError("export names must be unique")
        self._exports.setdefault("", exports[0])
        self._host, self._port, self._unix_path, self._sockets = host, port, unix_path, list(sockets)
        self._servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._lifecycle: asyncio.Task[None] | None = None
        self._admission = Admission(
            shared=shared, persistent=persistent, max_handshakes=max_handshakes, stop=self._stop
        )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        queues: dict[int, WriteQueue] = {}  # one per device, whatever names it is exported under
        #: What every connection shares (exports, memory, thread pool, limits); read it for monitoring.
        self.context = ConnectionContext(
            catalog=MappingProxyType({name: e.info(multi_conn=shared != 1) for name, e in self._exports.items()}),
            devices=MappingProxyType({name: export.device for name, export in self._exports.items()}),
            budget=Budget(budget, min(budget, DEFAULT_CONNECTION_BUDGET)),
            buffers=BufferPool(min(budget, DEFAULT_POOL)),
            executor=self._executor,
            write_queues=MappingProxyType(
                {
                    name: queues.setdefault(id(export.device), WriteQueue(self._executor))
                    for name, export in self._exports.items()
                    if export.device.capabilities.serial_writes
                }
            ),
            admission=self._admission,
            handshake_limit=handshake_limit,
            io_timeout=io_timeout,
            tick=min([0.5, *(limit / 4 for limit in (handshake_limit, io_timeout) if limit)]),
            congestion=congestion,
            socket_buffer=socket_buffer,
            tls=tls,
            tls_context=tls_context,
            admit_peer=admit_peer,
        )

    # -- public API ------------------------------------------------------------

    async def start(self) -> None:
        """Start listening. With ``port=0`` the chosen port is :attr:`port`."""
        loop = asyncio.get_running_loop()
        try:
            if self._sockets:
                for sock in self._sockets:
                    if sock.family == socket.AF_UNIX:
                        server = await loop.create_unix_server(self._protocol, sock=sock)
                    else:
                        server = await loop.create_server(self._protocol, sock=sock)
                    self._servers.append(server)
            elif self._unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._unix_path)
                self._servers.append(await loop.create_unix_server(self._protocol, path=self._unix_path))
            else:
                self._servers.append(
                    await loop.create_server(self._protocol, host=self._host, port=self._port, reuse_address=True)
                )
        except OSError as exc:
            raise ServerError(f"cannot listen: {exc.strerror or exc}") from exc
        self._lifecycle = loop.create_task(self._run())

    @property
    def port(self) -> int | None:
        """The TCP port listened on, if any."""
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return None

    @property
    def client_count(self) -> int:
        """Clients connected now (connections that picked an export)."""
        return len(self._admission.clients)

    @property
    def clients_served(self) -> int:
        """Clients admitted over the server's life."""
        return self._admission.clients_served

    @property
    def bytes_read(self) -> int:
        """Bytes clients read from the exports (READ payloads), over the server's life."""
        return self._admission.bytes_read

    @property
    def bytes_written(self) -> int:
        """Bytes clients wrote to the exports (WRITE payloads), over the server's life."""
        return self._admission.bytes_written

    def close(self) -> None:
        """Ask the server to stop; safe to call from a signal handler."""
        self._stop.set()

    async def wait_closed(self) -> None:
        """Wait until the server has stopped and flushed its exports."""
        if self._lifecycle is not None:
            await asyncio.shield(self._lifecycle)

    async def __aenter__(self) -> NBDServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        await self.wait_closed()

    def _protocol(self) -> ServerConnection:
        return ServerConnection(self.context)

    # -- lifecycle -------------------------------------------------------------

    async def _run(self) -> None:
        await self._stop.wait()
        for server in self._servers:
            server.close()
        await asyncio.gather(*(c.finish() for c in list(self._admission.connections)), return_exceptions=True)
        loop = asyncio.get_running_loop()
        for export in {id(e): e for e in self._exports.values()}.values():
            if export.writable:
                try:
                    await loop.run_in_executor(self._executor, export.device.flush)
                except Exception as exc:  # reported, but shutdown goes on
                    log.error("flushing export %r failed: %s", export.name, exc)
        for server in self._servers:
            await server.wait_closed()
        self._executor.shutdown(wait=True)
