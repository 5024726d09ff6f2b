"""The socket side of one client connection: an ``asyncio.BufferedProtocol``
that feeds a :class:`~sendense_nbd.protocol.client.ClientHandshake`, then a
:class:`~sendense_nbd.protocol.replies.ReplyParser`, and resolves each
request's future when its reply arrives. :class:`~sendense_nbd.client.connection.NBDClient`
drives it; see :mod:`sendense_nbd.client.connection` for the theory of operation.

When the handshake asks for TLS (:class:`~sendense_nbd.protocol.StartTLS`)
the link stops reading, wraps the socket with ``loop.start_tls`` (checking
a pinned fingerprint once it is done) and hands the rest of the handshake,
and transmission, to asyncio's TLS transport.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import attrs

from sendense_nbd.errors import (
    ConnectionLostError,
    NBDConnectionError,
    OptionError,
    ProtocolError,
    SendenseError,
    TLSError,
)
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.client import ClientHandshake, ClientHandshakeEvent, Ready
from sendense_nbd.protocol.constants import Command, Errno
from sendense_nbd.protocol.replies import Reply, ReplyParser
from sendense_nbd.protocol.sansio import NEED_DATA, StartTLS
from sendense_nbd.tcp import tune_socket
from sendense_nbd.tls import check_fingerprint, handshake_error

_HANDSHAKE_BUFFER = 64 * 1024
#: Most bytes decrypted before ``start_tls`` returns that are kept for the handshake (option replies).
_EARLY_LIMIT = 64 * 1024
_WRITE_HIGH_WATER = 4 * 1024 * 1024
#: Payloads up to this size are sent in one write together with their header.
_COALESCE = 64 * 1024


@attrs.frozen(slots=True)
class TLSPlan:
    """How a link upgrades to TLS."""

    context: ssl.SSLContext
    #: The name the server's certificate is checked against (and sent as SNI).
    server_hostname: str
    #: ``sha256:HEX`` the server's certificate must have (checked after the handshake).
    fingerprint: str | None = None


class Link(asyncio.BufferedProtocol):
    """The socket side of one connection: handshake, then replies to futures."""

    def __init__(
        self,
        handshake: ClientHandshake,
        max_in_flight: int,
        *,
        congestion: str | None,
        socket_buffer: int | None = None,
        tls: TLSPlan | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._handshake = handshake
        self._handshake_buffer = bytearray(_HANDSHAKE_BUFFER)
        self.negotiated: asyncio.Future[ClientHandshakeEvent] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.parser: ReplyParser | None = None
        self.waiters: dict[int, asyncio.Future[Reply]] = {}
        self.slots = asyncio.Semaphore(max_in_flight)
        self.writable = asyncio.Event()
        self.writable.set()
        self.idle = asyncio.Event()
        self.idle.set()
        #: Why the link cannot carry requests any more (None while it can).
        self.error: NBDConnectionError | None = None
        self._shutdown = False
        self._tcp: socket.socket | None = None
        self._congestion = congestion
        self._socket_buffer = socket_buffer
        self._tls = tls
        self._upgrading: asyncio.Task[None] | None = None
        #: Bytes decrypted before ``start_tls`` returned (server data in the flight of its Finished):
        #: fed to the handshake once the pin is checked.
        self._early: bytearray | None = None
        self._wrapped = False  # the transport is asyncio's TLS transport

    # -- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio: the socket is up (TCP_NODELAY, quick ACKs during the handshake)."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = self._socket_buffer  # BBR and buffers for a long fat link, as the kernel allows (sendense_nbd.tcp)
            tune_socket(sock, congestion=self._congestion, sndbuf=buffer, rcvbuf=buffer)
            self._tcp = sock
            self._quick_ack()

    def get_buffer(self, sizehint: int) -> memoryview:
        """asyncio: where the next bytes go (the caller's read buffer while data arrives)."""
        if self.parser is not None:
            return self.parser.get_buffer()
        return memoryview(self._handshake_buffer)

    def buffer_updated(self, nbytes: int) -> None:
        """asyncio: ``nbytes`` arrived; feed the handshake or the reply parser."""
        try:
            if self.parser is not None:
                self.parser.buffer_updated(nbytes)
                self._dispatch()
            else:
                self._handshake_received(memoryview(self._handshake_buffer)[:nbytes])
        except (OptionError, ProtocolError, TLSError) as exc:  # a refusal ends the connection too
            self.fail(exc)

    def eof_received(self) -> bool:
        """asyncio: the server closed its side (a truncated handshake is an error)."""
        if self.parser is None and not self.negotiated.done():
            try:
                self._handshake.receive_eof()
            except (OptionError, ProtocolError, TLSError) as exc:
                self.fail(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncio: the socket is gone; fail whatever is in flight."""
        if self.closed.done():
            return
        if self.parser is None and self._handshake.tls_active and not self.negotiated.done():
            self.eof_received()  # a reset right after TLS: the handshake says what that likely means
        reason = f": {exc}" if exc else ""
        self.fail(ConnectionLostError(f"the server closed the connection{reason}"))
        self.writable.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        """asyncio: above the write high-water mark; new requests wait."""
        self.writable.clear()

    def resume_writing(self) -> None:
        """asyncio: below the low-water mark again."""
        self.writable.set()

    # -- handshake -----------------------------------------------------------------

    def _quick_ack(self) -> None:
        """ACK at once during the handshake (Linux re-arms delayed ACKs, so per read).

        A server that sends one reply in several small writes without
        TCP_NODELAY (qemu-nbd's option replies) otherwise waits for our
        delayed ACK, about 40 ms per round trip.
        """
        if self._tcp is not None and hasattr(socket, "TCP_QUICKACK"):
            self._tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def _handshake_received(self, data: memoryview) -> None:
        handshake = self._handshake
        assert self.transport is not None
        if self._early is not None:
            # Decrypted before start_tls returned: held until the pin is checked.
            self._early += data
            if len(self._early) > _EARLY_LIMIT:
                self._early = None
                raise ProtocolError("the server sent too much during the TLS handshake")
            return
        self._quick_ack()
        handshake.receive_data(data)
        out = handshake.data_to_send()
        if out:
            self.transport.write(out)
        event = handshake.next_event()
        if event is NEED_DATA:
            return
        if isinstance(event, StartTLS):
            self.transport.pause_reading()  # nothing may arrive in plaintext now
            self._early = bytearray()
            self._upgrading = self._loop.create_task(self._start_tls(self.transport))
            return
        if isinstance(event, Ready):
            self.parser = ReplyParser(structured=event.structured_replies, context_ids=event.meta_contexts.values())
            trailing = handshake.trailing_data()
            if trailing:
                self.parser.receive_data(trailing)
        else:  # Informed or Listed: NBD_OPT_ABORT was sent; hang up.
            self.error = NBDConnectionError("the handshake ended without entering transmission")
            self.transport.close()
        if not self.negotiated.done():
            self.negotiated.set_result(event)

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        """Wrap the socket in TLS, then let the handshake go on over it."""
        plan = self._tls
        if plan is None:
            self.fail(ProtocolError("the handshake asked for TLS without a TLS plan"))
            return
        try:
            tls = await self._loop.start_tls(raw, self, plan.context, server_hostname=plan.server_hostname)
            if tls is None:
                raise ConnectionResetError("the connection closed during the TLS handshake")
        except OSError as exc:
            self.fail(handshake_error(exc, server_hostname=plan.server_hostname))
            raw.abort()
            self.connection_lost(None)  # asyncio does not tell the protocol of a failed upgrade
            return
        self.transport = tls
        self._wrapped = True
        if self.closed.done() or tls.is_closing():
            return
        tls.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        early, self._early = self._early, None
        try:
            if plan.fingerprint is not None:
                check_fingerprint(tls.get_extra_info("ssl_object"), plan.fingerprint)
            self._handshake.tls_started()
            tls.write(self._handshake.data_to_send())
            if early:
                self._handshake_received(memoryview(early))
        except (OptionError, ProtocolError, TLSError) as exc:
            self.fail(exc)

    # -- transmission ----------------------------------------------------------------

    def submit(
        self,
        handle: int,
        command: int,
        offset: int,
        length: int,
        flags: int,
        payload: memoryview | None,
        into: memoryview | None,
    ) -> asyncio.Future[Reply]:
        """Register and send one request (the caller holds a slot)."""
        assert self.parser is not None and self.transport is not None
        header = wire.encode_request(command, handle, offset, length, flags)
        self.parser.register(handle, command, offset, length, flags=flags, buffer=into)
        future: asyncio.Future[Reply] = self._loop.create_future()
        self.waiters[handle] = future
        self.idle.clear()
        if payload is None:
            self.transport.write(header)
        elif self._wrapped:
            self.transport.writelines((header, payload))  # one batch of records, one socket write
        elif len(payload) <= _COALESCE:
            self.transport.write(header + payload)
        else:
            self.transport.write(header)
            self.transport.write(payload)
        return future

    def abandon(self, handle: int) -> None:
        """Forget a request whose caller gave up (its late data is dropped)."""
        if self.parser is not None:
            self.parser.abandon(handle)

    def _dispatch(self) -> None:
        parser = self.parser
        assert parser is not None
        while (event := parser.next_event()) is not NEED_DATA:
            assert isinstance(event, Reply)
            future = self.waiters.pop(event.handle)
            self.slots.release()
            if event.errno == Errno.ESHUTDOWN:
                self._shutdown = True
            if not future.done():
                future.set_result(event)
        if not self.waiters:
            self.idle.set()
            if self._shutdown and self.error is None:
                # "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
                self.error = NBDConnectionError("the server is shutting down")
                self.disconnect()

    def check(self) -> None:
        """Raise if the link can carry no more requests."""
        if self.error is not None:
            raise type(self.error)(str(self.error))
        if self._shutdown:
            raise NBDConnectionError("the server is shutting down")
        if self.transport is not None and self.transport.is_closing():
            # The socket failed and connection_lost() has not run yet: writing would only log warnings.
            raise ConnectionLostError("the connection is closing")

    def disconnect(self) -> None:
        """Send ``NBD_CMD_DISC`` and close once it is written."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.encode_request(Command.DISC, 0, 0, 0))
            self.transport.close()

    def fail(self, exc: SendenseError) -> None:
        """Fail the handshake or every request in flight, and hang up."""
        if self.error is None:
            self.error = exc if isinstance(exc, NBDConnectionError) else ConnectionLostError(f"connection lost: {exc}")
        if not self.negotiated.done():
            self.negotiated.set_exception(exc)
        error = self.error
        waiters, self.waiters = self.waiters, {}
        for future in waiters.values():
            self.slots.release()
            if not future.done():
                future.set_exception(ConnectionLostError(str(error)))
        self.idle.set()
        if self.transport is not None and not self.transport.is_closing():
            if self.parser is None:
                self.transport.write(self._handshake.data_to_send())  # NBD_OPT_ABORT, if any
                self.transport.close()
            else:
                self.transport.abort()
