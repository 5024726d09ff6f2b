"""Server side of the transmission phase, as sans-IO code.

Theory of operation (doc/proto.md, "Transmission" and "Request types"):

* :class:`RequestParser` turns the client's byte stream into
  :class:`Request` and :class:`Disconnect` events. It is written for
  ``asyncio.BufferedProtocol`` but does no I/O itself: :meth:`get_buffer`
  hands out the memory the next bytes should land in (a WRITE payload goes
  straight into its own buffer, with no copy), :meth:`buffer_updated` says
  how much arrived. :meth:`receive_data` is the copying equivalent for
  tests and fuzzers.
* :func:`check_request` applies every rule of the spec's "Error values"
  section in one place, before any storage sees a request.
* The ``*_reply`` functions encode replies: simple replies, or structured
  chunks once structured replies were negotiated. They return lists of
  buffers for ``writelines`` so read data is never copied into a header.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import attrs

from sendense_nbd.errors import LocalProtocolError, ProtocolError
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import (
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.protocol.handshake import Negotiated
from sendense_nbd.protocol.sansio import NEED_DATA, NeedData

_HEADER_SIZE = wire.REQUEST.size
_SCRATCH_SIZE = 64 * 1024


@attrs.frozen(slots=True)
class Request:
    """One transmission request; ``payload`` is set for WRITE only."""

    handle: int
    command: int
    flags: int
    offset: int
    length: int
    payload: bytearray | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(slots=True)
class Disconnect:
    """The client sent ``NBD_CMD_DISC``: finish in-flight work and close."""


TransmissionEvent = NeedData | Request | Disconnect


@attrs.frozen(slots=True)
class Rejection:
    """Why a request must fail, before any storage sees it."""

    errno: Errno
    message: str


class RequestParser:
    """Splits the client's stream into requests.

    ``allocate(size)`` provides the buffer each WRITE payload is received
    into; a server passes its buffer pool so payload memory is reused and
    accounted for. When ``may_allocate(size)`` says no, the parser stops
    before that WRITE header (:attr:`holding`), keeping it and what follows
    in its bounded scratch buffer, until :meth:`resume`.
    """

    def __init__(
        self,
        allocate: Callable[[int], bytearray] = bytearray,
        *,
        may_allocate: Callable[[int], bool] | None = None,
    ) -> None:
        self._allocate = allocate
        self._may_allocate = may_allocate
        #: A WRITE header waits for ``may_allocate``; stop reading until :meth:`resume`.
        self.holding = False
        self._scratch = bytearray(_SCRATCH_SIZE)
        self._scratch_view = memoryview(self._scratch)
        self._scratch_len = 0
        self._header: wire.RequestHeader | None = None
        self._payload: bytearray | None = None
        self._filled = 0
        self._events: deque[TransmissionEvent] = deque()
        self._closed = False

    def get_buffer(self) -> memoryview:
        """Memory the next received bytes should be written into."""
        if self._closed:
            raise LocalProtocolError("the client disconnected")
        if self._payload is not None:
            return memoryview(self._payload)[self._filled :]
        return self._scratch_view[self._scratch_len :]

    @property
    def receiving_payload(self) -> bool:
        """A WRITE payload is partly received (its buffer is already allocated)."""
        return self._payload is not None

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last :meth:`get_buffer`."""
        if self._payload is not None:
            self._filled += nbytes
            if self._filled == len(self._payload):
                self._complete_payload()
                self._parse_scratch()
        else:
            self._scratch_len += nbytes
            self._parse_scratch()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copying variant of get_buffer/buffer_updated."""
        view = memoryview(data).cast("B")
        while view and not self._closed:
            target = self.get_buffer()
            if not target:
                raise LocalProtocolError("the parser is holding a WRITE and its buffer is full")
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def resume(self) -> None:
        """Parse on after :attr:`holding`; ``may_allocate`` is asked again."""
        if self.holding:
            self._parse_scratch()

    def next_event(self) -> TransmissionEvent:
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    def _parse_scratch(self) -> None:
        self.holding = False
        view = self._scratch_view
        pos = 0
        end = self._scratch_len
        while not self._closed and end - pos >= _HEADER_SIZE:
            magic, flags, command, handle, offset, length = wire.REQUEST.unpack_from(view, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"request magic {magic:#x} is wrong")
            if command == Command.WRITE:
                if length > MAX_PAYLOAD:
                    raise ProtocolError(f"write of {length} bytes exceeds the 32 MiB limit")
                if self._may_allocate is not None and not self._may_allocate(length):
                    self.holding = True
                    break
            pos += _HEADER_SIZE
            header = wire.RequestHeader(flags, command, handle, offset, length)
            if command == Command.WRITE:
                self._header = header
                self._payload = self._allocate(length)
                take = min(length, end - pos)
                self._payload[:take] = view[pos : pos + take]
                pos += take
                self._filled = take
                if take < length:
                    break
                self._complete_payload()
            elif command == Command.DISC:
                self._events.append(Disconnect())
                self._closed = True
            else:
                self._events.append(Request(handle, command, flags, offset, length))
        remaining = end - pos
        if remaining and pos:
            view[:remaining] = view[pos:end]
        self._scratch_len = remaining if not self._closed else 0

    def _complete_payload(self) -> None:
        header, payload = self._header, self._payload
        assert header is not None and payload is not None
        self._events.append(Request(header.handle, header.command, header.flags, header.offset, header.length, payload))
        self._header = None
        self._payload = None
        self._filled = 0


_FLAGS_BY_COMMAND: dict[int, CommandFlag] = {
    Command.READ: CommandFlag.FUA | CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.CACHE: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
}

_NEEDS_FLAG: dict[int, TransmissionFlag] = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.CACHE: TransmissionFlag.SEND_CACHE,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}

_FLAG_NEEDS: dict[CommandFlag, TransmissionFlag] = {
    CommandFlag.FUA: TransmissionFlag.SEND_FUA,
    CommandFlag.DF: TransmissionFlag.SEND_DF,
    CommandFlag.FAST_ZERO: TransmissionFlag.SEND_FAST_ZERO,
}

_WRITING = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_RANGED = frozenset(
    {Command.READ, Command.WRITE, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES, Command.BLOCK_STATUS}
)


def check_request(request: Request, negotiated: Negotiated) -> Rejection | None:
    """The spec's error for ``request``, or None if it may proceed."""
    export = negotiated.export
    flags = export.flags
    command = request.command
    allowed = _FLAGS_BY_COMMAND.get(command)
    if allowed is None:
        return Rejection(Errno.EINVAL, f"unknown command {command}")
    if command in _WRITING and flags & TransmissionFlag.READ_ONLY:
        return Rejection(Errno.EPERM, "the export is read-only")
    needed = _NEEDS_FLAG.get(command)
    if needed is not None and not flags & needed:
        return Rejection(Errno.EINVAL, f"{Command(command).name} was not advertised")
    if request.flags & ~int(allowed):
        return Rejection(Errno.EINVAL, f"flags {request.flags:#x} are not valid for {Command(command).name}")
    for flag, required in _FLAG_NEEDS.items():
        if request.flags & flag and not flags & required:
            return Rejection(Errno.EINVAL, f"flag {flag.name} was not advertised")
    if command == Command.BLOCK_STATUS and not negotiated.meta_contexts:
        return Rejection(Errno.EINVAL, "no meta context was negotiated")
    if command in _RANGED:
        end = request.offset + request.length
        if end > export.size:
            errno = Errno.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else Errno.EINVAL
            return Rejection(
                errno, f"request {request.offset}+{request.length} is beyond the export size {export.size}"
            )
        if request.offset % export.min_block or (request.length % export.min_block and end != export.size):
            return Rejection(Errno.EINVAL, f"request is not aligned to {export.min_block} bytes")
        if command == Command.READ and request.length > export.max_block:
            return Rejection(Errno.EINVAL, f"read of {request.length} bytes exceeds the maximum {export.max_block}")
        if command == Command.BLOCK_STATUS and request.length == 0:
            return Rejection(Errno.EINVAL, "block status of zero length")
    return None


# -- replies ------------------------------------------------------------------


@attrs.frozen(slots=True)
class Hole:
    """A run of zeroes inside a read reply, sent as ``OFFSET_HOLE``."""

    offset: int
    length: int


@attrs.frozen(slots=True)
class Data:
    """A run of data inside a read reply, sent as ``OFFSET_DATA``."""

    offset: int
    data: bytes | bytearray | memoryview = attrs.field(repr=False)


ReadSegment = Hole | Data


def ok_reply(handle: int, structured: bool) -> list[bytes]:
    """Success for any command without a payload."""
    if structured:
        return [wire.encode_chunk_header(ReplyFlag.DONE, ReplyType.NONE, handle, 0)]
    return [wire.encode_simple_reply(handle)]


def error_reply(handle: int, errno: int, message: str, structured: bool) -> list[bytes]:
    """An error reply in whichever form the client negotiated."""
    if structured:
        return [wire.encode_error_chunk(handle, errno, message)]
    return [wire.encode_simple_reply(handle, errno)]


def read_reply(handle: int, segments: Sequence[ReadSegment], structured: bool) -> list[bytes | bytearray | memoryview]:
    """A successful read; ``segments`` cover the request in order.

    Simple replies (and structured ones with DF set by the caller passing a
    single :class:`Data`) carry the data in one piece; holes become zeroes.
    """
    out: list[bytes | bytearray | memoryview] = []
    if not structured:
        out.append(wire.encode_simple_reply(handle))
        for segment in segments:
            out.append(segment.data if isinstance(segment, Data) else bytes(segment.length))
        return out
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        flags = ReplyFlag.DONE if i == last else 0
        if isinstance(segment, Data):
            out.append(wire.encode_chunk_header(flags, ReplyType.OFFSET_DATA, handle, 8 + len(segment.data)))
            out.append(wire.U64.pack(segment.offset))
            out.append(segment.data)
        else:
            out.append(wire.encode_chunk_header(flags, ReplyType.OFFSET_HOLE, handle, 12))
            out.append(wire.OFFSET_HOLE_PAYLOAD.pack(segment.offset, segment.length))
    if not segments:
        out.extend(ok_reply(handle, True))
    return out


def block_status_reply(handle: int, per_context: Sequence[tuple[int, Sequence[Extent]]]) -> list[bytes]:
    """One BLOCK_STATUS chunk per ``(context id, extents)``, the last DONE (offsets are implied by the order)."""
    last = len(per_context) - 1
    return [
        wire.encode_block_status_chunk(handle, context_id, ((e.length, e.status) for e in extents), done=i == last)
        for i, (context_id, extents) in enumerate(per_context)
    ]
