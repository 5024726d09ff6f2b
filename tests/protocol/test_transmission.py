"""Unit tests for the transmission phase: RequestParser, check_request, reply encoders."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendense_nbd.errors import LocalProtocolError, ProtocolError
from sendense_nbd.protocol import (
    BASE_ALLOCATION,
    NEED_DATA,
    Command,
    CommandFlag,
    Data,
    Disconnect,
    Errno,
    ExportInfo,
    Hole,
    Negotiated,
    Rejection,
    Request,
    RequestParser,
    TransmissionFlag,
    check_request,
)
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.protocol.transmission import block_status_reply, error_reply, ok_reply, read_reply

REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
CHUNK_MAGIC = 0x668E33EF
MIB32 = 32 * 1024 * 1024
T = TransmissionFlag
F = CommandFlag

# Reply chunk types, from the spec.
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE, TYPE_BLOCK_STATUS, TYPE_ERROR = 0, 1, 2, 5, (1 << 15) | 1


def encode(command: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, handle, offset, length) + payload


def drain(parser: RequestParser) -> list[object]:
    out = []
    while (event := parser.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def feed_with_buffers(parser: RequestParser, data: bytes, sizes: Sequence[int]) -> None:
    """Feed ``data`` through get_buffer/buffer_updated, at most ``sizes[i]`` per read."""
    pos = 0
    i = 0
    while pos < len(data):
        buf = parser.get_buffer()
        want = sizes[i % len(sizes)] if sizes else len(data)
        i += 1
        n = min(len(buf), want, len(data) - pos)
        assert n > 0, "get_buffer returned an empty buffer"
        buf[:n] = data[pos : pos + n]
        parser.buffer_updated(n)
        pos += n


def snapshot(items: list[object]) -> list[tuple[object, ...]]:
    """Events with WRITE payloads made comparable (Request ignores payload in ==)."""
    out: list[tuple[object, ...]] = []
    for item in items:
        if isinstance(item, Request):
            payload = None if item.payload is None else bytes(item.payload)
            out.append((item.handle, item.command, item.flags, item.offset, item.length, payload))
        else:
            out.append((item,))
    return out


# -- RequestParser -------------------------------------------------------------------


def test_single_read() -> None:
    parser = RequestParser()
    parser.receive_data(encode(Command.READ, 0xDEADBEEF, 4096, 512, F.FUA))
    [event] = drain(parser)
    assert event == Request(0xDEADBEEF, Command.READ, F.FUA, 4096, 512)
    assert event.payload is None
    assert parser.next_event() is NEED_DATA


def test_write_payload() -> None:
    parser = RequestParser()
    parser.receive_data(encode(Command.WRITE, 1, 512, 5, payload=b"hello"))
    [event] = drain(parser)
    assert event == Request(1, Command.WRITE, 0, 512, 5)
    assert bytes(event.payload) == b"hello"


def test_empty_write() -> None:
    parser = RequestParser()
    parser.receive_data(encode(Command.WRITE, 1, 0, 0) + encode(Command.FLUSH, 2))
    assert snapshot(drain(parser)) == [(1, 1, 0, 0, 0, b""), (2, 3, 0, 0, 0, None)]


def test_partial_header_waits() -> None:
    parser = RequestParser()
    data = encode(Command.READ, 1, 0, 512)
    parser.receive_data(data[:27])
    assert parser.next_event() is NEED_DATA
    parser.receive_data(data[27:])
    assert drain(parser) == [Request(1, Command.READ, 0, 0, 512)]


def test_write_payload_lands_in_its_own_buffer() -> None:
    parser = RequestParser()
    parser.receive_data(encode(Command.WRITE, 7, 0, 100))
    assert parser.next_event() is NEED_DATA
    buf = parser.get_buffer()
    assert len(buf) == 100  # exactly the payload: no copy through a scratch buffer
    buf[:60] = b"a" * 60
    parser.buffer_updated(60)
    assert parser.next_event() is NEED_DATA
    buf = parser.get_buffer()
    assert len(buf) == 40
    buf[:] = b"b" * 40
    parser.buffer_updated(40)
    [event] = drain(parser)
    assert bytes(event.payload) == b"a" * 60 + b"b" * 40
    # Afterwards the next header goes to the scratch buffer again.
    assert len(parser.get_buffer()) >= 28


def test_write_header_waits_until_may_allocate_agrees() -> None:
    room = [False]
    asked: list[int] = []

    def may_allocate(size: int) -> bool:
        asked.append(size)
        return room[0]

    allocated: list[int] = []

    def allocate(size: int) -> bytearray:
        allocated.append(size)
        return bytearray(size)

    parser = RequestParser(allocate, may_allocate=may_allocate)
    stream = encode(Command.READ, 1, 0, 512) + encode(Command.WRITE, 2, 0, 5, payload=b"hello")
    stream += encode(Command.FLUSH, 3)
    feed_with_buffers(parser, stream, [1000])
    # The READ before it goes through; the WRITE header and what follows wait unallocated.
    assert drain(parser) == [Request(1, Command.READ, 0, 0, 512)]
    assert parser.holding and asked == [5] and allocated == []
    parser.resume()  # still no room
    assert parser.holding and drain(parser) == [] and allocated == []
    room[0] = True
    parser.resume()
    assert not parser.holding and allocated == [5]
    assert snapshot(drain(parser)) == [(2, 1, 0, 0, 5, b"hello"), (3, 3, 0, 0, 0, None)]


def test_a_held_write_keeps_the_stream_in_sync_across_reads() -> None:
    room = [False]
    parser = RequestParser(may_allocate=lambda size: room[0])
    stream = encode(Command.WRITE, 1, 0, 3, payload=b"abc") + encode(Command.READ, 2, 0, 9)
    feed_with_buffers(parser, stream[:20], [20])
    assert not parser.holding  # the header is not complete yet
    feed_with_buffers(parser, stream[20:], [7])
    assert parser.holding
    room[0] = True
    parser.resume()
    assert snapshot(drain(parser)) == [(1, 1, 0, 0, 3, b"abc"), (2, 0, 0, 0, 9, None)]


def test_write_payloads_are_not_overwritten_by_later_data() -> None:
    parser = RequestParser()
    parser.receive_data(encode(Command.WRITE, 1, 0, 4, payload=b"1111"))
    parser.receive_data(encode(Command.WRITE, 2, 0, 4, payload=b"2222") + encode(Command.READ, 3, 0, 4))
    parser.receive_data(encode(Command.WRITE, 4, 0, 70000, payload=b"4" * 70000))
    assert snapshot(drain(parser)) == [
        (1, 1, 0, 0, 4, b"1111"),
        (2, 1, 0, 0, 4, b"2222"),
        (3, 0, 0, 0, 4, None),
        (4, 1, 0, 0, 70000, b"4" * 70000),
    ]


def test_many_requests_beyond_scratch_size() -> None:
    stream = b"".join(encode(Command.FLUSH, h) for h in range(5000))  # 140 kB > 64 KiB scratch
    parser = RequestParser()
    parser.receive_data(stream)
    assert [e.handle for e in drain(parser)] == list(range(5000))
    other = RequestParser()
    feed_with_buffers(other, stream, [100_000])
    assert [e.handle for e in drain(other)] == list(range(5000))


def test_disc() -> None:
    parser = RequestParser()
    parser.receive_data(encode(Command.READ, 1, 0, 512) + encode(Command.DISC, 2) + b"garbage after disc")
    assert drain(parser) == [Request(1, Command.READ, 0, 0, 512), Disconnect()]
    # Nothing after DISC is parsed; more bytes are ignored, not an error.
    parser.receive_data(b"more garbage")
    assert parser.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        parser.get_buffer()


def test_disc_through_get_buffer() -> None:
    parser = RequestParser()
    feed_with_buffers(parser, encode(Command.DISC, 9), [5])
    assert drain(parser) == [Disconnect()]


@given(magic=st.integers(0, 0xFFFFFFFF).filter(lambda m: m != REQUEST_MAGIC))
def test_bad_magic(magic: int) -> None:
    parser = RequestParser()
    with pytest.raises(ProtocolError):
        parser.receive_data(struct.pack(">IHHQQI", magic, 0, 0, 1, 0, 512))


def test_bad_magic_after_write_payload() -> None:
    parser = RequestParser()
    data = encode(Command.WRITE, 1, 0, 3, payload=b"abc") + b"\x00" * 28
    with pytest.raises(ProtocolError):
        parser.receive_data(data)


def test_write_over_32_mib() -> None:
    parser = RequestParser()
    with pytest.raises(ProtocolError):
        parser.receive_data(encode(Command.WRITE, 1, 0, MIB32 + 1))
    with pytest.raises(ProtocolError):
        RequestParser().receive_data(encode(Command.WRITE, 1, 0, 0xFFFFFFFF))


def test_write_of_32_mib_is_accepted() -> None:
    parser = RequestParser()
    parser.receive_data(encode(Command.WRITE, 1, 0, MIB32))
    assert len(parser.get_buffer()) == MIB32


def test_large_non_write_lengths_are_not_payloads() -> None:
    parser = RequestParser()
    parser.receive_data(
        encode(Command.READ, 1, 0, 0xFFFFFFFF)
        + encode(Command.TRIM, 2, 0, 0xFFFFFFFF)
        + encode(Command.WRITE_ZEROES, 3, 0, 0xFFFFFFFF)
        + encode(0x4242, 4, 5, 6, 7)
    )
    assert drain(parser) == [
        Request(1, 0, 0, 0, 0xFFFFFFFF),
        Request(2, 4, 0, 0, 0xFFFFFFFF),
        Request(3, 6, 0, 0, 0xFFFFFFFF),
        Request(4, 0x4242, 7, 5, 6),
    ]


request_strategy = st.one_of(
    st.tuples(
        st.sampled_from([0, 3, 4, 5, 6, 7, 0x4242]),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 0xFFFF),
        st.none(),
    ),
    st.tuples(
        st.just(1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.none(),
        st.integers(0, 0xFFFF),
        st.binary(max_size=300),
    ),
)


def build_stream(requests: list[tuple], disc: bool) -> tuple[bytes, list[tuple[object, ...]]]:
    stream = bytearray()
    expected: list[tuple[object, ...]] = []
    for command, handle, offset, length, flags, payload in requests:
        if payload is not None:
            length = len(payload)
        stream += encode(command, handle, offset, length, flags, payload or b"")
        expected.append((handle, command, flags, offset, length, None if payload is None else bytes(payload)))
    if disc:
        stream += encode(Command.DISC, 0xD15C)
        expected.append((Disconnect(),))
    return bytes(stream), expected


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(request_strategy, max_size=12),
    disc=st.booleans(),
    cuts=st.lists(st.integers(0, 4000), max_size=30),
)
def test_split_stream_yields_identical_requests(requests: list[tuple], disc: bool, cuts: list[int]) -> None:
    stream, expected = build_stream(requests, disc)
    whole = RequestParser()
    whole.receive_data(stream)
    assert snapshot(drain(whole)) == expected

    points = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    split = RequestParser()
    seen: list[object] = []
    for a, b in zip(points, points[1:]):
        split.receive_data(stream[a:b])
        seen += drain(split)
    assert snapshot(seen) == expected


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(request_strategy, max_size=12),
    disc=st.booleans(),
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=10),
)
def test_get_buffer_path_equals_receive_data(requests: list[tuple], disc: bool, sizes: list[int]) -> None:
    stream, expected = build_stream(requests, disc)
    parser = RequestParser()
    feed_with_buffers(parser, stream, sizes)
    assert snapshot(drain(parser)) == expected


def test_one_byte_at_a_time() -> None:
    stream, expected = build_stream(
        [(1, 1, 0, None, 1, b"x" * 77), (0, 2, 512, 512, 4, None), (1, 3, 9, None, 0, b"")], True
    )
    parser = RequestParser()
    for i in range(len(stream)):
        parser.receive_data(stream[i : i + 1])
    assert snapshot(drain(parser)) == expected
    other = RequestParser()
    feed_with_buffers(other, stream, [1])
    assert snapshot(drain(other)) == expected


# -- check_request ------------------------------------------------------------------------

ALL_FLAGS = (
    T.HAS_FLAGS
    | T.SEND_FLUSH
    | T.SEND_FUA
    | T.SEND_TRIM
    | T.SEND_WRITE_ZEROES
    | T.SEND_DF
    | T.SEND_CACHE
    | T.SEND_FAST_ZERO
)
SIZE = 1 << 20
CONTEXTS = ((1, BASE_ALLOCATION),)


def negotiated(
    flags: int = ALL_FLAGS,
    size: int = SIZE,
    min_block: int = 1,
    max_block: int = MIB32,
    meta: tuple[tuple[int, str], ...] = CONTEXTS,
) -> Negotiated:
    export = ExportInfo(
        name="disk",
        size=size,
        flags=T(flags),
        min_block=min_block,
        preferred_block=max(4096, min_block),
        max_block=max_block,
        meta_contexts=(BASE_ALLOCATION,),
    )
    return Negotiated(export, True, meta)


def req(command: int, offset: int = 0, length: int = 512, flags: int = 0) -> Request:
    if command == Command.FLUSH:
        offset = length = 0
    return Request(1, command, flags, offset, length)


def errno(request: Request, n: Negotiated | None = None) -> Errno | None:
    result = check_request(request, n or negotiated())
    if result is None:
        return None
    assert isinstance(result, Rejection)
    assert result.message
    return result.errno


COMMANDS = [
    Command.READ,
    Command.WRITE,
    Command.FLUSH,
    Command.TRIM,
    Command.CACHE,
    Command.WRITE_ZEROES,
    Command.BLOCK_STATUS,
]
# Which command flags the spec documents for which command.
VALID_FLAGS = {
    Command.READ: F.FUA | F.DF,
    Command.WRITE: F.FUA,
    Command.FLUSH: F.FUA,
    Command.TRIM: F.FUA,
    Command.CACHE: F.FUA,
    Command.WRITE_ZEROES: F.FUA | F.NO_HOLE | F.FAST_ZERO,
    Command.BLOCK_STATUS: F.FUA | F.REQ_ONE,
}


@pytest.mark.parametrize("command", COMMANDS)
def test_valid_request_passes(command: int) -> None:
    assert check_request(req(command), negotiated()) is None


@pytest.mark.parametrize("command", [Command.DISC, 8, 9, 0x4242, 0xFFFF])
def test_unknown_command(command: int) -> None:
    assert errno(req(command)) == Errno.EINVAL


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (Command.FLUSH, T.SEND_FLUSH),
        (Command.TRIM, T.SEND_TRIM),
        (Command.CACHE, T.SEND_CACHE),
        (Command.WRITE_ZEROES, T.SEND_WRITE_ZEROES),
    ],
)
def test_unadvertised_command(command: int, flag: int) -> None:
    assert errno(req(command), negotiated(ALL_FLAGS & ~flag)) == Errno.EINVAL
    assert errno(req(command), negotiated(ALL_FLAGS)) is None


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bit", range(5))
def test_documented_flags_per_command(command: int, bit: int) -> None:
    flag = 1 << bit
    expected = None if flag & VALID_FLAGS[command] else Errno.EINVAL
    assert errno(req(command, flags=flag)) == expected


def test_unknown_command_flags_are_einval() -> None:
    """Spec, "Error values": the server SHOULD return NBD_EINVAL if it receives
    an unknown command flag (bits 5..15 are not defined)."""
    accepted = [
        (Command(command).name, hex(1 << bit))
        for command in COMMANDS
        for bit in range(5, 16)
        if errno(req(command, flags=1 << bit)) != Errno.EINVAL
    ]
    assert accepted == []


@pytest.mark.parametrize(
    ("command", "flag", "needs"),
    [
        (Command.WRITE, F.FUA, T.SEND_FUA),
        (Command.READ, F.FUA, T.SEND_FUA),
        (Command.FLUSH, F.FUA, T.SEND_FUA),
        (Command.READ, F.DF, T.SEND_DF),
        (Command.WRITE_ZEROES, F.FAST_ZERO, T.SEND_FAST_ZERO),
    ],
)
def test_unadvertised_flags(command: int, flag: int, needs: int) -> None:
    assert errno(req(command, flags=flag), negotiated(ALL_FLAGS & ~needs)) == Errno.EINVAL
    assert errno(req(command, flags=flag), negotiated(ALL_FLAGS)) is None


def test_no_hole_does_not_need_send_trim() -> None:
    assert errno(req(Command.WRITE_ZEROES, flags=F.NO_HOLE), negotiated(ALL_FLAGS & ~T.SEND_TRIM)) is None


def test_block_status_needs_meta_contexts() -> None:
    assert errno(req(Command.BLOCK_STATUS), negotiated(meta=())) == Errno.EINVAL
    assert errno(req(Command.BLOCK_STATUS), negotiated(meta=CONTEXTS)) is None


@pytest.mark.parametrize("command", [Command.WRITE, Command.TRIM, Command.WRITE_ZEROES])
def test_read_only_rejects_writes(command: int) -> None:
    assert errno(req(command), negotiated(ALL_FLAGS | T.READ_ONLY)) == Errno.EPERM


@pytest.mark.parametrize("command", [Command.READ, Command.FLUSH, Command.CACHE, Command.BLOCK_STATUS])
def test_read_only_allows_reads(command: int) -> None:
    assert errno(req(command), negotiated(ALL_FLAGS | T.READ_ONLY)) is None


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (Command.WRITE, Errno.ENOSPC),
        (Command.WRITE_ZEROES, Errno.ENOSPC),
        (Command.READ, Errno.EINVAL),
        (Command.TRIM, Errno.EINVAL),
        (Command.CACHE, Errno.EINVAL),
        (Command.BLOCK_STATUS, Errno.EINVAL),
    ],
)
def test_beyond_the_end(command: int, expected: Errno) -> None:
    assert errno(req(command, SIZE - 512, 1024)) == expected
    assert errno(req(command, SIZE, 512)) == expected
    assert errno(req(command, 2**64 - 1, 512)) == expected
    assert errno(req(command, SIZE - 512, 512)) is None  # exactly up to the end


@pytest.mark.parametrize("command", [Command.READ, Command.WRITE, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES])
def test_alignment(command: int) -> None:
    n = negotiated(min_block=512)
    assert errno(req(command, 512, 1024), n) is None
    assert errno(req(command, 1, 512), n) == Errno.EINVAL
    assert errno(req(command, 512, 100), n) == Errno.EINVAL
    assert errno(req(command, 256, 256), n) == Errno.EINVAL
    assert errno(req(command, 1, 1), negotiated(min_block=1)) is None


def test_alignment_block_status() -> None:
    n = negotiated(min_block=512)
    assert errno(req(Command.BLOCK_STATUS, 0, 4096), n) is None
    assert errno(req(Command.BLOCK_STATUS, 100, 4096), n) == Errno.EINVAL


def test_alignment_final_partial_block() -> None:
    # An export whose size is not a multiple of min_block: the tail is reachable.
    n = negotiated(size=4096 + 100, min_block=512)
    assert errno(req(Command.READ, 4096, 100), n) is None
    assert errno(req(Command.WRITE, 3584, 612), n) is None
    assert errno(req(Command.READ, 4096, 50), n) == Errno.EINVAL


def test_unaligned_offset_is_rejected_even_when_ending_at_the_end() -> None:
    """Spec, "Size constraints": offset and length MUST be multiples of the
    minimum block size and the server SHOULD report NBD_EINVAL otherwise. Only
    the length of a request reaching an unaligned export end can be short."""
    n = negotiated(size=SIZE, min_block=512)
    assert errno(req(Command.READ, SIZE - 511, 511), n) == Errno.EINVAL
    assert errno(req(Command.WRITE, 1, SIZE - 1), n) == Errno.EINVAL
    odd = negotiated(size=4096 + 100, min_block=512)
    assert errno(req(Command.READ, 4096 + 50, 50), odd) == Errno.EINVAL


def test_read_over_max_block() -> None:
    n = negotiated(max_block=65536)
    assert errno(req(Command.READ, 0, 65536), n) is None
    assert errno(req(Command.READ, 0, 65536 + 512), n) == Errno.EINVAL
    # Commands without a payload may exceed the maximum payload size.
    assert errno(req(Command.TRIM, 0, 1 << 19), n) is None
    assert errno(req(Command.WRITE_ZEROES, 0, 1 << 19), n) is None
    assert errno(req(Command.BLOCK_STATUS, 0, 1 << 19), n) is None


def test_zero_length_block_status() -> None:
    assert errno(req(Command.BLOCK_STATUS, 0, 0)) == Errno.EINVAL
    assert errno(req(Command.BLOCK_STATUS, 0, 1)) is None


# -- reply encoders -----------------------------------------------------------------------------


def test_ok_reply() -> None:
    assert b"".join(ok_reply(0x1234, False)) == struct.pack(">IIQ", SIMPLE_MAGIC, 0, 0x1234)
    assert b"".join(ok_reply(0x1234, True)) == struct.pack(">IHHQI", CHUNK_MAGIC, 1, TYPE_NONE, 0x1234, 0)


def test_error_reply_simple() -> None:
    assert b"".join(error_reply(7, Errno.EIO, "broken", False)) == struct.pack(">IIQ", SIMPLE_MAGIC, 5, 7)


def parse_chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split structured reply bytes into (flags, type, handle, payload)."""
    chunks = []
    pos = 0
    while pos < len(data):
        magic, flags, type_, handle, length = struct.unpack_from(">IHHQI", data, pos)
        assert magic == CHUNK_MAGIC
        pos += 20
        payload = data[pos : pos + length]
        assert len(payload) == length
        pos += length
        chunks.append((flags, type_, handle, payload))
    return chunks


def test_error_reply_structured() -> None:
    [(flags, type_, handle, payload)] = parse_chunks(b"".join(error_reply(7, Errno.ENOSPC, "full", True)))
    assert (flags, type_, handle) == (1, TYPE_ERROR, 7)
    assert payload == struct.pack(">IH", 28, 4) + b"full"


@pytest.mark.parametrize("message", ["x" * 5000, "a" + "é" * 3000, "€" * 2000])
def test_error_reply_long_message_stays_a_valid_string(message: str) -> None:
    """The message is a string: UTF-8 and at most 4096 bytes (spec: Conventions,
    NBD_REPLY_TYPE_ERROR). Truncation must not cut a UTF-8 sequence in half."""
    [(flags, type_, _, payload)] = parse_chunks(b"".join(error_reply(7, Errno.EIO, message, True)))
    error, length = struct.unpack(">IH", payload[:6])
    assert error == 5
    assert length == len(payload) - 6
    assert length <= 4096
    text = payload[6:].decode()  # must be valid UTF-8
    assert message.startswith(text)


def test_read_reply_simple() -> None:
    segments = [Data(0, b"abc"), Hole(3, 5), Data(8, bytearray(b"xy"))]
    out = read_reply(42, segments, False)
    assert b"".join(out) == struct.pack(">IIQ", SIMPLE_MAGIC, 0, 42) + b"abc" + bytes(5) + b"xy"


def test_read_reply_structured_exact() -> None:
    out = b"".join(read_reply(42, [Data(4096, b"abc"), Hole(4099, 5)], True))
    assert out == (
        struct.pack(">IHHQI", CHUNK_MAGIC, 0, TYPE_OFFSET_DATA, 42, 11)
        + struct.pack(">Q", 4096)
        + b"abc"
        + struct.pack(">IHHQI", CHUNK_MAGIC, 1, TYPE_OFFSET_HOLE, 42, 12)
        + struct.pack(">QI", 4099, 5)
    )


def test_read_reply_structured_without_segments() -> None:
    assert parse_chunks(b"".join(read_reply(3, [], True))) == [(1, TYPE_NONE, 3, b"")]


segment_plan = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("hole"), st.integers(1, 1 << 20)),
    ),
    min_size=1,
    max_size=10,
)


def make_segments(start: int, plan: list[tuple[str, object]]) -> list[Data | Hole]:
    segments: list[Data | Hole] = []
    offset = start
    for kind, value in plan:
        if kind == "data":
            assert isinstance(value, bytes)
            segments.append(Data(offset, value))
            offset += len(value)
        else:
            assert isinstance(value, int)
            segments.append(Hole(offset, value))
            offset += value
    return segments


@settings(max_examples=100, deadline=None)
@given(handle=st.integers(0, 2**64 - 1), start=st.integers(0, 2**40), plan=segment_plan)
def test_read_reply_structured_decodes_back(handle: int, start: int, plan: list[tuple[str, object]]) -> None:
    segments = make_segments(start, plan)
    chunks = parse_chunks(b"".join(read_reply(handle, segments, True)))
    assert len(chunks) == len(segments)
    for i, ((flags, type_, chunk_handle, payload), segment) in enumerate(zip(chunks, segments)):
        assert chunk_handle == handle
        assert flags == (1 if i == len(segments) - 1 else 0)  # DONE on the last chunk only
        if isinstance(segment, Data):
            assert type_ == TYPE_OFFSET_DATA
            assert struct.unpack(">Q", payload[:8])[0] == segment.offset
            assert payload[8:] == segment.data
        else:
            assert type_ == TYPE_OFFSET_HOLE
            assert payload == struct.pack(">QI", segment.offset, segment.length)


@settings(max_examples=50, deadline=None)
@given(
    handle=st.integers(0, 2**64 - 1),
    plan=segment_plan.map(lambda p: [(k, v if k == "data" else v % 300 + 1) for k, v in p]),
)
def test_read_reply_simple_and_structured_carry_the_same_content(handle: int, plan: list[tuple[str, object]]) -> None:
    segments = make_segments(0, plan)
    simple = b"".join(read_reply(handle, segments, False))
    assert simple[:16] == struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle)
    content = bytearray(len(simple) - 16)
    for flags, type_, _, payload in parse_chunks(b"".join(read_reply(handle, segments, True))):
        (offset,) = struct.unpack(">Q", payload[:8])
        if type_ == TYPE_OFFSET_DATA:
            content[offset : offset + len(payload) - 8] = payload[8:]
        else:
            assert struct.unpack(">I", payload[8:])[0] > 0
    assert bytes(content) == simple[16:]


def test_block_status_reply_layout() -> None:
    chunks = parse_chunks(
        b"".join(block_status_reply(9, [(1, [Extent(0, 4096, 0), Extent(4096, 512, 3)]), (2, [Extent(0, 8192, 1)])]))
    )
    assert chunks == [
        (0, TYPE_BLOCK_STATUS, 9, struct.pack(">I", 1) + struct.pack(">IIII", 4096, 0, 512, 3)),
        (1, TYPE_BLOCK_STATUS, 9, struct.pack(">I", 2) + struct.pack(">II", 8192, 1)),
    ]


def test_block_status_reply_single_context_is_done() -> None:
    [(flags, type_, handle, payload)] = parse_chunks(b"".join(block_status_reply(4, [(1, [Extent(0, 512, 2)])])))
    assert (flags, type_, handle) == (1, TYPE_BLOCK_STATUS, 4)
    assert payload == bytes.fromhex("000000010000020000000002")
