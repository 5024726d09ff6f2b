"""The message channel between the hub and one export worker process: a unix ``SOCK_SEQPACKET`` socket pair,
one pickled message per datagram, with file descriptors (a leased port's listening socket) passed alongside it
(``SCM_RIGHTS``). Both ends are this process's own children or parent, so pickles are trusted."""

from __future__ import annotations

import asyncio
import pickle
import socket
from collections.abc import Callable, Sequence
from typing import Any

#: The largest message (a stats answer of every export a worker serves fits many times over).
MAX_MESSAGE = 4 << 20
#: File descriptors one message may carry.
MAX_FDS = 4


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of sockets (not inherited by children unless passed on purpose)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE)
    return ours, theirs


class Channel:
    """One end of a pair, used from one event loop: :meth:`send` and :meth:`recv` whole messages."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._lock = asyncio.Lock()

    async def send(self, message: object, fds: Sequence[int] = ()) -> None:
        """Send ``message`` (pickled) with ``fds``; :class:`ConnectionError` when the other end is gone."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._lock:
            while True:
                try:
                    socket.send_fds(self.sock, [data], list(fds))
                    return
                except BlockingIOError:
                    await self._ready(asyncio.get_running_loop().add_writer, asyncio.get_running_loop().remove_writer)

    async def recv(self) -> tuple[Any, list[int]]:
        """The next message and the descriptors that came with it; :class:`EOFError` once the other end closed."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                loop = asyncio.get_running_loop()
                await self._ready(loop.add_reader, loop.remove_reader)
                continue
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    socket.close(fd)
                raise ConnectionError("a message on the export worker channel was cut short")
            if not data:
                raise EOFError("the other end of the export worker channel closed")
            return pickle.loads(data), fds

    async def _ready(self, add: Callable[..., None], remove: Callable[[int], object]) -> None:
        """Wait until the socket is readable or writable (``add``/``remove``: the loop's reader or writer)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        add(self.sock.fileno(), wake)
        try:
            await waiter
        finally:
            remove(self.sock.fileno())

    def close(self) -> None:
        """Close this end (the other end then reads :class:`EOFError`)."""
        self.sock.close()
