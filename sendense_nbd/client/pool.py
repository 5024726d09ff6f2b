"""Several connections to one export, used round-robin.

The spec's ``NBD_FLAG_CAN_MULTI_CONN`` ("Transmission flags") promises that
every connection sees the others' completed writes and that a FLUSH on any
one of them covers writes completed on all. Only then is it safe to spread
requests over connections, so :class:`ConnectionPool` opens one connection,
looks at the flag, and opens the rest only when the server set it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

from sendense_nbd.client.connection import ClientOptions, NBDClient, open_client
from sendense_nbd.client.uri import NBDAddress, resolve


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
        """Connect: one connection, then the rest if the server allows multi-conn."""
        if self._clients:
            raise RuntimeError("the pool is already open")
        first = await open_client(self.address, self.options)
        clients = [first]
        if first.can_multi_conn and self.wanted > 1:
            opening = [asyncio.ensure_future(open_client(self.address, self.options)) for _ in range(self.wanted - 1)]
            results = await asyncio.gather(*opening, return_exceptions=True)
            clients += [c for c in results if isinstance(c, NBDClient)]
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
                raise failure
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
