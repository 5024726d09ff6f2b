"""A local TCP listener whose connections become SSH ``direct-tcpip`` channels.

This is asyncssh's ``forward_local_port`` with four differences the tunnel needs:

- each accepted connection asks ``pick`` for an SSH connection, so one port's
  connections spread over the tunnel's connections (least loaded, in the tunnel);
- the local socket is not read further until its channel is open, and a
  channel that opens after its local client went away is closed at once
  (asyncssh #823 leaks such channels);
- channels get the window and packet size of the tunnel's
  :class:`~sendense_nbd.tunnel.config.LinkTuning` (asyncssh's 2 MiB default
  carries only ~1 MiB per round trip);
- it counts its open connections, per SSH connection (:meth:`LocalForwarder.active_on`).

Flow control is end to end: a full local socket pauses the channel (asyncssh
then stops sending WINDOW_ADJUST, so the peer stops after one window), a full
channel pauses the local socket. One forwarded connection holds at most about
one window per direction in memory.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

import asyncssh

from sendense_nbd.tcp import TcpTuning, is_tcp, tune_socket
from sendense_nbd.tunnel.config import Forward, LinkTuning

log = logging.getLogger(__name__)

#: Seconds a closing forwarded socket may take to flush before it is aborted.
CLOSE_TIMEOUT = 5.0


def tune_connection(
    conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection, tuning: LinkTuning
) -> TcpTuning | None:
    """Congestion control and buffers of an SSH connection's TCP socket, once at connect/accept (None: not TCP)."""
    sock = conn.get_extra_info("socket")
    if not is_tcp(sock):
        return None
    size = tuning.socket_buffer or None
    return tune_socket(sock, congestion=tuning.congestion, sndbuf=size, rcvbuf=size)


class _ChannelSide(asyncssh.SSHTCPSession[bytes]):
    """The SSH end of one forwarded connection."""

    def __init__(self, local: _LocalSide) -> None:
        self._local = local
        self.eof = False

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._local.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self._local.eof:  # both directions are done
            self._local.close()
        else:
            self._local.write_eof()
        return True  # the channel closes with the local connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._local.close()

    def pause_writing(self) -> None:
        self._local.pause_reading()

    def resume_writing(self) -> None:
        self._local.resume_reading()


class _LocalSide(asyncio.Protocol):
    """The local TCP end of one forwarded connection."""

    def __init__(self, forwarder: LocalForwarder) -> None:
        self._forwarder = forwarder
        self._transport: asyncio.Transport | None = None
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._session: _ChannelSide | None = None
        #: The SSH connection this connection's channel rides (None until picked).
        self.conn: asyncssh.SSHClientConnection | None = None
        self._paused = False
        self._pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._forwarder.opened(self)

    async def open(self, conn: asyncssh.SSHClientConnection) -> None:
        """Open the channel over ``conn``, then start reading the local socket."""
        fwd, tuning = self._forwarder.forward, self._forwarder.tuning
        peer = self._transport.get_extra_info("peername") if self._transport else None
        orig_host, orig_port = (peer[0], peer[1]) if peer else ("", 0)
        try:
            chan, session = await conn.create_connection(
                lambda: _ChannelSide(self),
                fwd.dest_host,
                fwd.dest_port,
                orig_host,
                orig_port,
                window=tuning.window,
                max_pktsize=tuning.max_packet,
            )
        except (OSError, asyncssh.Error) as exc:
            log.warning("forward %s: the hub refused the channel: %s", fwd, exc)
            self.close()
            return
        if self._transport is None:  # the client left while the channel opened (asyncssh #823)
            chan.close()
            return
        self._chan, self._session = chan, cast(_ChannelSide, session)
        for data in self._pending:
            chan.write(data)
        self._pending.clear()
        if self.eof:
            chan.write_eof()
        elif not self._paused:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._chan is not None:
            self._chan.write(data)
        else:  # hold one read until the channel is open
            self._pending.append(data)
            assert self._transport is not None
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self._chan is not None:
            self._chan.write_eof()
        return self._session is None or not self._session.eof

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._chan is not None:
            self._chan.close()
        self._forwarder.closed(self)

    def pause_writing(self) -> None:
        if self._chan is not None:
            self._chan.pause_reading()

    def resume_writing(self) -> None:
        if self._chan is not None:
            self._chan.resume_reading()

    # -- driven by the channel side --------------------------------------------

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def write_eof(self) -> None:
        if self._transport is not None and self._transport.can_write_eof():
            self._transport.write_eof()

    def pause_reading(self) -> None:
        self._paused = True
        if self._transport is not None and self._chan is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self._transport is not None and self._chan is not None:
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the local socket now, unsent data too (its SSH connection is gone)."""
        if self._transport is not None:
            self._transport.abort()


class LocalForwarder:
    """Listens on ``forward.listen_host:listen_port``; each client gets a channel to ``dest``.

    ``pick`` names the SSH connection for the next client (None: none is up, the client is closed).
    """

    def __init__(
        self,
        forward: Forward,
        pick: Callable[[], asyncssh.SSHClientConnection | None],
        tuning: LinkTuning,
    ) -> None:
        self.forward = forward
        self.tuning = tuning
        self._pick = pick
        self._server: asyncio.Server | None = None
        self._connections: set[_LocalSide] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        """Forwarded connections open now."""
        return len(self._connections)

    def active_on(self, conn: asyncssh.SSHClientConnection) -> int:
        """Forwarded connections open now whose channel rides ``conn``."""
        return sum(1 for side in self._connections if side.conn is conn)

    async def start(self) -> None:
        """Bind and listen (``OSError`` when the port is taken)."""
        loop = asyncio.get_running_loop()
        fwd = self.forward
        self._server = await loop.create_server(
            lambda: _LocalSide(self), fwd.listen_host, fwd.listen_port, reuse_address=True
        )

    def opened(self, side: _LocalSide) -> None:
        """A local client connected: pick its SSH connection, count it and open its channel in a task."""
        side.conn = self._pick()
        if side.conn is None:
            side.close()
            return
        self._connections.add(side)
        task = asyncio.get_running_loop().create_task(side.open(side.conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def closed(self, side: _LocalSide) -> None:
        """A local client's connection is gone."""
        self._connections.discard(side)

    def close_on(self, conn: asyncssh.SSHClientConnection) -> None:
        """Abort the forwarded connections riding ``conn`` (it went down: nothing more can pass)."""
        for side in [side for side in self._connections if side.conn is conn]:
            side.abort()

    def close(self) -> None:
        """Stop listening and close every forwarded connection."""
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for side in list(self._connections):
            side.close()

    async def wait_closed(self) -> None:
        """Wait until the listener and its connections are closed.

        A local client that does not read keeps its socket closing forever (and, on Python 3.12+,
        the listener's ``wait_closed``): after :data:`CLOSE_TIMEOUT` seconds such sockets are aborted.
        """
        timeout = CLOSE_TIMEOUT
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._server.wait_closed()), timeout)
        except TimeoutError:
            for side in list(self._connections):
                side.abort()
            await asyncio.wait_for(self._server.wait_closed(), timeout)
