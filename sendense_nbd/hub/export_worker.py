"""An export worker process: serves the exports the hub hands it, in its own event loop, with its own storage
handles (``python -m sendense_nbd.hub.export_worker CHANNEL_FD HUB_PID``; :mod:`~sendense_nbd.hub.workers`
starts it).

Requests come over the channel as ``(kind, id, body)``, each answered ``(id, ok, value)``: ``setup`` (the
:class:`~sendense_nbd.hub.workers.WorkerSetup`: TLS credentials are loaded here), ``start`` (an
:class:`~sendense_nbd.hub.exports.ExportSpec` with its bound socket: the port), ``stop`` (a port: answered once
its image is flushed and closed), ``stats``, ``ping`` (answered by the event loop at once: the hub's test of
whether the worker is hung) and ``exit``. A failure is answered with its chain of causes. The
worker dies with the hub (``PR_SET_PDEATHSIG``, and its channel closing), and leaves SIGINT and SIGTERM to the
hub, which stops it in order.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
from typing import Any

from sendense_nbd.errors import ServerError
from sendense_nbd.hub.channel import Channel
from sendense_nbd.hub.serving import ExportSpec, ServedExport, serve_export

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ExportWorker:
    """The exports of one worker process, by port, and the requests of its channel."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.exports: dict[int, ServedExport] = {}
        #: Exports starting, by port: a stop of one waits for its start.
        self.starting: dict[int, asyncio.Future[ServedExport]] = {}
        self.shared = 10
        self.tls_context: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Answer requests until the hub says ``exit`` or its channel closes; then stop every export."""
        try:
            while True:
                try:
                    (kind, request_id, body), fds = await self.channel.recv()
                except (EOFError, ConnectionError):
                    return
                if kind == "exit":
                    await self._stop_all()
                    await self._answer(request_id, True, None)
                    return
                task = asyncio.ensure_future(self._handle(kind, request_id, body, fds))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            await self._stop_all()

    async def _handle(self, kind: str, request_id: int, body: Any, fds: list[int]) -> None:
        try:
            value = await self._do(kind, body, fds)
        except Exception as exc:  # noqa: BLE001 - every failure is the hub's to see
            log.debug("%s failed: %r", kind, exc)
            await self._answer(request_id, False, _chain(exc))
        else:
            await self._answer(request_id, True, value)

    async def _do(self, kind: str, body: Any, fds: list[int]) -> object:
        """One request's work; its answer."""
        if kind == "setup":
            self.shared = body.shared
            self.tls_context = None if body.tls is None else await asyncio.to_thread(body.tls.context)
            return os.getpid()
        if kind == "start":
            if len(fds) != 1:
                raise ServerError(f"a start request carries one socket, not {len(fds)}")
            return await self._start(body, socket.socket(fileno=fds[0]))
        for fd in fds:
            os.close(fd)
        if kind == "stop":
            if body in self.starting:
                await asyncio.wait([self.starting[body]])
            if body in self.exports:
                await self.exports.pop(body).close()
            return None
        if kind == "stats":
            return [served.stats() for served in self.exports.values()]
        if kind == "ping":
            return None
        raise ServerError(f"unknown request {kind!r}")

    async def _start(self, spec: ExportSpec, sock: socket.socket) -> int:
        """Serve ``spec`` on ``sock``; its port."""
        port = int(sock.getsockname()[1])
        starting = asyncio.ensure_future(serve_export(spec, sock, shared=self.shared, tls_context=self.tls_context))
        self.starting[port] = starting
        try:
            served = await starting
        finally:
            del self.starting[port]
        self.exports[port] = served
        return port

    async def _answer(self, request_id: int, ok: bool, value: object) -> None:
        try:
            await self.channel.send((request_id, ok, value))
        except OSError as exc:
            log.debug("the hub is gone: %s", exc)

    async def _stop_all(self) -> None:
        """Stop every export (flushed and closed)."""
        while self.exports:
            _, served = self.exports.popitem()
            try:
                await served.close()
            except Exception as exc:  # noqa: BLE001 - the others are stopped all the same
                log.error("stopping export %s failed: %s", served.spec.name, exc)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes (outermost first, at most 16), each as it survives pickling (else a
    :class:`ServerError` saying what it was)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 16:
        try:
            copy = pickle.loads(pickle.dumps(seen))
            assert isinstance(copy, BaseException)
        except Exception:  # noqa: BLE001 - not every exception pickles
            copy = ServerError(f"{type(seen).__name__}: {seen}")
        chain.append(copy)
        seen = seen.__cause__ or seen.__context__
    return chain


def _die_with(hub_pid: int) -> None:
    """Ask the kernel for SIGKILL when the hub dies; exit now if it is gone already."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != hub_pid:
        os._exit(1)


def main(argv: list[str]) -> int:
    """Serve the hub's exports over the channel on file descriptor ``argv[0]``; ``argv[1]``: the hub's PID,
    ``argv[2]``: the hub's log level (its ``-v``)."""
    fd, hub_pid, level = int(argv[0]), int(argv[1]), int(argv[2])
    _die_with(hub_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=level, format=f"export worker {os.getpid()}: %(levelname)s %(message)s")

    async def serve() -> None:
        await ExportWorker(Channel(socket.socket(fileno=fd))).run()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
