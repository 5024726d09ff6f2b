"""The hub's NBD exports, one per disk, each on the socket of its port lease; an export with TLS requires it
(``NBD_OPT_STARTTLS`` before anything else) with the hub's credentials, and may admit only the clients whose
certificate a check accepts (the node whose job it serves). Each export serves the block device its
repository's store opens (a qcow2 file, an RBD image or snapshot, an offsite copy).

:class:`ExportManager` serves them in a pool of export worker processes (:mod:`~sendense_nbd.hub.workers`),
each with its own event loop and storage handles, or, with ``workers=0``, in the hub's own event loop. What
an export needs is an :class:`ExportSpec` of picklable values (its opener and peer check:
:mod:`~sendense_nbd.hub.openers`) and its bound socket, which is passed to the worker.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs

from sendense_nbd.errors import ExportWorkerError, ServerError
from sendense_nbd.hub.serving import ExportSpec, ExportStats, ServedExport, serve_export

if TYPE_CHECKING:
    from sendense_nbd.hub.transport import PeerCheck
    from sendense_nbd.hub.workers import WorkerPool, WorkerView
    from sendense_nbd.storage.base import BlockDevice
    from sendense_nbd.tls import ServerCredentials

log = logging.getLogger(__name__)

#: What the hub does when an export worker died with exports of ``owner`` (a job's ID, or an offsite copy's
#: export name): (owner, why) -> awaited in a task of its own.
LostExports = Callable[[str, str], Awaitable[object]]


@attrs.define(eq=False)
class RunningExport:
    """One export the hub serves: a job's disk image on its leased port; ``worker``: the export worker process
    serving it (None: the hub's own event loop)."""

    spec: ExportSpec
    port: int
    worker: int | None = None

    @property
    def job_id(self) -> str:
        """The job (or lease owner) the export serves."""
        return self.spec.job_id

    @property
    def name(self) -> str:
        """The export's name."""
        return self.spec.name


class ExportManager:
    """Starts, lists and stops the hub's exports (``shared`` clients each, persistent); ``tls``: the hub's
    server credentials, for the exports started with ``tls=True``.

    ``workers``: how many export worker processes serve them (0: the hub's own event loop). A worker that
    dies takes its exports with it: they are dropped, ``on_lost`` is told of each owner, and stopping them
    (:meth:`stop_job`) raises :class:`ExportWorkerError` once, so that no job counts a point a dead worker
    never flushed."""

    def __init__(
        self, *, shared: int = 10, tls: ServerCredentials | None = None, workers: int = 0,
        on_lost: LostExports | None = None,
    ) -> None:  # fmt: skip
        self.shared = shared
        self.tls = tls
        self.exports: dict[int, RunningExport] = {}
        self._on_lost = on_lost
        self._lost: dict[str, str] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._local: dict[int, ServedExport] = {}
        self._tls_context = tls.context() if tls is not None and workers == 0 else None
        self._pool: WorkerPool | None = None
        if workers > 0:
            from sendense_nbd.hub.workers import WorkerPool, WorkerSetup

            self._pool = WorkerPool(workers, WorkerSetup(shared, tls), on_crash=self._worker_died)

    def workers(self) -> tuple[WorkerView, ...]:
        """The export worker processes (none: exports run in the hub's event loop)."""
        return () if self._pool is None else self._pool.views()

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
        """Serve the image ``path`` (what ``opener`` opens, in a thread of the process serving it) as export
        ``name`` on the bound socket ``sock`` (closed here: the export owns it); ``tls``: only over TLS
        (:class:`ServerError` when the hub has no credentials); ``admit_peer``: a client that picks the export is
        admitted only if it says so (it sees the client's certificate)."""
        if tls and self.tls is None:
            sock.close()
            raise ServerError("an export with TLS needs the hub's NBD TLS credentials (--nbd-tls-creds DIR)")
        spec = ExportSpec(job_id, disk_key, name, path, readonly, tls, opener, admit_peer)
        if self._pool is None:
            served = await serve_export(spec, sock, shared=self.shared, tls_context=self._tls_context)
            self._local[served.port] = served
            running = RunningExport(spec, served.port)
        else:
            worker, port = await self._pool.start(spec, sock)
            running = RunningExport(spec, port, worker)
        self.exports[running.port] = running
        return running

    async def stop(self, port: int) -> None:
        """Stop one export, and return once its clients are drained and its image flushed and closed."""
        running = self.exports.pop(port, None)
        if running is None:
            return
        if running.worker is None:
            await self._local.pop(port).close()
        else:
            assert self._pool is not None
            await self._pool.stop(running.worker, port)

    async def stop_job(self, job_id: str) -> list[int]:
        """Stop every export of a job; their ports. :class:`ExportWorkerError` when a worker died with
        exports of the job (said once: the job's points were not flushed)."""
        ports = [port for port, running in self.exports.items() if running.job_id == job_id]
        for port in ports:
            await self.stop(port)
        lost = self._lost.pop(job_id, None)
        if lost is not None:
            raise ExportWorkerError(lost)
        return ports

    async def stop_all(self) -> None:
        """Stop every export, then the worker processes (at shutdown)."""
        try:
            for port in list(self.exports):
                try:
                    await self.stop(port)
                except ExportWorkerError as exc:
                    log.warning("stopping the export on port %d: %s", port, exc)
        finally:
            if self._pool is not None:
                await self._pool.close()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stats(self) -> tuple[ExportStats, ...]:
        """Every export's counters, by port (a worker that does not answer in time is left out, and shown
        unresponsive by :meth:`workers`)."""
        found = [served.stats() for served in self._local.values()]
        if self._pool is not None:
            found += await self._pool.stats()
        return tuple(sorted((s for s in found if s.port in self.exports), key=lambda s: s.port))

    def _worker_died(self, worker: int, why: str) -> None:
        """Drop the exports of a dead worker, remember their owners as lost, and tell ``on_lost`` of each."""
        owners = {running.job_id for running in self.exports.values() if running.worker == worker}
        for port in [port for port, running in self.exports.items() if running.worker == worker]:
            del self.exports[port]
        for owner in sorted(owners):
            log.error("the exports of %s are gone: %s", owner, why)
            self._lost[owner] = why
            if self._on_lost is not None:
                task = asyncio.ensure_future(self._on_lost(owner, why))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
