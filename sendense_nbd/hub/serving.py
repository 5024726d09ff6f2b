"""One export served in this process, the hub's (``--workers 0``) or an export worker's: what it is, as
picklable data (:class:`ExportSpec`), how it starts on a bound socket (:func:`serve_export`), and its counters
(:class:`ExportStats`)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from sendense_nbd.errors import ServerError
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.server import Export, NBDServer

if TYPE_CHECKING:
    from sendense_nbd.server.context import AdmitPeer
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


@attrs.frozen
class ExportSpec:
    """One export as data: whose it is (``job_id``: its job, or the owner of its port lease), its name, the
    image's name (``path``), what opens the image and which clients it admits (picklable values)."""

    job_id: str
    disk_key: int | None
    name: str
    path: str
    readonly: bool
    tls: bool
    opener: Callable[[], BlockDevice]
    admit_peer: AdmitPeer | None = None


@attrs.define(eq=False)
class ServedExport:
    """An export served in this process: its NBD server and open device."""

    spec: ExportSpec
    port: int
    server: NBDServer
    device: BlockDevice

    def stats(self) -> ExportStats:
        """Its counters now."""
        spec, server = self.spec, self.server
        return ExportStats(
            spec.job_id, spec.disk_key, spec.name, self.port, spec.path, spec.readonly, spec.tls,
            server.client_count, server.clients_served, server.bytes_written, server.bytes_read,
        )  # fmt: skip

    async def close(self) -> None:
        """Stop it: clients are drained, the image flushed and closed."""
        try:
            self.server.close()
            await self.server.wait_closed()
        finally:
            await asyncio.to_thread(self.device.close)


async def serve_export(
    spec: ExportSpec, sock: socket.socket, *, shared: int, tls_context: ssl.SSLContext | None
) -> ServedExport:
    """Open the image (its opener, in a thread) and serve it on the bound socket ``sock`` in this event loop;
    ``sock`` is closed if that fails."""
    try:
        if spec.tls and tls_context is None:
            raise ServerError("an export with TLS needs the hub's NBD TLS credentials (--nbd-tls-creds DIR)")
        device = await asyncio.to_thread(spec.opener)
    except BaseException:
        sock.close()
        raise
    server = NBDServer(
        [Export(spec.name, device, readonly=spec.readonly)], sockets=[sock], shared=shared, persistent=True,
        tls=TLSMode.REQUIRE if spec.tls else TLSMode.OFF, tls_context=tls_context if spec.tls else None,
        admit_peer=spec.admit_peer,
    )  # fmt: skip
    try:
        await server.start()
    except BaseException:
        device.close()
        sock.close()
        raise
    return ServedExport(spec, int(sock.getsockname()[1]), server, device)
