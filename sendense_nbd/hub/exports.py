"""In-process NBD exports, one per disk, each on the socket of its port lease; an export with TLS
requires it (``NBD_OPT_STARTTLS`` before anything else) with the hub's credentials, and may admit only
the clients whose certificate a check accepts (the node whose job it serves). Each export serves the
block device its repository's store opens (a qcow2 file, an RBD image or snapshot)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable

import attrs

from sendense_nbd.errors import ServerError
from sendense_nbd.hub.transport import PeerCheck
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.server import Export, NBDServer
from sendense_nbd.storage.base import BlockDevice


@attrs.frozen
class ExportStats:
    """What one export serves and how much it has served, at one moment."""

    job_id: str
    disk_key: int | None
    export: str
    port: int
    image: str
    readonly: bool
    tls: bool
    clients: int
    clients_served: int
    bytes_written: int
    bytes_read: int

    def to_json(self) -> dict[str, object]:
        """The export as ``GET /ports`` shows it."""
        return attrs.asdict(self)


@attrs.define(eq=False)
class RunningExport:
    """One export the hub serves: a job's disk image on its leased port (``path``: the image's name)."""

    job_id: str
    disk_key: int | None
    name: str
    port: int
    path: str
    readonly: bool
    tls: bool
    server: NBDServer
    device: BlockDevice

    def stats(self) -> ExportStats:
        """Its counters now."""
        server = self.server
        return ExportStats(
            self.job_id, self.disk_key, self.name, self.port, self.path, self.readonly, self.tls,
            server.client_count, server.clients_served, server.bytes_written, server.bytes_read,
        )  # fmt: skip


class ExportManager:
    """Starts, lists and stops the hub's exports (``shared`` clients each, persistent); ``tls_context``:
    the hub's server credentials, for the exports started with ``tls=True``."""

    def __init__(self, *, shared: int = 10, tls_context: ssl.SSLContext | None = None) -> None:
        self.shared = shared
        self.tls_context = tls_context
        self.exports: dict[int, RunningExport] = {}

    async def start(
        self,
        job_id: str,
        disk_key: int | None,
        name: str,
        path: str,
        sock: socket.socket,
        *,
        opener: Callable[[], BlockDevice],
        readonly: bool = False,
        tls: bool = False,
        admit_peer: PeerCheck | None = None,
    ) -> RunningExport:
        """Serve the image ``path`` (what ``opener`` opens, called in a thread) as export ``name`` on the
        bound socket ``sock``; ``tls``: only
        over TLS (:class:`ServerError` when the hub has no credentials); ``admit_peer``: a client that picks
        the export is admitted only if it says so (it sees the client's certificate)."""
        if tls and self.tls_context is None:
            raise ServerError("an export with TLS needs the hub's NBD TLS credentials (--nbd-tls-creds DIR)")
        device = await asyncio.to_thread(opener)
        server = NBDServer(
            [Export(name, device, readonly=readonly)], sockets=[sock], shared=self.shared, persistent=True,
            tls=TLSMode.REQUIRE if tls else TLSMode.OFF, tls_context=self.tls_context if tls else None,
            admit_peer=admit_peer,
        )  # fmt: skip
        try:
            await server.start()
        except BaseException:
            device.close()
            sock.close()
            raise
        port = int(sock.getsockname()[1])
        running = RunningExport(job_id, disk_key, name, port, path, readonly, tls, server, device)
        self.exports[port] = running
        return running

    async def stop(self, port: int) -> None:
        """Stop one export: clients are drained, the image flushed and closed."""
        running = self.exports.pop(port, None)
        if running is None:
            return
        try:
            running.server.close()
            await running.server.wait_closed()
        finally:
            await asyncio.to_thread(running.device.close)

    async def stop_job(self, job_id: str) -> list[int]:
        """Stop every export of a job; their ports."""
        ports = [port for port, running in self.exports.items() if running.job_id == job_id]
        for port in ports:
            await self.stop(port)
        return ports

    async def stop_all(self) -> None:
        """Stop every export (at shutdown)."""
        for port in list(self.exports):
            await self.stop(port)

    def stats(self) -> tuple[ExportStats, ...]:
        """Every export's counters, by port."""
        return tuple(running.stats() for running in sorted(self.exports.values(), key=lambda r: r.port))
