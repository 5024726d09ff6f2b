"""Client side of NBD, as sans-IO code: reassembling the transmission replies.

The handshake before transmission is in :mod:`sendense_nbd.protocol.client`.

Theory of operation (doc/proto.md of NetworkBlockDevice/nbd):
:class:`ReplyParser` splits the transmission stream ("Simple reply message",
"Structured reply chunk message", "Structured reply types"). A simple reply
to a READ carries no length, so the parser must know every request in
flight: the caller :meth:`~ReplyParser.register`\\ s each one, READs with
the buffer their data belongs in. Like the server's ``RequestParser`` it is
shaped for ``asyncio.BufferedProtocol``: :meth:`~ReplyParser.get_buffer`
returns the caller's own read buffer while read data is arriving, so socket
bytes land where they belong with no copy; headers and small chunks go
through a scratch buffer. Each finished request becomes one :class:`Reply`
event. Everything the spec forbids a server to send (bad magic, unknown
cookies, chunks outside the request, an unknown non-error chunk type, ...)
raises :class:`~sendense_nbd.errors.ProtocolError`: the only safe reaction is
a hard disconnect.

A READ's content chunks are tracked as the byte ranges they cover, not as a
byte count: a chunk outside the request, one overlapping an earlier chunk,
or a final chunk that leaves a gap is a protocol error, so a reply can never
pass with some of the buffer left stale. Block status extents are kept as
their wire bytes (:class:`ExtentList`, 8 bytes an extent), so the memory of
one reply is bounded by :data:`MAX_CHUNK`.
"""

from __future__ import annotations

import array
import bisect
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from operator import itemgetter

import attrs

from sendense_nbd.errors import LocalProtocolError, ProtocolError
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import (
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    ReplyFlag,
    ReplyType,
)
from sendense_nbd.protocol.sansio import NEED_DATA, NeedData

#: Longest non-data chunk payload: 2^20 block-status extents, plus room.
MAX_CHUNK = 4 + 8 * (1 << 20) + 4096
#: Most disjoint pieces a READ reply may arrive in before they join up.
MAX_READ_PIECES = 1 << 16
#: Longest error message ("Structured reply types": at most 4096 bytes).
MAX_ERROR_MESSAGE = 4096


class ExtentList:
    """The ``(length, flags)`` descriptors of one BLOCK_STATUS chunk.

    Kept as the chunk's bytes (8 an extent) and decoded while iterating, so
    a reply of 2^20 extents costs 8 MiB, not a million Python tuples.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) % wire.EXTENT.size:
            raise ValueError("extent bytes must be a multiple of 8")
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw) // wire.EXTENT.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return wire.EXTENT.iter_unpack(self._raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExtentList):
            return self._raw == other._raw
        if isinstance(other, (list, tuple)):
            return list(self) == [tuple(e) for e in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ExtentList({list(self)!r})"

    def lengths(self) -> array.array[int]:
        """The extent lengths (one C array, no per-extent objects)."""
        words = array.array("I", self._raw)
        if sys.byteorder == "little":
            words.byteswap()
        return words[0::2]


_SCRATCH_SIZE = 128 * 1024
_ZEROES = memoryview(bytes(1 << 20))


@attrs.frozen(slots=True)
class Reply:
    """A finished request: its error (0 for success) and any block status.

    Read data is not in the event: it was already delivered into the buffer
    given to :meth:`ReplyParser.register`.
    """

    handle: int
    command: int
    #: The NBD error (0: success). Unknown values are kept as sent.
    errno: int = 0
    message: str = ""
    #: Where the error happened, from ``NBD_REPLY_TYPE_ERROR_OFFSET``.
    error_offset: int | None = None
    #: Block status: context id to ``(length, flags)`` extents, as sent.
    extents: Mapping[int, ExtentList] = attrs.field(factory=dict, eq=False, hash=False)

    @property
    def ok(self) -> bool:
        return self.errno == 0


ReplyEvent = NeedData | Reply

_ERROR_OFFSET_COMMANDS = frozenset(
    {Command.READ, Command.WRITE, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES, Command.BLOCK_STATUS}
)
_ERROR_BIT = 1 << 15
_DATA_HEADER = wire.CHUNK_HEADER.size + 8  # chunk header + offset of OFFSET_DATA


@attrs.define(slots=True)
class _InFlight:
    """One registered request (mutable bookkeeping inside the parser)."""

    handle: int
    command: int
    offset: int
    length: int
    flags: int
    view: memoryview | None
    #: Content received, as sorted, disjoint, non-touching [start, end) pieces.
    pieces: list[list[int]] = attrs.field(factory=list)
    errno: int = 0
    message: str = ""
    at: int | None = None
    extents: dict[int, ExtentList] = attrs.field(factory=dict)

    def fail(self, errno: int, message: str, at: int | None = None) -> None:
        if not self.errno:  # the first error is the one reported
            self.errno, self.message, self.at = errno, message, at

    def cover(self, start: int, end: int) -> None:
        """Record content ``[start, end)``; raise if it overlaps earlier content."""
        if start == end:
            return
        pieces = self.pieces
        i = bisect.bisect_right(pieces, start, key=itemgetter(0))
        if (i and pieces[i - 1][1] > start) or (i < len(pieces) and pieces[i][0] < end):
            raise ProtocolError(f"reply content {self.offset + start}+{end - start} overlaps earlier content")
        joins_left = i > 0 and pieces[i - 1][1] == start
        joins_right = i < len(pieces) and pieces[i][0] == end
        if joins_left and joins_right:
            pieces[i - 1][1] = pieces[i][1]
            del pieces[i]
        elif joins_left:
            pieces[i - 1][1] = end
        elif joins_right:
            pieces[i][0] = start
        else:
            if len(pieces) >= MAX_READ_PIECES:
                raise ProtocolError(f"READ reply in over {MAX_READ_PIECES} disjoint pieces")
            pieces.insert(i, [start, end])

    @property
    def complete(self) -> bool:
        """Content covers the whole request, with no gap."""
        return self.pieces == [[0, self.length]] if self.length else not self.pieces

    @property
    def covered(self) -> int:
        return sum(end - start for start, end in self.pieces)


class ReplyParser:
    """Splits the server's transmission stream into :class:`Reply` events.

    ``structured`` says whether structured replies were negotiated;
    ``context_ids`` are the negotiated meta context ids (a successful block
    status reply must have one chunk for each).
    """

    def __init__(self, *, structured: bool, context_ids: Iterable[int] = ()) -> None:
        self._structured = structured
        self._contexts = frozenset(context_ids)
        self._in_flight: dict[int, _InFlight] = {}
        self._scratch = bytearray(_SCRATCH_SIZE)
        self._scratch_view = memoryview(self._scratch)
        self._scratch_len = 0
        self._events: deque[Reply] = deque()
        # Data being received outside the scratch buffer:
        self._target: _InFlight | None = None  # read data into target.view[_pos:_pos+_left]
        self._pos = 0
        self._left = 0
        self._finish_after = False
        self._chunk: tuple[wire.ChunkHeader, bytearray] | None = None  # a big chunk into its own buffer
        self._chunk_filled = 0

    # -- registering requests ----------------------------------------------------

    def register(
        self,
        handle: int,
        command: int,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        buffer: bytearray | memoryview | None = None,
    ) -> None:
        """Expect a reply to this request; a READ's data goes into ``buffer``."""
        if handle in self._in_flight:
            raise LocalProtocolError(f"handle {handle} is already in flight")
        view = None
        if command == Command.READ:
            if buffer is None:
                raise LocalProtocolError("a READ needs a buffer")
            view = memoryview(buffer).cast("B")
            if len(view) != length or view.readonly:
                raise LocalProtocolError("the READ buffer must be writable and exactly the request length")
        self._in_flight[handle] = _InFlight(handle, command, offset, length, flags, view)

    def abandon(self, handle: int) -> None:
        """Stop delivering a READ into its buffer (the caller gave up on it).

        The reply still has to be parsed when it comes; its data now goes
        into a throwaway buffer, so the caller may reuse its own at once.
        """
        pending = self._in_flight.get(handle)
        if pending is not None and pending.view is not None:
            pending.view = memoryview(bytearray(pending.length))

    @property
    def in_flight(self) -> int:
        """Requests registered and not yet answered."""
        return len(self._in_flight)

    # -- receiving -----------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Memory the next received bytes should be written into."""
        if self._target is not None:
            view = self._target.view
            assert view is not None
            return view[self._pos : self._pos + self._left]
        if self._chunk is not None:
            return memoryview(self._chunk[1])[self._chunk_filled :]
        return self._scratch_view[self._scratch_len :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last :meth:`get_buffer`."""
        if self._target is not None:
            self._pos += nbytes
            self._left -= nbytes
            if self._left == 0:
                self._end_data()
                self._parse()
        elif self._chunk is not None:
            self._chunk_filled += nbytes
            info, payload = self._chunk
            if self._chunk_filled == len(payload):
                self._chunk = None
                self._take_chunk(info, memoryview(payload))
                self._parse()
        else:
            self._scratch_len += nbytes
            self._parse()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copying variant of :meth:`get_buffer` / :meth:`buffer_updated`."""
        view = memoryview(data).cast("B")
        while view:
            target = self.get_buffer()
            if not target:
                raise ProtocolError("reply data did not fit the parser")  # pragma: no cover - defensive
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def next_event(self) -> ReplyEvent:
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    # -- parsing ---------------------------------------------------------------------

    def _parse(self) -> None:
        view = self._scratch_view
        pos = 0
        end = self._scratch_len
        try:
            while self._target is None and self._chunk is None and end - pos >= 4:
                (magic,) = wire.U32.unpack_from(view, pos)
                if magic == SIMPLE_REPLY_MAGIC:
                    if end - pos < wire.SIMPLE_REPLY.size:
                        break
                    _, error, handle = wire.SIMPLE_REPLY.unpack_from(view, pos)
                    pos = self._simple(handle, error, view, pos + wire.SIMPLE_REPLY.size, end)
                elif magic == STRUCTURED_REPLY_MAGIC:
                    if not self._structured:
                        raise ProtocolError("structured reply without NBD_OPT_STRUCTURED_REPLY")
                    if end - pos < wire.CHUNK_HEADER.size:
                        break
                    new_pos = self._structured_chunk(view, pos, end)
                    if new_pos == pos:
                        break
                    pos = new_pos
                else:
                    raise ProtocolError(f"reply magic {magic:#x} is wrong")
        finally:
            remaining = end - pos
            if remaining and pos:
                view[:remaining] = view[pos:end]
            self._scratch_len = remaining

    def _lookup(self, handle: int) -> _InFlight:
        pending = self._in_flight.get(handle)
        if pending is None:
            raise ProtocolError(f"reply for unknown handle {handle:#x}")
        return pending

    def _simple(self, handle: int, error: int, view: memoryview, pos: int, end: int) -> int:
        pending = self._lookup(handle)
        if pending.command == Command.READ:
            # With structured replies a simple reply to a READ is forbidden; an
            # error one is still unambiguous (no payload), so only success is refused.
            if self._structured and error == 0:
                raise ProtocolError("simple reply to a READ after structured replies were negotiated")
            if error == 0:
                pending.cover(0, pending.length)
                return self._start_data(pending, 0, pending.length, True, view, pos, end)
        elif pending.command == Command.BLOCK_STATUS and error == 0:
            raise ProtocolError("successful BLOCK_STATUS without a structured reply")
        if error:
            pending.fail(error, "")
        self._complete(pending)
        return pos

    def _structured_chunk(self, view: memoryview, pos: int, end: int) -> int:
        """Parse one chunk starting at ``pos``; return ``pos`` unchanged to wait for more."""
        _, flags, type_, handle, length = wire.CHUNK_HEADER.unpack_from(view, pos)
        pending = self._lookup(handle)
        done = bool(flags & ReplyFlag.DONE)
        if type_ == ReplyType.OFFSET_DATA:
            if pending.command != Command.READ:
                raise ProtocolError("OFFSET_DATA in reply to a request that is not a READ")
            if length < 9:
                raise ProtocolError(f"OFFSET_DATA chunk of length {length}")
            if end - pos < _DATA_HEADER:
                return pos
            (offset,) = wire.U64.unpack_from(view, pos + wire.CHUNK_HEADER.size)
            start = self._claim(pending, offset, length - 8)
            return self._start_data(pending, start, length - 8, done, view, pos + _DATA_HEADER, end)
        if length > MAX_CHUNK:
            raise ProtocolError(f"reply chunk of {length} bytes is too long")
        info = wire.ChunkHeader(flags, type_, handle, length)
        body: int = pos + wire.CHUNK_HEADER.size
        length = int(length)
        if wire.CHUNK_HEADER.size + length > _SCRATCH_SIZE:
            # Too big for the scratch buffer: receive it into its own.
            payload = bytearray(length)
            take = min(length, end - body)
            payload[:take] = view[body : body + take]
            self._chunk, self._chunk_filled = (info, payload), take
            if take == length:
                self._chunk = None
                self._take_chunk(info, memoryview(payload))
            return body + take
        if end - body < length:
            return pos
        self._take_chunk(info, view[body : body + length])
        return body + length

    def _claim(self, pending: _InFlight, offset: int, length: int) -> int:
        """Check that content lies inside the request; return its buffer index."""
        start = offset - pending.offset
        if start < 0 or start + length > pending.length:
            raise ProtocolError(f"reply content {offset}+{length} lies outside the request")
        pending.cover(start, start + length)
        return start

    def _start_data(
        self, pending: _InFlight, start: int, length: int, done: bool, view: memoryview, pos: int, end: int
    ) -> int:
        """Deliver ``length`` bytes of read data at ``start``: what is in the
        scratch buffer now, and direct the rest of it straight into the target."""
        target = pending.view
        assert target is not None
        take = min(length, end - pos)
        target[start : start + take] = view[pos : pos + take]
        self._target, self._pos, self._left, self._finish_after = pending, start + take, length - take, done
        if take == length:
            self._end_data()
        return pos + take

    def _end_data(self) -> None:
        pending = self._target
        assert pending is not None
        self._target = None
        if self._finish_after:
            self._done(pending)

    def _take_chunk(self, info: wire.ChunkHeader, payload: memoryview) -> None:
        pending = self._lookup(info.handle)
        type_ = info.type
        if type_ & _ERROR_BIT:
            self._error_chunk(pending, type_, payload)
        elif type_ == ReplyType.NONE:
            if payload or not info.done:
                raise ProtocolError("NONE chunk must be empty and final")
        elif type_ == ReplyType.OFFSET_HOLE:
            if pending.command != Command.READ or len(payload) != wire.OFFSET_HOLE_PAYLOAD.size:
                raise ProtocolError("malformed or unexpected OFFSET_HOLE chunk")
            offset, size = wire.OFFSET_HOLE_PAYLOAD.unpack(payload)
            if size == 0:
                raise ProtocolError("OFFSET_HOLE of size 0")
            start = self._claim(pending, offset, size)
            assert pending.view is not None
            _zero(pending.view, start, size)
        elif type_ == ReplyType.BLOCK_STATUS:
            self._block_status(pending, payload)
        else:
            raise ProtocolError(f"unknown reply chunk type {type_}")
        if info.done:
            self._done(pending)

    def _error_chunk(self, pending: _InFlight, type_: int, payload: memoryview) -> None:
        if len(payload) < wire.ERROR_PAYLOAD.size:
            raise ProtocolError("error chunk shorter than 6 bytes")
        error, message_length = wire.ERROR_PAYLOAD.unpack_from(payload)
        tail = len(payload) - wire.ERROR_PAYLOAD.size - message_length
        if tail < 0:
            raise ProtocolError("error chunk message is longer than the chunk")
        if message_length > MAX_ERROR_MESSAGE:
            raise ProtocolError(f"error chunk message of {message_length} bytes (the limit is {MAX_ERROR_MESSAGE})")
        message = bytes(payload[wire.ERROR_PAYLOAD.size : wire.ERROR_PAYLOAD.size + message_length]).decode(
            errors="replace"
        )
        at = None
        if type_ == ReplyType.ERROR_OFFSET:
            if tail != 8 or pending.command not in _ERROR_OFFSET_COMMANDS:
                raise ProtocolError("malformed or unexpected ERROR_OFFSET chunk")
            (at,) = wire.U64.unpack_from(payload, len(payload) - 8)
            if not pending.offset <= at < pending.offset + max(pending.length, 1):
                raise ProtocolError(f"error offset {at} lies outside the request")
        elif type_ == ReplyType.ERROR and tail:
            raise ProtocolError("ERROR chunk has trailing bytes")
        if error == 0:
            raise ProtocolError("error chunk with error 0")
        pending.fail(error, message, at)

    def _block_status(self, pending: _InFlight, payload: memoryview) -> None:
        if pending.command != Command.BLOCK_STATUS:
            raise ProtocolError("BLOCK_STATUS chunk in reply to another command")
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise ProtocolError(f"BLOCK_STATUS chunk of length {len(payload)}")
        (context_id,) = wire.U32.unpack_from(payload)
        if context_id not in self._contexts:
            raise ProtocolError(f"BLOCK_STATUS for context {context_id}, which was not negotiated")
        if context_id in pending.extents:
            raise ProtocolError(f"two BLOCK_STATUS chunks for context {context_id}")
        extents = ExtentList(bytes(payload[4:]))
        lengths = extents.lengths()
        if min(lengths) == 0:
            raise ProtocolError("block status extent of length 0")
        if pending.flags & CommandFlag.REQ_ONE:
            if len(extents) != 1 or lengths[0] > pending.length:
                raise ProtocolError("REQ_ONE block status must be one extent within the request")
        elif sum(lengths[:-1]) >= pending.length:
            raise ProtocolError("block status extents run past the request")
        pending.extents[context_id] = extents

    def _done(self, pending: _InFlight) -> None:
        if not pending.errno:
            if pending.command == Command.READ and not pending.complete:
                raise ProtocolError(f"READ reply covered {pending.covered} of {pending.length} bytes")
            if pending.command == Command.BLOCK_STATUS and set(pending.extents) != self._contexts:
                raise ProtocolError("BLOCK_STATUS reply lacks a chunk for a negotiated context")
        self._complete(pending)

    def _complete(self, pending: _InFlight) -> None:
        del self._in_flight[pending.handle]
        self._events.append(
            Reply(pending.handle, pending.command, pending.errno, pending.message, pending.at, pending.extents)
        )


def _zero(view: memoryview, start: int, length: int) -> None:
    end = start + length
    while start < end:
        n = min(end - start, len(_ZEROES))
        view[start : start + n] = _ZEROES[:n]
        start += n
