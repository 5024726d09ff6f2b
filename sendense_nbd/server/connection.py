"""One client connection: sockets in, sans-IO protocol, storage calls out.

Theory of operation:

* The connection is an ``asyncio.BufferedProtocol``. During the handshake
  bytes land in a small scratch buffer and go to
  :class:`~sendense_nbd.protocol.ServerHandshake`; afterwards
  :meth:`get_buffer` hands out the
  :class:`~sendense_nbd.protocol.RequestParser`'s buffers, so WRITE payloads
  are received straight into the buffer that storage writes from.
* Each parsed request waits in a queue until the byte budget (this
  connection's and the server's) can cover it, then runs as a task; storage
  calls run in the server's thread pool. While requests wait, reading is
  paused. A WRITE header waits in the parser, before its payload is
  allocated, while the budget is spent; so clients cannot make the server
  hold more than the budget plus one payload, and small requests (a fresh
  client's READ) are still served meanwhile.
* Memory accounting is leak-proof by construction: ``_held`` is everything
  charged to the budget for this connection, ``_task_held`` the part that
  running tasks give back themselves; whenever the connection ends, at any
  stage, :meth:`connection_lost` gives back the difference (queued
  payloads and a payload still being received).
* Replies go out in completion order. A READ keeps its bytes charged until
  the transport has handed them all to the kernel.
* A watchdog ticks while something can stall: the handshake deadline
  (``handshake_limit``), a WRITE payload or unread replies making no
  progress (``io_timeout``), and, while reading is paused, a peer that hung
  up (the event loop does not watch a paused socket, so it is polled).
* TLS: when the handshake acknowledges ``NBD_OPT_STARTTLS`` reading stops,
  the ACK is flushed and ``loop.start_tls`` wraps the socket; the handshake
  deadline still runs. Afterwards the transport is asyncio's TLS transport,
  which decrypts straight into :meth:`get_buffer`'s buffers; a reply is
  encrypted a piece at a time, so its encrypted copy stays small. A failed
  TLS handshake drops this one client.
* A protocol violation drops this one connection. Storage errors become the
  spec's error replies and the connection carries on.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import select
import socket
import struct
import termios
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from sendense_nbd.errors import DeviceError, ProtocolError
from sendense_nbd.protocol import transmission as tx
from sendense_nbd.protocol.constants import ALLOCATION_DEPTH, BASE_ALLOCATION, MAX_PAYLOAD, Command, CommandFlag
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.protocol.handshake import Aborted, Negotiated, ServerHandshake
from sendense_nbd.protocol.sansio import StartTLS
from sendense_nbd.server.context import AdmitPeer, ConnectionContext
from sendense_nbd.storage.base import BlockDevice
from sendense_nbd.tcp import tune_socket
from sendense_nbd.tls import handshake_error

log = logging.getLogger(__name__)

T = TypeVar("T")

_HANDSHAKE_BUFFER = 16 * 1024
#: Unread option replies after which the handshake stops reading.
_HANDSHAKE_BACKLOG = 64 * 1024
#: Small replies may queue up to this much in the transport before waiting.
_SMALL_BACKLOG = 1024 * 1024
#: Holes shorter than this inside a read are sent as data (fewer chunks).
_MIN_HOLE = 64 * 1024
_SMALL = 64 * 1024
#: Over TLS a reply is encrypted this much at a time, each piece once the socket took the one before.
_TLS_PIECE = 256 * 1024
#: Requests running at once per connection (qemu-nbd allows 16).
MAX_REQUESTS = 128
_HUNG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR


class ServerConnection(asyncio.BufferedProtocol):
    """Serves one client; created by :class:`~sendense_nbd.server.NBDServer` with its context."""

    def __init__(self, context: ConnectionContext) -> None:
        self._context = context
        # Bound once: the request path reads these for every request.
        self._budget = context.budget
        self._buffers = context.buffers
        self._executor = context.executor
        self._admission = context.admission
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._upgrading: asyncio.Task[None] | None = None
        #: Bytes decrypted before ``start_tls`` returned (TLS 1.3 clients send right after their Finished).
        self._early: bytearray | None = None
        self._tls = False
        #: The socket's transport under TLS (it buffers what the TLS transport encrypted).
        self._raw: asyncio.Transport | None = None
        self._fd = -1
        self._handshake: ServerHandshake | None = None
        self._handshake_buffer = bytearray(_HANDSHAKE_BUFFER)
        self._parser: tx.RequestParser | None = None
        self._negotiated: Negotiated | None = None
        #: Why ``admit_peer`` refused this client: its reply goes out, then the connection closes.
        self._refused: str | None = None
        self._device: BlockDevice | None = None
        #: Runs WRITE, WRITE_ZEROES and TRIM: the export's write queue, or the thread pool.
        self._change: Callable[[Callable[[], None]], Awaitable[None]] = self._run
        self._pending: deque[tx.Request] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._held = 0  # request bytes charged to the budget
        self._task_held = 0  # the part of _held that running tasks give back
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._sending = asyncio.Lock()  # over TLS, one reply's pieces at a time
        self._disconnecting = False
        self._wake_scheduled = False
        self._lost = False
        self._closed = asyncio.Event()
        self._watchdog: asyncio.TimerHandle | None = None
        self._started = self._loop.time()
        self._last_received = self._started  # payload progress
        self._unsent = (0, 0, self._started)  # (bytes buffered, TLS pieces written, since when)
        self._pieces = 0  # TLS pieces written: each one only after the socket took the one before
        self.peer = "?"
        self.bytes_read = 0
        self.bytes_written = 0

    # -- asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register with admission (or hang up when too many negotiate) and greet the client."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.peer = str(transport.get_extra_info("peername") or "unix")
        if not self._admission.accept(self):
            transport.abort()
            return
        # Paused as soon as anything is buffered, resumed once it all went out:
        # `_writable` then means "the transport buffer is empty".
        transport.set_write_buffer_limits(high=0, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffer = self._context.socket_buffer  # e.g. BBR, buffers for a long fat link (sendense_nbd.tcp)
                tune_socket(sock, congestion=self._context.congestion, sndbuf=buffer, rcvbuf=buffer)
        self._handshake = ServerHandshake(self._context.catalog, admit=self._admit, tls=self._context.tls)
        transport.write(self._handshake.data_to_send())
        self._arm()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next bytes land: the parser's buffer, or the handshake's scratch buffer."""
        if self._parser is not None:
            return self._parser.get_buffer()
        return memoryview(self._handshake_buffer)

    def buffer_updated(self, nbytes: int) -> None:
        """Feed ``nbytes`` new bytes to the handshake or the parser; a violation drops the client."""
        try:
            if self._parser is not None:
                self._parser.buffer_updated(nbytes)
                if self._parser.receiving_payload:
                    self._last_received = self._loop.time()
                self._pump()
            elif self._handshake is not None:
                self._handshake_received(memoryview(self._handshake_buffer)[:nbytes])
        except ProtocolError as exc:
            log.warning("client %s: %s; dropping the connection", self.peer, exc)
            self._drop()

    def eof_received(self) -> bool:
        """Keep the transport open only while requests sent before ``NBD_CMD_DISC`` complete
        (over TLS the transport closes anyway)."""
        return not self._tls and self._disconnecting and bool(self._pending or self._tasks)

    def connection_lost(self, exc: Exception | None) -> None:
        """Give back every byte still charged and tell admission the connection is gone."""
        self._lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._pending.clear()
        self._budget.cancel_wait(self._wake)
        # Drop the parser (and its payload buffer) now: it and this object form a cycle
        # that only the cyclic garbage collector would free, keeping the memory meanwhile.
        self._parser = self._handshake = None
        self._writable.set()
        try:
            # Queued payloads and a payload still being received: nobody else gives them back.
            self._give(self._held - self._task_held)
        finally:
            self._closed.set()
            self._admission.release(self)

    def pause_writing(self) -> None:
        """The transport buffers data: later replies wait for :meth:`resume_writing`."""
        self._writable.clear()
        self._arm()

    def resume_writing(self) -> None:
        """The transport buffer is empty again (a handshake that stopped reading reads on)."""
        self._writable.set()
        if self._handshake is not None and self._early is None:  # never while TLS is being set up
            self._set_reading(True)

    # -- handshake ---------------------------------------------------------------

    def _admit(self, export: str) -> str | None:
        """Admit a client that picked ``export``, or say why not: first ``admit_peer`` (its refusal ends the
        connection once the reply is out, so a client cannot flood the log with refused options), then the
        server's admission (``--shared``, shutdown)."""
        if self._refused is None and self._context.admit_peer is not None:
            self._refused = self._peer_refusal(self._context.admit_peer, export)
        if self._refused is not None:
            return self._refused
        return self._admission.admit(self)

    def _peer_refusal(self, check: AdmitPeer, export: str) -> str | None:
        """What ``check`` says of this client's certificate (None without TLS) for ``export``, logged once;
        a check that raises refuses the client (logged with its traceback) and the server serves on."""
        transport = self._transport
        certificate = transport.get_extra_info("peercert") if self._tls and transport else None
        try:
            refusal = check(export, certificate)
        except Exception:
            log.exception("refusing client %s: checking its certificate for export %r failed", self.peer, export)
            return "the server could not check this client's certificate; its log says why"
        if refusal is not None:
            log.warning("refusing client %s: %s", self.peer, refusal)
        return refusal

    def _handshake_received(self, data: memoryview) -> None:
        handshake = self._handshake
        assert handshake is not None and self._transport is not None
        if self._early is not None:
            # Reading stopped at STARTTLS, so these bytes came through TLS: keep them for tls_started().
            self._early += data
            if len(self._early) > _HANDSHAKE_BACKLOG:
                self._early = None
                raise ProtocolError("too many options sent during the TLS handshake")
            return
        handshake.receive_data(data)
        self._transport.write(handshake.data_to_send())
        if self._refused is not None:  # admit_peer refused it: the refusal goes out, then the connection ends
            self._transport.close()
            return
        event = handshake.next_event()
        if isinstance(event, Aborted):
            self._transport.close()
        elif isinstance(event, StartTLS):
            self._transport.pause_reading()  # nothing may arrive in plaintext now
            self._early = bytearray()
            self._upgrading = self._loop.create_task(self._start_tls(self._transport, handshake))
        elif isinstance(event, Negotiated):
            self._negotiated = event
            self._device = self._context.devices[event.export.name]
            queue = self._context.write_queues.get(event.export.name)
            if queue is not None:
                self._change = queue.run
            self._parser = tx.RequestParser(allocate=self._allocate_payload, may_allocate=self._room)
            self._handshake = None
            self._handshake_buffer = bytearray()
            self._admission.negotiated(self)
            log.info(
                "client %s: export %r, structured replies %s", self.peer, event.export.name, event.structured_replies
            )
            trailing = handshake.trailing_data()
            if trailing:
                self._parser.receive_data(trailing)
                self._pump()
            else:
                self._update_reading()  # stays paused while the server's budget is spent
        elif self._transport.get_write_buffer_size() > _HANDSHAKE_BACKLOG:
            self._set_reading(False)  # the client does not read its replies: stop answering

    async def _start_tls(self, raw: asyncio.Transport, handshake: ServerHandshake) -> None:
        """Wrap the socket in TLS, then let the handshake read options again."""
        context = self._context.tls_context
        assert context is not None
        limit = self._context.handshake_limit
        try:
            await self._writable.wait()  # the ACK went out (the watchdog bounds this)
            if self._lost or raw.is_closing():
                return
            # What is left of the handshake limit (the watchdog drops the client at the limit anyway).
            left = max(limit - (self._loop.time() - self._started), 0.001) if limit else None
            tls = await self._loop.start_tls(raw, self, context, server_side=True, ssl_handshake_timeout=left)
        except OSError as exc:  # ssl.SSLError too
            self._tls_failed(raw, exc)
            return
        if tls is None:  # this server dropped it meanwhile (the watchdog, a shutdown): already logged
            self._tls_failed(raw, None)
            return
        if self._lost or tls.is_closing():
            return
        self._tls = True
        self._raw, self._transport = raw, tls
        # Paused once anything is buffered, resumed once all went out, as before.
        tls.set_write_buffer_limits(high=1, low=0)
        self._reading_paused = False
        handshake.tls_started()
        ssl_object = tls.get_extra_info("ssl_object")
        log.info("client %s: %s (%s)", self.peer, ssl_object.version(), ssl_object.cipher()[0])
        early, self._early = self._early, None
        if early:
            try:
                self._handshake_received(memoryview(early))
            except ProtocolError as exc:
                log.warning("client %s: %s; dropping the connection", self.peer, exc)
                self._drop()

    def _tls_failed(self, raw: asyncio.Transport, exc: OSError | None) -> None:
        """Log why the TLS handshake failed (unless this side ended it) and drop the client."""
        limit = self._context.handshake_limit
        if exc is None or self._lost:
            pass
        elif limit and (isinstance(exc, TimeoutError) or self._loop.time() - self._started >= limit - 0.05):
            log.warning(
                "client %s: no TLS handshake within the handshake limit of %g s (--handshake-limit); dropping "
                "the connection",
                self.peer,
                limit,
            )
        else:
            log.warning("client %s: %s; dropping the connection", self.peer, handshake_error(exc))
        raw.abort()
        if not self._lost:  # asyncio does not tell the protocol of a failed upgrade
            self.connection_lost(exc)

    # -- transmission ------------------------------------------------------------

    def _pump(self) -> None:
        self._collect()
        self._start_pending()

    def _collect(self) -> None:
        parser = self._parser
        assert parser is not None
        while True:
            event = parser.next_event()
            if isinstance(event, tx.Request):
                self._pending.append(event)
            elif isinstance(event, tx.Disconnect):
                self._disconnecting = True
            else:
                break

    def _room(self, size: int) -> bool:
        """Whether a WRITE payload may be allocated now; otherwise its header waits.

        A connection that holds nothing may always take one payload (the documented
        bound: the budget plus one payload per connection), so clients that stall
        mid-payload never stop the others' writes, only slow them to one at a time.
        """
        budget = self._budget
        return self._held == 0 or (budget.used < budget.total and self._held < budget.per_connection)

    def _allocate_payload(self, size: int) -> bytearray:
        self._charge(size)
        self._last_received = self._loop.time()
        self._arm()
        return self._buffers.acquire(size)

    def _charge(self, cost: int) -> None:
        self._held += cost
        self._budget.take(cost)

    def _give(self, cost: int) -> None:
        self._held -= cost
        self._budget.give(cost)

    def _may_start(self, cost: int) -> bool:
        budget = self._budget
        if budget.admits(self._held, cost):
            return True
        # A connection with nothing running may always make progress: with a
        # small request at once, with a large one while the server has room.
        return not self._tasks and (cost <= _SMALL or budget.used < budget.total)

    def _start_pending(self) -> None:
        parser = self._parser
        if parser is not None and parser.holding and self._room(0):
            try:
                parser.resume()
            except ProtocolError as exc:
                log.warning("client %s: %s; dropping the connection", self.peer, exc)
                self._drop()
                return
            self._collect()
        while self._pending and len(self._tasks) < MAX_REQUESTS:
            request = self._pending[0]
            cost = min(request.length, MAX_PAYLOAD) if request.command == Command.READ else 0
            if cost and not self._may_start(cost):
                break
            self._pending.popleft()
            self._charge(cost)
            owned = cost + (len(request.payload) if request.payload is not None else 0)
            self._task_held += owned
            task = self._loop.create_task(self._serve(request, owned))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._update_reading()

    def _update_reading(self) -> None:
        """Read from the socket only while no request waits. With the budget spent,
        requests still flow (small READs may run), but a WRITE header waits in the
        parser before its payload is allocated."""
        if self._lost or self._parser is None:
            return
        # A payload already allocated is always received: pausing it could wait on itself.
        blocked = (bool(self._pending) or self._parser.holding) and not self._parser.receiving_payload
        if blocked:
            self._budget.wait(self._wake)
        else:
            self._budget.cancel_wait(self._wake)
        self._set_reading(not blocked and not self._disconnecting)
        if self._disconnecting and not self._pending and not self._tasks and self._transport:
            self._transport.close()

    def _wake(self) -> None:
        """Bytes were given back to the budget, maybe by another connection: retry
        in a callback of our own, so that nothing here can break the giver."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._loop.call_soon(self._resume)

    def _resume(self) -> None:
        self._wake_scheduled = False
        if self._transport is not None and not self._transport.is_closing():
            self._start_pending()

    def _set_reading(self, on: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or on != self._reading_paused:
            return
        if on:
            transport.resume_reading()
            self._last_received = self._loop.time()  # a paused payload was not the client's stall
        else:
            transport.pause_reading()
            self._arm()
        self._reading_paused = not on

    # -- watchdog ----------------------------------------------------------------

    def _arm(self) -> None:
        if self._watchdog is None and not self._lost:
            self._watchdog = self._loop.call_later(self._context.tick, self._tick)

    def _tick(self) -> None:
        self._watchdog = None
        transport = self._transport
        if transport is None or self._lost or transport.is_closing() and not self._buffered():
            return
        reason = self._stalled(self._loop.time())
        if reason is not None:
            log.warning("client %s: %s; dropping the connection", self.peer, reason)
            transport.abort()
            return
        if self._reading_paused and not self._disconnecting and self._fd >= 0 and _hung_up(self._fd):
            log.info("client %s hung up while its reading was paused", self.peer)
            self._close_hung_up(transport)
        parser = self._parser
        if (
            self._handshake is not None
            or self._reading_paused
            or self._buffered()
            or (parser is not None and parser.receiving_payload)
        ):
            self._arm()

    def _buffered(self) -> int:
        """Reply bytes asyncio holds: over TLS, in the TLS transport and under it in the socket's."""
        transport, raw = self._transport, self._raw
        assert transport is not None
        return transport.get_write_buffer_size() + (raw.get_write_buffer_size() if raw is not None else 0)

    def _stalled(self, now: float) -> str | None:
        """Why this connection missed a deadline, or None."""
        context, transport = self._context, self._transport
        assert transport is not None
        limit = context.handshake_limit
        if self._handshake is not None and limit and now - self._started > limit:
            return f"no export negotiated within {limit:g} s (--handshake-limit)"
        timeout = context.io_timeout
        if not timeout:
            return None
        buffered = self._buffered()
        # Progress shows in the kernel's send queue first: asyncio's buffer only
        # shrinks when the kernel has room for a large piece.
        unsent = buffered + _send_queue(self._fd) if buffered else 0
        before, pieces, since = self._unsent
        if not unsent or not before or unsent < before or self._pieces != pieces:
            self._unsent = (unsent, self._pieces, now)
        elif now - since > timeout:
            return f"replies unread for {timeout:g} s (--io-timeout)"
        parser = self._parser
        receiving = parser is not None and parser.receiving_payload and not self._reading_paused
        if receiving and now - self._last_received > timeout:
            return f"WRITE payload stalled for {timeout:g} s (--io-timeout)"
        return None

    async def _serve(self, request: tx.Request, owned: int) -> None:
        negotiated = self._negotiated
        assert negotiated is not None
        structured = negotiated.structured_replies
        try:
            rejection = tx.check_request(request, negotiated)
            if rejection is not None:
                reply: Sequence[bytes | bytearray | memoryview] = tx.error_reply(
                    request.handle, rejection.errno, rejection.message, structured
                )
            else:
                try:
                    reply = await self._execute(request, negotiated)
                except DeviceError as exc:
                    log.warning("client %s: %s failed: %s", self.peer, _name(request.command), exc)
                    reply = tx.error_reply(request.handle, exc.errno, str(exc), structured)
            await self._send(reply)
        except Exception:
            log.exception("client %s: internal error serving %s", self.peer, _name(request.command))
            self._drop()
        finally:
            self._tasks.discard(asyncio.current_task())
            if request.payload is not None:
                self._buffers.release(request.payload)
            self._task_held -= owned
            self._give(owned)
            if self._transport is not None and not self._transport.is_closing():
                self._start_pending()

    async def _execute(self, request: tx.Request, negotiated: Negotiated) -> Sequence[bytes | bytearray | memoryview]:
        device = self._device
        assert device is not None
        command, offset, length, flags = request.command, request.offset, request.length, request.flags
        fua = bool(flags & CommandFlag.FUA)
        structured = negotiated.structured_replies
        handle = request.handle
        if command == Command.READ:
            sparse = structured and not flags & CommandFlag.DF and device.capabilities.can_extents
            buffer = self._buffers.acquire(length)
            segments = _read(device, offset, buffer, sparse, cached=True)  # page cache hit: no thread hop
            if segments is None:
                segments = await self._run(_read_blocking, device, offset, buffer, sparse)
            self.bytes_read += length
            await self._send(tx.read_reply(handle, segments, structured))
            # asyncio copied what the kernel did not take: that copy stays charged until it went out.
            transport = self._transport
            while transport is not None and not transport.is_closing() and transport.get_write_buffer_size():
                await self._writable.wait()
            self._buffers.release(buffer)
            return ()
        if command == Command.WRITE:
            assert request.payload is not None
            if length:
                await self._change(functools.partial(device.write, offset=offset, data=request.payload, fua=fua))
            self.bytes_written += length
        elif command == Command.WRITE_ZEROES:
            if length:
                await self._change(
                    functools.partial(
                        device.zero,
                        offset=offset,
                        length=length,
                        may_trim=not flags & CommandFlag.NO_HOLE,
                        fua=fua,
                        fast=bool(flags & CommandFlag.FAST_ZERO),
                    )
                )
        elif command == Command.TRIM:
            # Advisory, as in qemu-nbd: a device that cannot trim (--discard ignore) succeeds doing nothing,
            # without a thread hop (check_request has refused what lies outside the export).
            if length and device.capabilities.can_trim:
                await self._change(functools.partial(device.trim, offset=offset, length=length, fua=fua))
            elif fua:
                await self._run(device.flush)
        elif command == Command.FLUSH:
            await self._run(device.flush)
        elif command == Command.CACHE:
            await self._run(functools.partial(device.cache, offset=offset, length=length))
        elif command == Command.BLOCK_STATUS:
            per_context = []
            for context_id, name in negotiated.meta_contexts:
                extents = await self._run(_CONTEXTS[name], device, offset, length)
                if flags & CommandFlag.REQ_ONE:
                    first = extents[0]
                    extents = [Extent(first.offset, min(first.length, length), first.status)]
                per_context.append((context_id, extents))
            return tx.block_status_reply(handle, per_context)
        return tx.ok_reply(handle, structured)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(self._executor, fn, *args)

    async def _send(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write a reply. Data replies wait until the transport buffer is empty,
        so the kernel takes them straight from our buffer: once asyncio's own
        buffer holds data, every later write would be copied through it."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._tls:
            await self._send_pieces(transport, buffers)
            return
        if not await self._sendable(transport, large=any(len(buf) >= _SMALL for buf in buffers)):
            return
        small = bytearray()
        for buf in buffers:
            if len(buf) < _SMALL:
                small += buf
                continue
            if small:
                transport.write(small)
                small = bytearray()
            transport.write(buf)
        if small:
            transport.write(small)

    async def _sendable(self, transport: asyncio.Transport, *, large: bool) -> bool:
        """Wait until a reply may be written (a large one: nothing buffered; a small one: less than
        ``_SMALL_BACKLOG``); False when the transport closed meanwhile."""
        while not transport.is_closing() and (
            (large and transport.get_write_buffer_size()) or transport.get_write_buffer_size() > _SMALL_BACKLOG
        ):
            await self._writable.wait()
        return not transport.is_closing()

    async def _send_pieces(
        self, transport: asyncio.Transport, buffers: Sequence[bytes | bytearray | memoryview]
    ) -> None:
        """Encrypt a reply a piece at a time, one reply at a time. The socket's transport stops the TLS
        one while it holds anything, so a piece waits in the TLS buffer until the socket took the one
        before: the encrypted copies stay within two pieces per connection (outside the request
        budget), and in the CPU cache."""
        async with self._sending:
            for batch in _pieces(buffers, _TLS_PIECE):
                if not await self._sendable(transport, large=sum(map(len, batch)) >= _SMALL):
                    return
                transport.writelines(batch)
                self._pieces += 1
                if self._buffered():  # the TLS transport tells of a full socket only when it holds bytes too
                    self._arm()

    def _drop(self) -> None:
        """Hang up after sending whatever replies are already queued."""
        self._pending.clear()
        if self._handshake is not None and self._transport is not None:
            self._transport.write(self._handshake.data_to_send())
        if self._transport is not None:
            self._transport.close()

    def _close_hung_up(self, transport: asyncio.Transport) -> None:
        """Close a connection whose client hung up. Over TLS, abort it: asyncio's TLS transport, told of the
        end of the stream while reading was paused, waits to flush and ignores ``close()``."""
        if self._tls:
            transport.abort()
        else:
            transport.close()

    # -- used by the server --------------------------------------------------

    async def finish(self) -> None:
        """Stop reading, let in-flight requests complete, then close; a client
        that does not take its replies within the I/O timeout is cut off."""
        self._pending.clear()
        self._set_reading(False)
        transport = self._transport
        assert transport is not None
        try:
            async with asyncio.timeout(self._context.io_timeout or None):
                if self._tasks:
                    await asyncio.gather(*self._tasks, return_exceptions=True)
                if self._fd >= 0 and _hung_up(self._fd):
                    self._close_hung_up(transport)
                else:
                    transport.close()
                await self._closed.wait()
        except TimeoutError:
            log.warning("client %s: not finished %g s after shutdown; dropping it", self.peer, self._context.io_timeout)
            transport.abort()
            await self._closed.wait()


def _send_queue(fd: int) -> int:
    """Bytes in the kernel send queue of socket ``fd`` (0 if unknown)."""
    if fd < 0:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]
    except OSError:
        return 0


def _hung_up(fd: int) -> bool:
    """Whether the peer of socket ``fd`` closed or reset it (seen without reading)."""
    poller = select.poll()
    poller.register(fd, _HUNG_UP)
    return any(events & _HUNG_UP for _, events in poller.poll(0))


def _pieces(
    buffers: Sequence[bytes | bytearray | memoryview], size: int
) -> Iterator[list[bytes | bytearray | memoryview]]:
    """``buffers`` regrouped into batches of about ``size`` bytes (no byte copied)."""
    batch: list[bytes | bytearray | memoryview] = []
    held = 0
    for buf in buffers:
        view = memoryview(buf)
        for start in range(0, len(view), size):
            piece = view[start : start + size]
            batch.append(piece)
            held += len(piece)
            if held >= size:
                yield batch
                batch, held = [], 0
    if batch:
        yield batch


def _name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


def _read(
    device: BlockDevice, offset: int, buffer: bytearray, sparse: bool, *, cached: bool = False
) -> list[tx.ReadSegment] | None:
    """Read into ``buffer``, leaving large zero extents out as holes when ``sparse``.

    With ``cached`` it only reads what is in RAM and returns None otherwise.
    """
    length = len(buffer)
    view = memoryview(buffer)
    if not sparse or length < _MIN_HOLE:
        if cached:
            return [tx.Data(offset, view)] if device.read_cached(offset=offset, buffer=view) else None
        device.read_into(offset=offset, buffer=view)
        return [tx.Data(offset, view)]
    plan: list[tuple[bool, int, int]] = []  # (is_hole, offset, length)
    pos, end = offset, offset + length
    while pos < end:
        for extent in device.extents(offset=pos, length=end - pos):
            size = min(extent.length, end - pos)
            hole = extent.zero and size >= _MIN_HOLE
            if plan and plan[-1][0] == hole:
                plan[-1] = (hole, plan[-1][1], plan[-1][2] + size)
            else:
                plan.append((hole, pos, size))
            pos += size
            if pos >= end:
                break
    segments: list[tx.ReadSegment] = []
    for hole, start, size in plan:
        if hole:
            segments.append(tx.Hole(start, size))
        else:
            part = view[start - offset : start - offset + size]
            if cached:
                if not device.read_cached(offset=start, buffer=part):
                    return None
            else:
                device.read_into(offset=start, buffer=part)
            segments.append(tx.Data(start, part))
    return segments


def _read_blocking(device: BlockDevice, offset: int, buffer: bytearray, sparse: bool) -> list[tx.ReadSegment]:
    segments = _read(device, offset, buffer, sparse)
    assert segments is not None
    return segments


def _allocation_depth(device: BlockDevice, offset: int, length: int) -> list[Extent]:
    return device.allocation_depth(offset=offset, length=length)[:1024]


def _allocation(device: BlockDevice, offset: int, length: int) -> list[Extent]:
    return device.extents(offset=offset, length=length)


_CONTEXTS = {BASE_ALLOCATION: _allocation, ALLOCATION_DEPTH: _allocation_depth}
