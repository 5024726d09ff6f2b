"""A TCP delay line for tests: every chunk crosses the relay half a round trip after it arrived.

``DelayRelay`` listens on 127.0.0.1 and connects each accepted connection to one target. In each
direction, a chunk read at time t is written at t + rtt/2, in order, so the relay adds ``rtt`` to every
round trip without limiting the bandwidth of a single connection (beyond ``queue_limit / (rtt/2)``).
Each direction holds at most ``queue_limit`` bytes in its line (plus the stream buffers, under 1 MiB);
beyond that the relay stops reading that side until the other side took some. An end of stream
(half-close) is forwarded in its place in the line; a connection ends when both directions ended, or
at once when either side fails (reset, error).

The relay runs its own event loop in a thread, so the test's code never shares its loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
import threading
from types import TracebackType

import attrs

MIB = 1 << 20
CHUNK = 256 * 1024  # the most one read takes
STREAM_LIMIT = 256 * 1024  # what a StreamReader buffers before it pauses its socket
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


@attrs.define
class DirectionStats:
    """What one direction carried, over all connections: bytes, and the most ever queued in one line."""

    bytes: int = 0
    peak_queued: int = 0
    queued: int = 0  # now, over all connections


@attrs.define
class _Line:
    """One direction of one connection: (due time, chunk) in order; an empty chunk is the end of stream."""

    limit: int
    items: collections.deque[tuple[float, bytes]] = attrs.field(factory=collections.deque)
    queued: int = 0
    changed: asyncio.Condition = attrs.field(factory=asyncio.Condition)


class DelayRelay:
    """``with DelayRelay(("127.0.0.1", port), rtt=0.05) as relay:`` connect to ``relay.port``."""

    def __init__(
        self, target: tuple[str, int], *, rtt: float, queue_limit: int = 16 * MIB, connect_timeout: float = 10
    ) -> None:
        if rtt < 0 or queue_limit < 1:
            raise ValueError("rtt must be >= 0 and queue_limit >= 1")
        self.target, self.rtt, self.queue_limit, self.connect_timeout = target, rtt, queue_limit, connect_timeout
        self.up, self.down = DirectionStats(), DirectionStats()  # client -> target, target -> client
        self.accepted = 0
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="delay-relay", daemon=True)

    def __enter__(self) -> DelayRelay:
        return self.start()

    def start(self) -> DelayRelay:
        """Listen (``self.port``) and serve in the relay's thread; ``close()`` ends it."""
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            self.close()
            raise AssertionError(f"the delay relay did not start: {self._error!r}")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening, drop every connection (both sides) and end the thread."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self._thread.is_alive():
            raise AssertionError("the delay relay did not stop within 10 s")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__, or lost with the test that follows
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        connections: set[asyncio.Task[None]] = set()

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(self._connection(reader, writer))
            connections.add(task)
            task.add_done_callback(connections.discard)

        server = await asyncio.start_server(accept, "127.0.0.1", 0, limit=STREAM_LIMIT)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        async with server:
            await self._stop.wait()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writers, ended = [client_writer], False
        try:
            async with asyncio.timeout(self.connect_timeout):
                target_reader, target_writer = await asyncio.open_connection(*self.target, limit=STREAM_LIMIT)
            writers.append(target_writer)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._direction(client_reader, target_writer, self.up))
                group.create_task(self._direction(target_reader, client_writer, self.down))
            ended = True
        except* OSError:  # one side failed (reset, refused, timed out): both are dropped below
            pass
        finally:
            for writer in writers:
                if ended:
                    writer.close()
                else:  # a reset, so that the peer sees a failure and not an end of stream
                    with contextlib.suppress(OSError):
                        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                    writer.transport.abort()

    async def _direction(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: DirectionStats
    ) -> None:
        line = _Line(self.queue_limit)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._fill(reader, line, stats))
            group.create_task(self._drain(writer, line, stats))

    async def _fill(self, reader: asyncio.StreamReader, line: _Line, stats: DirectionStats) -> None:
        """Read chunks into the line, never holding more than its limit; ends after the end of stream."""
        loop = asyncio.get_running_loop()
        while True:
            async with line.changed:
                await line.changed.wait_for(lambda: line.queued < line.limit)
            data = await reader.read(min(CHUNK, line.limit - line.queued))
            async with line.changed:
                line.items.append((loop.time() + self.rtt / 2, data))
                line.queued += len(data)
                stats.queued += len(data)
                stats.peak_queued = max(stats.peak_queued, line.queued)
                line.changed.notify_all()
            if not data:
                return

    async def _drain(self, writer: asyncio.StreamWriter, line: _Line, stats: DirectionStats) -> None:
        """Write each chunk when it is due; forward the end of stream as a half-close."""
        loop = asyncio.get_running_loop()
        while True:
            async with line.changed:
                await line.changed.wait_for(lambda: bool(line.items))
                due, data = line.items[0]
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            async with line.changed:
                line.items.popleft()
                line.queued -= len(data)
                stats.queued -= len(data)
                stats.bytes += len(data)
                line.changed.notify_all()
