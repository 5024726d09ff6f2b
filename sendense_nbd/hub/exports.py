"""In-process NBD exports, one per disk, each on the socket of its port lease."""

from __future__ import annotations

import asyncio
import socket

import attrs

from sendense_nbd.server import Export, NBDServer
from sendense_nbd.storage import ImageFormat, open_image
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
    clients: int
    clients_served: int
    bytes_written: int
    bytes_read: int

    def to_json(self) -> dict[str, object]:
        """The export as ``GET /ports`` shows it."""
        return attrs.asdict(self)


@attrs.define(eq=False)
class RunningExport:
    """One export the hub serves: a job's disk image on its leased port."""

    job_id: str
    disk_key: int | None
    name: str
    port: int
    path: str
    readonly: bool
    server: NBDServer
    device: BlockDevice

    def stats(self) -> ExportStats:
        """Its counters now."""
        server = self.server
        return ExportStats(
            self.job_id, self.disk_key, self.name, self.port, self.path, self.readonly,
            server.client_count, server.clients_served, server.bytes_written, server.bytes_read,
        )  # fmt: skip


class ExportManager:
    """Starts, lists and stops the hub's exports (``shared`` clients each, persistent)."""

    def __init__(self, *, shared: int = 10) -> None:
        self.shared = shared
        self.exports: dict[int, RunningExport] = {}

    async def start(
        self,
        job_id: str,
        disk_key: int | None,
        name: str,
        path: str,
        sock: socket.socket,
        *,
        readonly: bool = False,
    ) -> RunningExport:
        """Serve the qcow2 image ``path`` as export ``name`` on the bound socket ``sock``."""
        device = await asyncio.to_thread(open_image, path, ImageFormat.QCOW2, readonly=readonly)
        server = NBDServer(
            [Export(name, device, readonly=readonly)], sockets=[sock], shared=self.shared, persistent=True
        )
        try:
            await server.start()
        except BaseException:
            device.close()
            sock.close()
            raise
        port = int(sock.getsockname()[1])
        running = RunningExport(job_id, disk_key, name, port, path, readonly, server, device)
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
