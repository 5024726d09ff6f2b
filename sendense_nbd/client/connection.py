"""An asyncio NBD client on the sans-IO codec of :mod:`sendense_nbd.protocol.client`
and :mod:`sendense_nbd.protocol.replies`.

Theory of operation:

* :func:`connect` opens a TCP (``TCP_NODELAY``) or unix stream whose protocol
  is a :class:`~sendense_nbd.client.link.Link`, an ``asyncio.BufferedProtocol``.
  The link first feeds a :class:`~sendense_nbd.protocol.client.ClientHandshake`,
  then a :class:`~sendense_nbd.protocol.replies.ReplyParser`. While read data
  arrives the parser's ``get_buffer()`` is the caller's own buffer, so the
  kernel copies socket bytes straight to where :meth:`NBDClient.pread_into`
  wants them.
* Every request gets a cookie ("handle") and a future; the link resolves the
  future when the parser emits that request's reply, so any number of
  requests are in flight and replies may come in any order (doc/proto.md,
  "Ordering of messages and writes"). A semaphore bounds the requests in
  flight, and requests wait while the transport is above its write
  high-water mark, so memory stays bounded.
* Requests are checked before sending with the same
  :func:`~sendense_nbd.protocol.transmission.check_request` a server
  applies (range, alignment, read-only, advertised commands and flags), and
  split at the server's maximum payload. A failed check or an error reply
  raises :class:`NBDRequestError` carrying the NBD errno.
* A protocol violation or a dropped connection fails every request in flight
  with :class:`ConnectionLostError`. A request over ``request_timeout``
  raises :class:`NBDTimeoutError`; a timed-out or cancelled read is
  abandoned in the parser, so its late data never lands in a buffer the
  caller already got back.
* TLS: an ``nbds://`` address makes the handshake send ``NBD_OPT_STARTTLS``
  first and fail unless the server takes it; the link then upgrades the
  socket with ``loop.start_tls`` (see :mod:`sendense_nbd.client.link`).
  The TLS context comes from the address (``tls-certificates``,
  ``tls-verify-peer``, ``tls-fingerprint``) unless
  :attr:`ClientOptions.tls_context` gives one. A context that checks no
  certificate (one made for a pin) is refused unless a pin comes with it
  (the URI's or :attr:`ClientOptions.tls_fingerprint`) or the URI says
  ``tls-verify-peer=false``. Reads still land in the caller's buffer:
  asyncio's TLS transport decrypts into ``get_buffer()``.
* :meth:`NBDClient.close` waits for requests in flight, sends
  ``NBD_CMD_DISC`` (a soft disconnect) and waits for the socket to close.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import Coroutine, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any

import attrs

from sendense_nbd.client.link import Link, TLSPlan
from sendense_nbd.client.uri import NBDAddress, resolve
from sendense_nbd.errors import (
    ConnectionLostError,
    NBDConnectionError,
    NBDRequestError,
    NBDTimeoutError,
    SendenseError,
    TLSError,
    first_error,
)
from sendense_nbd.protocol import transmission as tx
from sendense_nbd.protocol.client import (
    ClientHandshake,
    ClientHandshakeEvent,
    Goal,
    Informed,
    Listed,
    ListedExport,
    Ready,
)
from sendense_nbd.protocol.constants import (
    BASE_ALLOCATION,
    MAX_PAYLOAD,
    Command,
    CommandFlag,
    Errno,
    TLSMode,
    TransmissionFlag,
)
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.protocol.handshake import ExportInfo, Negotiated
from sendense_nbd.protocol.replies import Reply
from sendense_nbd.tcp import DEFAULT_CONGESTION, DEFAULT_SOCKET_BUFFER
from sendense_nbd.tls import client_context, parse_fingerprint

WritableBuffer = bytearray | memoryview
ReadableBuffer = bytes | bytearray | memoryview

#: Largest effect length (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) per request.
_MAX_EFFECT = 1 << 30


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _pin(value: str | None) -> str | None:
    return None if value is None else parse_fingerprint(value)


@attrs.frozen(slots=True)
class ClientOptions:
    """How to connect and negotiate; the keyword arguments of :func:`connect`."""

    #: Seconds for connecting plus the handshake.
    timeout: float | None = 30.0
    #: Seconds each request may take (None: no limit).
    request_timeout: float | None = None
    max_in_flight: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    structured_replies: bool = True
    meta_contexts: tuple[str, ...] = attrs.field(default=(BASE_ALLOCATION,), converter=_strings)
    request_block_size: bool = True
    #: TCP congestion control of the socket, set once at connect (None: the system's; unix sockets: unused).
    congestion: str | None = DEFAULT_CONGESTION
    #: Send and receive buffer (kernel units) of the TCP socket where autotuning stops short of it (None:
    #: autotuning alone): by default sized for 1 Gbit/s at 100 ms, as the tunnel's (sendense_nbd.tcp).
    socket_buffer: int | None = DEFAULT_SOCKET_BUFFER
    #: For ``nbds://`` addresses: this context instead of one made from the URI's settings.
    tls_context: ssl.SSLContext | None = None
    #: ``sha256:HEX`` the server's certificate must have, for a pinned :attr:`tls_context`
    #: (:func:`~sendense_nbd.tls.client_context` with a fingerprint checks nothing itself).
    tls_fingerprint: str | None = attrs.field(default=None, converter=_pin)


def with_tls(address: NBDAddress, options: ClientOptions) -> ClientOptions:
    """``options`` with the TLS context an ``nbds://`` address needs (made once, shared by a pool)."""
    if not address.tls or options.tls_context is not None:
        return options
    context = client_context(
        address.tls_certificates, verify_peer=address.tls_verify_peer, fingerprint=address.tls_fingerprint
    )
    return attrs.evolve(options, tls_context=context)


def _tls_plan(address: NBDAddress, options: ClientOptions) -> TLSPlan | None:
    """How an ``nbds://`` address upgrades: the context, the name and the pin to check (the URI's first)."""
    if not address.tls:
        return None
    context = options.tls_context
    assert context is not None
    pin = address.tls_fingerprint or options.tls_fingerprint
    if context.verify_mode == ssl.CERT_NONE and pin is None and address.tls_verify_peer:
        raise TLSError(
            f"{address.uri}: the TLS context checks no certificate (one made for a pin?) and no pin comes "
            "with it: give the pin (tls-fingerprint=sha256:HEX, ClientOptions.tls_fingerprint), or say "
            "tls-verify-peer=false to skip checking the server"
        )
    return TLSPlan(context, address.server_hostname, pin)


class NBDClient:
    """One connection to one export; made by :func:`connect`.

    Offsets and lengths are in bytes. The capability properties mirror the
    transmission flags the server sent; calling an operation the server did
    not advertise raises :class:`NBDRequestError` without a round trip.
    """

    def __init__(self, link: Link, ready: Ready, address: NBDAddress, options: ClientOptions) -> None:
        self._link = link
        self._loop = asyncio.get_running_loop()
        self._ready = ready
        self.address = address
        self._options = options
        export = ready.export
        by_id = sorted((cid, name) for name, cid in ready.meta_contexts.items())
        self._negotiated = Negotiated(
            ExportInfo(
                name=export.name,
                size=export.size,
                flags=export.flags,
                min_block=export.min_block,
                preferred_block=export.preferred_block,
                max_block=export.max_block,
                meta_contexts=tuple(name for _, name in by_id),
            ),
            ready.structured_replies,
            tuple(by_id),
        )
        minimum = export.min_block
        self._payload_chunk = max(minimum, min(export.max_block, MAX_PAYLOAD) // minimum * minimum)
        self._effect_chunk = _MAX_EFFECT // minimum * minimum if minimum <= _MAX_EFFECT else minimum
        self._handles = itertools.count(1)
        self._closing = False

    # -- what the handshake said -------------------------------------------------------

    @property
    def size(self) -> int:
        """The export's size in bytes."""
        return self._ready.export.size

    @property
    def export_name(self) -> str:
        """The export's canonical name (from ``NBD_INFO_NAME`` when sent)."""
        return self._ready.export.name

    @property
    def description(self) -> str:
        """The export's description (empty when the server sent none)."""
        return self._ready.export.description

    @property
    def flags(self) -> TransmissionFlag:
        """The transmission flags the server sent."""
        return self._ready.export.flags

    def _has(self, flag: TransmissionFlag) -> bool:
        return bool(self._ready.export.flags & flag)

    @property
    def is_read_only(self) -> bool:
        """The export is read-only."""
        return self._has(TransmissionFlag.READ_ONLY)

    @property
    def is_rotational(self) -> bool:
        """The server says seeks are expensive."""
        return self._has(TransmissionFlag.ROTATIONAL)

    @property
    def can_flush(self) -> bool:
        """FLUSH is supported."""
        return self._has(TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        """Writes may ask for FUA (durable on return)."""
        return self._has(TransmissionFlag.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        """TRIM is supported."""
        return self._has(TransmissionFlag.SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        """WRITE_ZEROES is supported."""
        return self._has(TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        """WRITE_ZEROES takes the FAST_ZERO flag."""
        return self._has(TransmissionFlag.SEND_FAST_ZERO)

    @property
    def can_df(self) -> bool:
        """Reads may ask for one data chunk (DF)."""
        return self._has(TransmissionFlag.SEND_DF)

    @property
    def can_multi_conn(self) -> bool:
        """Connections to this export share one consistent view (and FLUSH covers all)."""
        return self._has(TransmissionFlag.CAN_MULTI_CONN)

    @property
    def can_cache(self) -> bool:
        """CACHE is supported."""
        return self._has(TransmissionFlag.SEND_CACHE)

    @property
    def can_block_status(self) -> bool:
        """At least one meta context was negotiated."""
        return bool(self._ready.meta_contexts)

    @property
    def min_block(self) -> int:
        """The smallest block requests must be aligned to."""
        return self._ready.export.min_block

    @property
    def preferred_block(self) -> int:
        """The block size the server prefers."""
        return self._ready.export.preferred_block

    @property
    def max_block(self) -> int:
        """The server's maximum payload (reads and writes are split to fit)."""
        return self._ready.export.max_block

    @property
    def structured_replies(self) -> bool:
        """Structured replies were negotiated."""
        return self._ready.structured_replies

    @property
    def meta_contexts(self) -> Mapping[str, int]:
        """Negotiated meta contexts, name to context id."""
        return self._ready.meta_contexts

    @property
    def used_go(self) -> bool:
        """False when the server needed the ``NBD_OPT_EXPORT_NAME`` fallback."""
        return self._ready.used_go

    @property
    def tls_version(self) -> str | None:
        """The TLS version of the connection (e.g. ``TLSv1.3``), None in plaintext."""
        transport = self._link.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        return None if ssl_object is None else str(ssl_object.version())

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._link.waiters)

    @property
    def closed(self) -> bool:
        """The socket is closed."""
        return self._link.closed.done()

    def __repr__(self) -> str:
        return f"<NBDClient {self.address.uri} size={self.size}>"

    # -- requests ------------------------------------------------------------------------

    async def pread(self, *, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (:meth:`pread_into` avoids a copy)."""
        buffer = bytearray(length)
        await self.pread_into(buffer, offset=offset)
        return bytes(buffer)

    async def pread_into(self, buffer: WritableBuffer, *, offset: int) -> None:
        """Fill ``buffer`` from ``offset``; the socket receives straight into it."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError("pread_into needs a writable buffer")
        await self._split(Command.READ, offset, len(view), self._payload_chunk, into=view)

    async def pwrite(self, data: ReadableBuffer, *, offset: int, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable on return."""
        view = memoryview(data).cast("B")
        flags = CommandFlag.FUA if fua else 0
        await self._split(Command.WRITE, offset, len(view), self._payload_chunk, flags, payload=view)

    async def flush(self) -> None:
        """Make every write that already completed durable."""
        await self._request(Command.FLUSH, 0, 0)

    async def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        """Tell the server the range is no longer needed (it may read back as anything)."""
        await self._split(Command.TRIM, offset, length, self._effect_chunk, CommandFlag.FUA if fua else 0)

    async def zero(
        self, *, offset: int, length: int, no_hole: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        """Write zeroes. ``no_hole``: keep the range allocated; ``fast``: fail
        with ``ENOTSUP`` rather than be slower than writing zeroes."""
        flags = (
            (CommandFlag.NO_HOLE if no_hole else 0)
            | (CommandFlag.FAST_ZERO if fast else 0)
            | (CommandFlag.FUA if fua else 0)
        )
        await self._split(Command.WRITE_ZEROES, offset, length, self._effect_chunk, flags)

    async def cache(self, *, offset: int, length: int) -> None:
        """Ask the server to prefetch the range."""
        await self._split(Command.CACHE, offset, length, self._effect_chunk)

    async def block_status(
        self,
        *,
        offset: int,
        length: int,
        context: str = BASE_ALLOCATION,
        req_one: bool = False,
        max_extents: int | None = None,
    ) -> list[Extent]:
        """Extents from ``offset`` for one meta context (``status``: its flags or depth).

        One request: the server may describe less than ``length`` (never
        nothing), so the extents cover a prefix of the range; the last one is
        cut at the end of the range. At most ``max_extents`` are returned.
        """
        context_id = self._ready.meta_contexts.get(context)
        if context_id is None:
            raise NBDRequestError(
                Errno.EINVAL, f"meta context {context!r} was not negotiated", command=Command.BLOCK_STATUS
            )
        length = min(length, self._effect_chunk)
        flags = CommandFlag.REQ_ONE if req_one else 0
        reply = await self._request(Command.BLOCK_STATUS, offset, length, flags)
        extents: list[Extent] = []
        pos, end = offset, offset + length
        for extent_length, status in reply.extents[context_id]:
            extents.append(Extent(pos, min(extent_length, end - pos), status))
            pos += extent_length
            if pos >= end or len(extents) == max_extents:
                break
        return extents

    async def extents(
        self,
        *,
        offset: int = 0,
        length: int | None = None,
        context: str = BASE_ALLOCATION,
        max_extents: int | None = None,
    ) -> list[Extent]:
        """Extents covering the whole range (default: to the end of the
        export), asking as often as the server needs.

        With ``max_extents`` the list stops after that many extents, covering
        only a prefix of the range: the caller goes on from where it ends.
        This bounds memory whatever the fragmentation of the export.
        """
        end = self.size if length is None else offset + length
        result: list[Extent] = []
        while offset < end:
            room = None if max_extents is None else max_extents - len(result)
            if room is not None and room <= 0:
                break
            batch = await self.block_status(offset=offset, length=end - offset, context=context, max_extents=room)
            result += batch
            offset = batch[-1].end
        return result

    # -- closing --------------------------------------------------------------------------

    async def close(self) -> None:
        """Wait for requests in flight, send ``NBD_CMD_DISC`` and close."""
        link = self._link
        if not self._closing:
            self._closing = True
            try:
                await asyncio.wait_for(link.idle.wait(), self._options.request_timeout)
            except TimeoutError:
                link.fail(ConnectionLostError("requests were still in flight at close"))
            if link.error is None:
                link.error = NBDConnectionError("the connection was closed")
            link.disconnect()
        await self.wait_closed()

    def abort(self) -> None:
        """Hard disconnect: fail requests in flight and drop the socket."""
        self._closing = True
        self._link.fail(NBDConnectionError("the connection was aborted"))

    async def wait_closed(self) -> None:
        """Wait until the socket is closed."""
        await asyncio.shield(self._link.closed)

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- machinery ------------------------------------------------------------------------

    async def _split(
        self,
        command: Command,
        offset: int,
        length: int,
        chunk: int,
        flags: int = 0,
        *,
        payload: memoryview | None = None,
        into: memoryview | None = None,
    ) -> None:
        if length <= chunk:
            await self._request(command, offset, length, flags, payload=payload, into=into)
            return
        pieces = []
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            piece_payload = payload[start : start + n] if payload is not None else None
            piece_into = into[start : start + n] if into is not None else None
            pieces.append(self._request(command, offset + start, n, flags, payload=piece_payload, into=piece_into))
        await _all(pieces)

    async def _request(
        self,
        command: Command,
        offset: int,
        length: int,
        flags: int = 0,
        *,
        payload: memoryview | None = None,
        into: memoryview | None = None,
    ) -> Reply:
        if offset < 0 or length < 0:
            raise ValueError("offsets and lengths cannot be negative")
        if length == 0 and command not in (Command.FLUSH, Command.BLOCK_STATUS):
            if offset > self.size:
                raise NBDRequestError(Errno.EINVAL, f"offset {offset} is beyond the export size", command=command)
            return Reply(0, command)
        rejection = tx.check_request(tx.Request(0, command, flags, offset, length), self._negotiated)
        if rejection is not None:
            raise NBDRequestError(rejection.errno, rejection.message, command=command)
        link = self._link
        if self._closing and link.error is None:
            raise NBDConnectionError("the connection is closing")
        await link.slots.acquire()
        try:
            link.check()
            while not link.writable.is_set():  # above the write high-water mark
                await link.writable.wait()
                link.check()
            handle = next(self._handles)
            future = link.submit(handle, command, offset, length, flags, payload, into)
        except BaseException:
            link.slots.release()
            raise
        timeout = self._options.request_timeout
        # A bare timer that fails the future costs less per request than asyncio.timeout().
        timer = None if timeout is None else self._loop.call_later(timeout, _expire, future)
        try:
            reply = await future
        except _Expired:
            link.abandon(handle)
            raise NBDTimeoutError(f"{command.name} of {length} bytes at {offset} took over {timeout} s") from None
        except asyncio.CancelledError:
            link.abandon(handle)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if reply.errno:
            raise NBDRequestError(reply.errno, reply.message, command=command, offset=reply.error_offset)
        return reply


class _Expired(Exception):
    """A request's timer went off before its reply came."""


def _expire(future: asyncio.Future[Reply]) -> None:
    if not future.done():
        future.set_exception(_Expired())


async def _all(coroutines: list[Coroutine[Any, Any, Any]]) -> None:
    """Run request pieces concurrently; on failure cancel the rest, raise the first."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except BaseExceptionGroup as failures:
        raise first_error(failures) from None


# -- connecting ------------------------------------------------------------------------------


async def _negotiate(address: NBDAddress, options: ClientOptions, goal: Goal) -> tuple[Link, ClientHandshakeEvent]:
    loop = asyncio.get_running_loop()
    options = with_tls(address, options)
    plan = _tls_plan(address, options)
    handshake = ClientHandshake(
        address.export,
        structured_replies=options.structured_replies,
        meta_contexts=options.meta_contexts,
        request_block_size=options.request_block_size,
        goal=goal,
        tls=TLSMode.REQUIRE if address.tls else TLSMode.OFF,
    )
    link = Link(
        handshake, options.max_in_flight, congestion=options.congestion, socket_buffer=options.socket_buffer, tls=plan
    )
    try:
        async with asyncio.timeout(options.timeout):
            try:
                if address.socket is not None:
                    await loop.create_unix_connection(lambda: link, address.socket)
                else:
                    assert address.host is not None
                    await loop.create_connection(lambda: link, address.host, address.port)
            except OSError as exc:
                raise NBDConnectionError(f"cannot connect to {address.uri}: {exc}") from exc
            event = await link.negotiated
    except TimeoutError:
        link.fail(NBDConnectionError("handshake timed out"))
        await _closed(link)
        raise NBDTimeoutError(f"connecting to {address.uri} took over {options.timeout} s") from None
    except asyncio.CancelledError:
        if link.transport is not None:
            link.transport.abort()
        raise
    except SendenseError:
        await _closed(link)  # the refusal was answered with NBD_OPT_ABORT; let the socket close
        raise
    return link, event


async def _closed(link: Link) -> None:
    """Wait (briefly) until a failed link's socket is closed."""
    if link.transport is not None:
        try:
            await asyncio.wait_for(asyncio.shield(link.closed), 5)
        except TimeoutError:
            link.transport.abort()


async def open_client(address: NBDAddress, options: ClientOptions) -> NBDClient:
    """Connect and negotiate; :func:`connect` is the friendly spelling."""
    link, event = await _negotiate(address, options, Goal.GO)
    assert isinstance(event, Ready)
    return NBDClient(link, event, address, options)


class _Connecting:
    """What :func:`connect` returns: await it, or use it with ``async with``."""

    def __init__(self, address: NBDAddress, options: ClientOptions) -> None:
        self._address = address
        self._options = options
        self._client: NBDClient | None = None

    def __await__(self) -> Generator[Any, None, NBDClient]:
        return open_client(self._address, self._options).__await__()

    async def __aenter__(self) -> NBDClient:
        self._client = await open_client(self._address, self._options)
        return self._client

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._client is not None
        if exc is not None and isinstance(exc, NBDConnectionError):
            self._client.abort()
            await self._client.wait_closed()
        else:
            await self._client.close()


def connect(
    target: str | NBDAddress,
    port: int | None = None,
    export: str | None = None,
    *,
    timeout: float | None = 30.0,
    request_timeout: float | None = None,
    max_in_flight: int = 64,
    structured_replies: bool = True,
    meta_contexts: Iterable[str] = (BASE_ALLOCATION,),
    request_block_size: bool = True,
    congestion: str | None = DEFAULT_CONGESTION,
    socket_buffer: int | None = DEFAULT_SOCKET_BUFFER,
    tls_context: ssl.SSLContext | None = None,
    tls_fingerprint: str | None = None,
) -> _Connecting:
    """Connect to an export: ``await connect(...)`` or ``async with connect(...) as nbd``.

    ``target`` is an NBD URI (``nbd://host:port/export``,
    ``nbd+unix:///export?socket=PATH``), an :class:`NBDAddress`, or a host
    name with ``port`` (default 10809). ``export`` overrides the URI's.
    ``congestion``: the TCP congestion control (None: the system's); ``socket_buffer``: its send and
    receive buffers where autotuning stops short (None: autotuning alone).
    ``tls_context``: for ``nbds://`` URIs, instead of one made from the URI's settings;
    ``tls_fingerprint``: the pin a pinned ``tls_context`` goes with (unless the URI has one).
    """
    options = ClientOptions(
        timeout=timeout,
        request_timeout=request_timeout,
        max_in_flight=max_in_flight,
        structured_replies=structured_replies,
        meta_contexts=tuple(meta_contexts),
        request_block_size=request_block_size,
        congestion=congestion,
        socket_buffer=socket_buffer,
        tls_context=tls_context,
        tls_fingerprint=tls_fingerprint,
    )
    return _Connecting(resolve(target, port, export), options)


async def _ask(
    target: str | NBDAddress, port: int | None, export: str | None, goal: Goal, options: ClientOptions | None
) -> ClientHandshakeEvent:
    link, event = await _negotiate(resolve(target, port, export), options or ClientOptions(), goal)
    await asyncio.shield(link.closed)
    return event


async def list_exports(
    target: str | NBDAddress, port: int | None = None, *, options: ClientOptions | None = None
) -> list[ListedExport]:
    """The exports a server lists (``NBD_OPT_LIST``)."""
    event = await _ask(target, port, None, Goal.LIST, options)
    assert isinstance(event, Listed)
    return list(event.exports)


async def export_info(
    target: str | NBDAddress,
    port: int | None = None,
    export: str | None = None,
    *,
    options: ClientOptions | None = None,
) -> Informed:
    """Describe an export without using it (``NBD_OPT_INFO``, ``NBD_OPT_LIST_META_CONTEXT``).

    ``options.structured_replies`` must stay on to learn the meta contexts.
    """
    event = await _ask(target, port, export, Goal.INFO, options)
    assert isinstance(event, Informed)
    return event
