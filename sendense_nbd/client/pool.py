"""Several connections to one export, used round-robin.

The spec's ``NBD_FLAG_CAN_MULTI_CONN`` ("Transmission flags") promises that
every connection sees the others' completed writes and that a FLUSH on any
one of them covers writes completed on all. Only then is it safe to spread
requests over connections.

Over TCP :class:`ConnectionPool` starts every handshake at once (one round
trip time for all, not one per connection); over a unix socket, where a
round trip costs nothing but each handshake may cost the server dearly
(nbdkit-vddk opens the disk in VDDK for each), it starts one and the others
only if that one shows multi-conn (``at_once`` overrides). The first
handshake to succeed decides, whichever the server served first: a
single-client server (``qemu-nbd``'s default, our own ``serve --shared 1``)
refuses or never answers the others, and the order in which it sees them is
not the order they were started in (name lookups, tunnels). The pool fails
only if every handshake fails. With multi-conn the others that succeed join
the pool (a server with fewer free slots than ``connections`` gives fewer);
without it they get ``NBD_CMD_DISC`` before carrying any request. The others
are waited for while they keep finishing, one at least every
:data:`EXTRA_GRACE` seconds (or twice the first's time, if longer); those
still in their handshake then are dropped. Dropping one the server is
working on can upset it (nbdkit 1.32's multi-conn filter aborts), hence the
wait.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence

from sendense_nbd.client.connection import ClientOptions, NBDClient, open_client, with_tls
from sendense_nbd.client.uri import NBDAddress, resolve

#: Seconds, at least, that the other handshakes get to finish, counted from the last one that did.
EXTRA_GRACE = 0.2


class ConnectionPool:
    """Up to ``connections`` clients of one export; :meth:`next` hands them out in turn.

    Use ``async with ConnectionPool(uri, connections=4) as pool`` or
    ``await pool.open()`` ... ``await pool.close()``. ``at_once``: start
    every handshake at once (default: over TCP, not over a unix socket).
    """

    def __init__(
        self,
        target: str | NBDAddress,
        connections: int = 4,
        *,
        options: ClientOptions | None = None,
        at_once: bool | None = None,
    ) -> None:
        if connections < 1:
            raise ValueError("a pool needs at least one connection")
        self.address = resolve(target)
        self.wanted = connections
        self.options = with_tls(self.address, options or ClientOptions())  # one TLS context for all
        self.at_once = not self.address.is_unix if at_once is None else at_once
        self._clients: tuple[NBDClient, ...] = ()
        self._turn: Iterator[NBDClient] = iter(())

    async def open(self) -> ConnectionPool:
        """Connect (see the module's doc): the first handshake to succeed decides; with multi-conn the
        others that succeed join, else that one alone stays (the others closed)."""
        if self._clients:
            raise RuntimeError("the pool is already open")
        loop = asyncio.get_running_loop()
        started = loop.time()
        opening = [self._start() for _ in range(self.wanted if self.at_once else 1)]
        try:
            chosen = await _first_ready(opening)
            first = chosen.result()
            grace = max(EXTRA_GRACE, 2 * (loop.time() - started))
            if first.can_multi_conn and not self.at_once:
                opening.extend(self._start() for _ in range(self.wanted - 1))
            others = [task for task in opening if task is not chosen]
            await _settle(others, grace)
            ready = [task for task in others if task.done() and _failure(task) is None]
            joining = ready if first.can_multi_conn else []
            await _discard([task for task in others if task not in joining])
            clients = [first, *(task.result() for task in joining)]
        except BaseException:
            await _discard(opening)
            raise
        self._clients = tuple(clients)
        self._turn = itertools.cycle(self._clients)
        return self

    def _start(self) -> asyncio.Future[NBDClient]:
        return asyncio.ensure_future(open_client(self.address, self.options))

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


async def _first_ready(opening: Sequence[asyncio.Future[NBDClient]]) -> asyncio.Future[NBDClient]:
    """The first handshake to succeed (in the order they finish); the first failure if every one failed."""
    failures: list[BaseException] = []
    pending = set(opening)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in (task for task in opening if task in done):
            failure = _failure(task)
            if failure is None:
                return task
            failures.append(failure)
    raise failures[0]


async def _settle(opening: Sequence[asyncio.Future[NBDClient]], grace: float) -> None:
    """Wait while the handshakes keep finishing, one at least every ``grace`` seconds."""
    pending = set(opening)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return


async def _discard(opening: Sequence[asyncio.Future[NBDClient]]) -> None:
    """Stop handshakes still running and close (``NBD_CMD_DISC``) the connections that finished theirs."""
    if not opening:
        return
    for task in opening:
        task.cancel()  # a no-op once it is done
    await asyncio.wait(opening)
    ready = [task.result() for task in opening if _failure(task) is None]
    await asyncio.gather(*(client.close() for client in ready), return_exceptions=True)
