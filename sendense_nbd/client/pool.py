"""Several connections to one export, used round-robin.

The spec's ``NBD_FLAG_CAN_MULTI_CONN`` ("Transmission flags") promises that
every connection sees the others' completed writes and that a FLUSH on any
one of them covers writes completed on all. Only then is it safe to spread
requests over connections. :class:`ConnectionPool` starts every handshake at
once (one round trip time for all, not one per connection) and looks at the
flag of the first one it started; its failure is the pool's. Without the
flag the pool keeps that one and closes the others before they carry any
request: those that finish their handshake within :data:`EXTRA_GRACE` (or
twice the first's time, if longer) get ``NBD_CMD_DISC``; the rest are
dropped (a single-client server such as ``qemu-nbd -e 1`` never answers
them). Dropping a handshake the server is working on can upset it (nbdkit
1.32's multi-conn filter aborts), hence the wait.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence

from sendense_nbd.client.connection import ClientOptions, NBDClient, open_client
from sendense_nbd.client.uri import NBDAddress, resolve

#: Seconds, at least, that the other handshakes get to finish when the first connection shows no multi-conn.
EXTRA_GRACE = 0.2


class ConnectionPool:
    """Up to ``connections`` clients of one export; :meth:`next` hands them out in turn.

    Use ``async with ConnectionPool(uri, connections=4) as pool`` or
    ``await pool.open()`` ... ``await pool.close()``.
    """

    def __init__(self, target: str | NBDAddress, connections: int = 4, *, options: ClientOptions | None = None) -> None:
        if connections < 1:
            raise ValueError("a pool needs at least one connection")
        self.address = resolve(target)
        self.wanted = connections
        self.options = options or ClientOptions()
        self._clients: tuple[NBDClient, ...] = ()
        self._turn: Iterator[NBDClient] = iter(())

    async def open(self) -> ConnectionPool:
        """Connect: every handshake at once; all the connections if the first allows multi-conn, else the first
        alone (the others closed)."""
        if self._clients:
            raise RuntimeError("the pool is already open")
        loop = asyncio.get_running_loop()
        started = loop.time()
        opening = [asyncio.ensure_future(open_client(self.address, self.options)) for _ in range(self.wanted)]
        try:
            first = await opening[0]
            if first.can_multi_conn:
                clients = await _all_ready(opening)
            else:
                extras = opening[1:]
                if extras:
                    await asyncio.wait(extras, timeout=max(EXTRA_GRACE, 2 * (loop.time() - started)))
                await _discard(extras)
                clients = [first]
        except BaseException:
            await _discard(opening)
            raise
        self._clients = tuple(clients)
        self._turn = itertools.cycle(self._clients)
        return self

    @property
    def connections(self) -> tuple[NBDClient, ...]:
        """The open connections."""
        return self._clients

    def __len__(self) -> int:
        return len(self._clients)

    @property
    def first(self) -> NBDClient:
        """The first connection: size, flags and block sizes are the same on all."""
        if not self._clients:
            raise RuntimeError("the pool is not open")
        return self._clients[0]

    def next(self) -> NBDClient:
        """The next connection, round-robin."""
        if not self._clients:
            raise RuntimeError("the pool is not open")
        return next(self._turn)

    async def flush(self) -> None:
        """Flush writes that completed on any connection.

        With multi-conn one FLUSH covers them all; callers must have their
        write replies before calling (doc/proto.md, "Ordering of messages and writes").
        """
        await self.first.flush()

    async def close(self) -> None:
        """Close every connection (each waits for its requests in flight)."""
        results = await asyncio.gather(*(c.close() for c in self._clients), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def wait_closed(self) -> None:
        """Wait until every connection's socket is closed."""
        await asyncio.gather(*(c.wait_closed() for c in self._clients))

    async def __aenter__(self) -> ConnectionPool:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _failure(task: asyncio.Future[NBDClient]) -> BaseException | None:
    """A finished handshake's error (a cancellation counts); None when it succeeded."""
    return asyncio.CancelledError() if task.cancelled() else task.exception()


async def _all_ready(opening: Sequence[asyncio.Future[NBDClient]]) -> list[NBDClient]:
    """Every connection, once all finished their handshakes; the first failure if one failed."""
    await asyncio.wait(opening)
    failure = next((f for f in map(_failure, opening) if f is not None), None)
    if failure is not None:
        raise failure
    return [task.result() for task in opening]


async def _discard(opening: Sequence[asyncio.Future[NBDClient]]) -> None:
    """Stop handshakes still running and close (``NBD_CMD_DISC``) the connections that finished theirs."""
    if not opening:
        return
    for task in opening:
        task.cancel()  # a no-op once it is done
    await asyncio.wait(opening)
    ready = [task.result() for task in opening if _failure(task) is None]
    await asyncio.gather(*(client.close() for client in ready), return_exceptions=True)
