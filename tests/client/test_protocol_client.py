"""The sans-IO client role: ClientHandshake against ServerHandshake over an
in-memory link, scripted servers for the odd cases, and ReplyParser against
the server-side reply encoders."""

from __future__ import annotations

import struct

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendense_nbd.errors import LocalProtocolError, OptionError, ProtocolError
from sendense_nbd.protocol import (
    BASE_ALLOCATION,
    NEED_DATA,
    ExportInfo,
    Negotiated,
    ServerHandshake,
    TransmissionFlag,
    wire,
)
from sendense_nbd.protocol import transmission as tx
from sendense_nbd.protocol.client import (
    MAX_HANDSHAKE_BYTES,
    MAX_HANDSHAKE_REPLIES,
    MAX_META_CONTEXTS,
    ClientHandshake,
    Goal,
    Informed,
    Listed,
    ListedExport,
    Ready,
)
from sendense_nbd.protocol.constants import (
    ALLOCATION_DEPTH,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
)
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.protocol.replies import MAX_CHUNK, MAX_ERROR_MESSAGE, MAX_READ_PIECES, ExtentList, Reply, ReplyParser

T = TransmissionFlag
FLAGS = T.HAS_FLAGS | T.SEND_FLUSH | T.SEND_FUA | T.SEND_DF | T.SEND_TRIM | T.SEND_WRITE_ZEROES
DISK = ExportInfo(
    name="disk",
    size=1 << 20,
    flags=FLAGS,
    description="the disk",
    min_block=512,
    preferred_block=65536,
    max_block=1 << 20,
    meta_contexts=(BASE_ALLOCATION, ALLOCATION_DEPTH),
)
OTHER = ExportInfo(name="other", size=4096, flags=T.HAS_FLAGS | T.READ_ONLY)
EXPORTS = {"disk": DISK, "other": OTHER, "": DISK}
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def negotiate(
    client: ClientHandshake, server: ServerHandshake, chunk: int | None = None
) -> tuple[object, Negotiated | object]:
    """Pass bytes both ways until the client has an event; ``chunk`` splits deliveries."""
    for _ in range(100):
        data = server.data_to_send()
        for i in range(0, len(data), chunk or max(len(data), 1)):
            client.receive_data(data[i : i + (chunk or len(data))])
        event = client.next_event()
        if event is not NEED_DATA:
            out = client.data_to_send()
            if out and not server.finished:
                server.receive_data(out)
            return event, server.next_event()
        out = client.data_to_send()
        if out:
            server.receive_data(out)
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_go_with_structured_replies_and_meta_contexts(chunk: int | None) -> None:
    client = ClientHandshake("disk", meta_contexts=(BASE_ALLOCATION, ALLOCATION_DEPTH, "nosuch:context"))
    ready, negotiated = negotiate(client, ServerHandshake(EXPORTS), chunk)
    assert isinstance(ready, Ready) and isinstance(negotiated, Negotiated)
    assert ready.used_go and ready.structured_replies
    assert ready.export.size == DISK.size and ready.export.flags == FLAGS
    assert (ready.export.min_block, ready.export.preferred_block, ready.export.max_block) == (512, 65536, 1 << 20)
    assert ready.export.block_sizes_advertised and ready.export.description == "the disk"
    assert dict(ready.meta_contexts) == {name: cid for cid, name in negotiated.meta_contexts}
    assert set(ready.meta_contexts) == {BASE_ALLOCATION, ALLOCATION_DEPTH}
    assert client.finished and client.trailing_data() == b""


def test_default_export_gets_its_canonical_name() -> None:
    ready, _ = negotiate(ClientHandshake(""), ServerHandshake(EXPORTS))
    assert isinstance(ready, Ready) and ready.export.name == "disk"


def test_without_structured_replies_no_contexts_and_no_df() -> None:
    ready, negotiated = negotiate(ClientHandshake("disk", structured_replies=False), ServerHandshake(EXPORTS))
    assert isinstance(ready, Ready) and isinstance(negotiated, Negotiated)
    assert not ready.structured_replies and not negotiated.structured_replies
    assert dict(ready.meta_contexts) == {}
    assert not ready.export.flags & T.SEND_DF


def test_no_block_size_request() -> None:
    ready, _ = negotiate(ClientHandshake("other", request_block_size=False), ServerHandshake(EXPORTS))
    assert isinstance(ready, Ready) and ready.export.flags & T.READ_ONLY


def test_unknown_export_is_a_typed_error_and_aborts_politely() -> None:
    client = ClientHandshake("nosuch")
    with pytest.raises(OptionError) as info:
        negotiate(client, ServerHandshake(EXPORTS))
    assert info.value.unknown_export and info.value.reply == OptionReply.ERR_UNKNOWN
    assert info.value.option == Option.GO and "nosuch" in str(info.value)
    assert not isinstance(info.value, ProtocolError)  # a refusal is the server's right, not a violation
    assert client.data_to_send() == wire.encode_option(Option.ABORT)


def test_policy_refusal_carries_the_server_message() -> None:
    with pytest.raises(OptionError, match="too many clients") as info:
        negotiate(ClientHandshake("disk"), ServerHandshake(EXPORTS, refuse="too many clients"))
    assert info.value.option == Option.GO and info.value.reply == OptionReply.ERR_POLICY


def test_list_exports() -> None:
    listed, _ = negotiate(ClientHandshake(goal=Goal.LIST), ServerHandshake(EXPORTS))
    assert isinstance(listed, Listed)
    assert listed.exports == (ListedExport("disk", "the disk"), ListedExport("other", ""))


def test_info_describes_and_aborts() -> None:
    client = ClientHandshake("disk", goal=Goal.INFO)
    informed, server_event = negotiate(client, ServerHandshake(EXPORTS))
    assert isinstance(informed, Informed)
    assert informed.export.size == DISK.size and informed.meta_contexts == DISK.meta_contexts
    assert type(server_event).__name__ == "Aborted"


# -- scripted servers -------------------------------------------------------------


def greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    return b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", flags)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", 0x3E889045565A9, option, reply, len(data)) + data


def sent_options(data: bytes) -> list[tuple[int, bytes]]:
    """Decode the options a client sent (after its 4 flag bytes)."""
    options, pos = [], 4
    while pos < len(data):
        magic, option, length = struct.unpack_from(">8sII", data, pos)
        assert magic == b"IHAVEOPT"
        options.append((option, data[pos + 16 : pos + 16 + length]))
        pos += 16 + length
    return options


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_go_unsupported_falls_back_to_export_name(no_zeroes: bool) -> None:
    flags = HandshakeFlag.FIXED_NEWSTYLE | (HandshakeFlag.NO_ZEROES if no_zeroes else 0)
    client = ClientHandshake("old")
    client.receive_data(greeting(flags))
    assert client.data_to_send()[:4] == struct.pack(">I", 1 | (2 if no_zeroes else 0))
    unsup = OptionReply.ERR_UNSUP
    client.receive_data(option_reply(Option.STRUCTURED_REPLY, unsup, b"no"))
    # No structured replies: SET_META_CONTEXT is skipped, GO comes next.
    assert [o for o, _ in sent_options(b"\0" * 4 + client.data_to_send())] == [Option.GO]
    client.receive_data(option_reply(Option.GO, unsup))
    assert sent_options(b"\0" * 4 + client.data_to_send()) == [(Option.EXPORT_NAME, b"old")]
    reply = struct.pack(">QH", 12345, T.HAS_FLAGS | T.SEND_FLUSH)
    client.receive_data(reply + (b"" if no_zeroes else bytes(124)) + b"extra")
    ready = client.next_event()
    assert isinstance(ready, Ready) and not ready.used_go and not ready.structured_replies
    assert ready.export.size == 12345 and ready.export.flags == T.HAS_FLAGS | T.SEND_FLUSH
    assert (ready.export.min_block, ready.export.preferred_block, ready.export.max_block) == (1, 4096, 32 << 20)
    assert client.trailing_data() == b"extra"


def test_export_name_hang_up_means_unknown_export() -> None:
    client = ClientHandshake("gone", structured_replies=False)
    client.receive_data(greeting())
    client.receive_data(option_reply(Option.GO, OptionReply.ERR_UNSUP))
    with pytest.raises(OptionError) as info:
        client.receive_eof()
    assert info.value.unknown_export and info.value.reply is None


def test_non_fixed_newstyle_server_gets_export_name_at_once() -> None:
    client = ClientHandshake("x")
    client.receive_data(greeting(0))
    assert client.data_to_send() == struct.pack(">I", 0) + wire.encode_option(Option.EXPORT_NAME, b"x")
    client.receive_data(struct.pack(">QH", 4096, 1) + bytes(124))
    assert isinstance(client.next_event(), Ready)


def test_refused_meta_context_is_tolerated() -> None:
    client = ClientHandshake("x")
    client.receive_data(greeting())
    client.receive_data(option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
    client.receive_data(option_reply(Option.SET_META_CONTEXT, 4, struct.pack(">I", 9) + b"base:allocation"))
    client.receive_data(option_reply(Option.SET_META_CONTEXT, OptionReply.ERR_TOO_BIG))
    client.receive_data(option_reply(Option.GO, OptionReply.INFO, struct.pack(">HQH", 0, 512, 1)))
    client.receive_data(option_reply(Option.GO, OptionReply.INFO, struct.pack(">H", 77) + b"unknown info"))
    client.receive_data(option_reply(Option.GO, OptionReply.ACK))
    ready = client.next_event()
    assert isinstance(ready, Ready) and ready.structured_replies and dict(ready.meta_contexts) == {}


@pytest.mark.parametrize(
    "greeting_bytes, match",
    [
        (b"NBDMAGIC" + struct.pack(">Q", 0x00420281861253), "oldstyle"),
        (b"HTTP/1.1 400 Bad Request\r\n", "not an NBD server"),
        (b"NBDMAGIC" + b"IHAVEOPX", "greeting magic"),
    ],
)
def test_bad_greetings(greeting_bytes: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        ClientHandshake().receive_data(greeting_bytes)


@pytest.mark.parametrize(
    "script, match",
    [
        ([option_reply(Option.GO, OptionReply.ACK)], "reply to option 7 while waiting for 8"),
        ([option_reply(Option.STRUCTURED_REPLY, OptionReply.INFO)], "unexpected"),
        ([option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK, bytes(70000))], "too long"),
        (
            [option_reply(Option.STRUCTURED_REPLY, 0x80000001), option_reply(Option.GO, OptionReply.ACK)],
            "without NBD_INFO_EXPORT",
        ),
        (
            [
                option_reply(Option.STRUCTURED_REPLY, 0x80000001),
                option_reply(Option.GO, OptionReply.INFO, struct.pack(">HIII", 3, 3, 4096, 1 << 20)),
            ],
            "minimum block size 3",
        ),
        (
            [
                option_reply(Option.STRUCTURED_REPLY, 0x80000001),
                option_reply(Option.GO, OptionReply.INFO, struct.pack(">HQ", 0, 1)),
            ],
            "wrong length",
        ),
        (
            [
                option_reply(Option.STRUCTURED_REPLY, 0x80000001),
                option_reply(Option.GO, OptionReply.INFO, struct.pack(">HQH", 0, 1 << 63, 1)),
            ],
            r"export size 9223372036854775808 is over 2\^63 - 1",
        ),
        (
            [
                option_reply(Option.STRUCTURED_REPLY, 0x80000001),
                option_reply(Option.GO, OptionReply.INFO, struct.pack(">HIII", 3, 4096, 512, 1 << 20)),
            ],
            "preferred block size 512 is invalid for minimum 4096",
        ),
        (
            [
                option_reply(Option.STRUCTURED_REPLY, 0x80000001),
                option_reply(Option.GO, OptionReply.INFO, struct.pack(">HIII", 3, 512, 3000, 1 << 20)),
            ],
            "preferred block size 3000",
        ),
        (
            [
                option_reply(Option.STRUCTURED_REPLY, 0x80000001),
                option_reply(Option.GO, OptionReply.INFO, struct.pack(">HIII", 3, 512, 65536, 4096)),
            ],
            "maximum payload 4096 is below the preferred block size 65536",
        ),
        (
            [
                option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK),
                option_reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT, struct.pack(">I", 1) + b"evil:x"),
            ],
            "'evil:x' was not asked for",
        ),
        (
            [
                option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK),
                option_reply(
                    Option.SET_META_CONTEXT, OptionReply.META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"
                ),
                option_reply(
                    Option.SET_META_CONTEXT, OptionReply.META_CONTEXT, struct.pack(">I", 2) + b"base:allocation"
                ),
            ],
            "repeats a name or an id",
        ),
    ],
)
def test_protocol_violations_in_option_replies(script: list[bytes], match: str) -> None:
    client = ClientHandshake("x")
    client.receive_data(greeting())
    with pytest.raises(ProtocolError, match=match):
        for data in script:
            client.receive_data(data)


def test_export_name_reply_with_an_absurd_size() -> None:
    client = ClientHandshake("x")
    client.receive_data(greeting(HandshakeFlag.NO_ZEROES))
    with pytest.raises(ProtocolError, match="over 2\\^63 - 1"):
        client.receive_data(struct.pack(">QH", (1 << 64) - 1, 1))


def structured_client(queries: tuple[str, ...] = (BASE_ALLOCATION, "qemu:dirty-bitmap:")) -> ClientHandshake:
    """A client that sent SET_META_CONTEXT and waits for its replies."""
    client = ClientHandshake("x", meta_contexts=queries)
    client.receive_data(greeting() + option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
    return client


def meta_reply(context_id: int, name: str) -> bytes:
    return option_reply(
        Option.SET_META_CONTEXT, OptionReply.META_CONTEXT, struct.pack(">I", context_id) + name.encode()
    )


def test_endless_meta_contexts_are_refused_after_the_cap() -> None:
    client = structured_client()
    names = (f"qemu:dirty-bitmap:{i:04}" for i in range(10**6))
    with pytest.raises(ProtocolError, match=f"over {MAX_META_CONTEXTS} meta contexts"):
        for i, name in enumerate(names):
            client.receive_data(meta_reply(i + 1, name))
    assert i == MAX_META_CONTEXTS  # noqa: PLW0631 - refused at the first one over the cap


def test_big_meta_context_replies_hit_the_byte_cap_of_the_handshake() -> None:
    client = structured_client()
    names = (f"qemu:dirty-bitmap:{i:04}" + "x" * 4000 for i in range(10**6))
    received = 0
    with pytest.raises(ProtocolError, match=f"over {MAX_HANDSHAKE_BYTES} bytes of option replies"):
        for i, name in enumerate(names):
            data = meta_reply(i + 1, name)
            received += len(data)
            client.receive_data(data)
    assert received <= MAX_HANDSHAKE_BYTES + 5000


def test_a_prefix_query_selects_many_contexts_within_the_cap() -> None:
    client = structured_client()
    client.receive_data(meta_reply(1, BASE_ALLOCATION) + meta_reply(2, "qemu:dirty-bitmap:a"))
    client.receive_data(meta_reply(3, "qemu:dirty-bitmap:b") + option_reply(Option.SET_META_CONTEXT, OptionReply.ACK))
    client.receive_data(option_reply(Option.GO, OptionReply.INFO, struct.pack(">HQH", 0, 4096, 1)))
    client.receive_data(option_reply(Option.GO, OptionReply.ACK))
    ready = client.next_event()
    assert isinstance(ready, Ready)
    assert dict(ready.meta_contexts) == {BASE_ALLOCATION: 1, "qemu:dirty-bitmap:a": 2, "qemu:dirty-bitmap:b": 3}


def test_endless_list_replies_are_refused_after_the_cap() -> None:
    client = ClientHandshake(goal=Goal.LIST)
    client.receive_data(greeting())
    entry = option_reply(Option.LIST, OptionReply.SERVER, struct.pack(">I", 4) + b"disk")
    with pytest.raises(ProtocolError, match=f"over {MAX_HANDSHAKE_REPLIES} option replies"):
        for _ in range(10**6):
            client.receive_data(entry)


def test_eof_during_handshake() -> None:
    client = ClientHandshake()
    client.receive_data(greeting()[:5])
    with pytest.raises(ProtocolError, match="closed the connection"):
        client.receive_eof()


def test_misuse() -> None:
    with pytest.raises(ValueError):
        ClientHandshake("a" * 5000)
    with pytest.raises(LocalProtocolError):
        ClientHandshake().trailing_data()


@FUZZ
@given(data=st.binary(max_size=600), goal=st.sampled_from(list(Goal)))
def test_handshake_fuzz_raises_only_protocol_errors(data: bytes, goal: Goal) -> None:
    client = ClientHandshake("disk", goal=goal)
    try:
        client.receive_data(greeting() + data)
        client.receive_eof()
    except (OptionError, ProtocolError):
        pass


# -- transmission: ReplyParser against the server's encoders ------------------------

CONTEXTS = {1: BASE_ALLOCATION, 2: ALLOCATION_DEPTH}


def events(parser: ReplyParser) -> list[Reply]:
    out = []
    while (event := parser.next_event()) is not NEED_DATA:
        assert isinstance(event, Reply)
        out.append(event)
    return out


def feed(parser: ReplyParser, stream: bytes, sizes: list[int] | None = None) -> None:
    """Deliver ``stream`` through get_buffer/buffer_updated, like a BufferedProtocol."""
    view, i = memoryview(stream), 0
    while view:
        target = parser.get_buffer()
        size = sizes[i % len(sizes)] if sizes else len(view)
        n = min(len(target), len(view), max(size, 1))
        target[:n] = view[:n]
        view = view[n:]
        i += 1
        parser.buffer_updated(n)


def join(parts: list[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def placed(pairs: list[tuple[int, int]]) -> list[Extent]:
    """``(length, status)`` descriptors as the extents a server replies with, from offset 0."""
    out, offset = [], 0
    for length, status in pairs:
        out.append(Extent(offset, length, status))
        offset += length
    return out


def test_simple_read_and_ok() -> None:
    parser = ReplyParser(structured=False)
    buffer = bytearray(8)
    parser.register(1, Command.READ, 100, 8, buffer=buffer)
    parser.register(2, Command.FLUSH, 0, 0)
    parser.register(3, Command.WRITE, 0, 512)
    stream = join(tx.ok_reply(2, False)) + join(tx.read_reply(1, [tx.Data(100, b"abcdefgh")], False))
    stream += join(tx.error_reply(3, Errno.ENOSPC, "full", False))
    parser.receive_data(stream)
    replies = events(parser)
    assert [(r.handle, r.errno) for r in replies] == [(2, 0), (1, 0), (3, Errno.ENOSPC)]
    assert buffer == b"abcdefgh" and parser.in_flight == 0


@pytest.mark.parametrize("structured", [False, True])
def test_simple_read_error_has_no_payload(structured: bool) -> None:
    parser = ReplyParser(structured=structured)
    parser.register(1, Command.READ, 0, 4096, buffer=bytearray(4096))
    parser.register(2, Command.FLUSH, 0, 0)
    parser.receive_data(join(tx.error_reply(1, Errno.EIO, "", False)) + join(tx.ok_reply(2, False)))
    assert [(r.handle, r.errno) for r in events(parser)] == [(1, Errno.EIO), (2, 0)]


def test_structured_error_message_and_offset() -> None:
    parser = ReplyParser(structured=True)
    parser.register(7, Command.WRITE, 4096, 8192)
    payload = struct.pack(">IH", Errno.EIO, 4) + b"oops" + struct.pack(">Q", 8192)
    parser.receive_data(wire.encode_chunk_header(ReplyFlag.DONE, ReplyType.ERROR_OFFSET, 7, len(payload)) + payload)
    (reply,) = events(parser)
    assert (reply.errno, reply.message, reply.error_offset, reply.ok) == (Errno.EIO, "oops", 8192, False)


def test_unknown_error_chunk_type_fails_the_request_only() -> None:
    parser = ReplyParser(structured=True)
    parser.register(1, Command.TRIM, 0, 512)
    payload = struct.pack(">IH", Errno.EPERM, 2) + b"no" + b"future-fields"
    chunk = wire.encode_chunk_header(0, (1 << 15) | 77, 1, len(payload)) + payload
    parser.receive_data(chunk + join(tx.ok_reply(1, True)))
    (reply,) = events(parser)
    assert (reply.errno, reply.message) == (Errno.EPERM, "no")


def test_block_status_per_context() -> None:
    parser = ReplyParser(structured=True, context_ids=CONTEXTS)
    parser.register(5, Command.BLOCK_STATUS, 0, 1 << 20)
    parser.receive_data(
        join(tx.block_status_reply(5, [(2, placed([(1 << 20, 0)])), (1, placed([(4096, 0), (8192, 3)]))]))
    )
    (reply,) = events(parser)
    assert dict(reply.extents) == {1: ((4096, 0), (8192, 3)), 2: ((1 << 20, 0),)}


def test_big_block_status_chunk_beyond_scratch() -> None:
    parser = ReplyParser(structured=True, context_ids=[1])
    extents = [(512, i % 4) for i in range(40000)]
    parser.register(5, Command.BLOCK_STATUS, 0, 512 * 40000)
    feed(parser, join(tx.block_status_reply(5, [(1, placed(extents))])), [1000, 70000, 3])
    (reply,) = events(parser)
    assert list(reply.extents[1]) == extents


@pytest.mark.parametrize("sizes", [None, [1], [13, 4096, 28], [1 << 20]])
def test_read_data_lands_in_the_callers_buffer(sizes: list[int] | None) -> None:
    parser = ReplyParser(structured=True)
    data = bytes(range(256)) * 2048  # 512 KiB
    buffer = bytearray(b"\xff") * (len(data) + 4096)
    parser.register(9, Command.READ, 1 << 30, len(buffer), buffer=buffer)
    segments = [tx.Data(1 << 30, data[:1000]), tx.Hole((1 << 30) + 1000, 4096), tx.Data((1 << 30) + 5096, data[1000:])]
    stream = join(tx.read_reply(9, segments, True))
    # After the chunk header and offset, the buffer handed out is the caller's own.
    head = wire.CHUNK_HEADER.size + 8 + 1000 + wire.CHUNK_HEADER.size + 12 + wire.CHUNK_HEADER.size + 8
    parser.receive_data(stream[:head])
    assert parser.get_buffer().obj is buffer
    feed(parser, stream[head:], sizes)
    (reply,) = events(parser)
    assert reply.ok and buffer == data[:1000] + bytes(4096) + data[1000:]


def test_replies_out_of_order_and_interleaved_chunks() -> None:
    parser = ReplyParser(structured=True)
    a, b = bytearray(1024), bytearray(1024)
    parser.register(1, Command.READ, 0, 1024, buffer=a)
    parser.register(2, Command.READ, 1024, 1024, buffer=b)
    chunks_1 = tx.read_reply(1, [tx.Data(0, b"a" * 512), tx.Data(512, b"A" * 512)], True)
    chunks_2 = tx.read_reply(2, [tx.Hole(1024, 1024)], True)
    stream = join(chunks_1[:3]) + join(chunks_2) + join(chunks_1[3:])
    feed(parser, stream, [5])
    assert [r.handle for r in events(parser)] == [2, 1]
    assert a == b"a" * 512 + b"A" * 512 and b == bytes(1024)


def test_abandoned_read_leaves_the_buffer_alone() -> None:
    parser = ReplyParser(structured=False)
    buffer = bytearray(4096)
    parser.register(1, Command.READ, 0, 4096, buffer=buffer)
    stream = join(tx.read_reply(1, [tx.Data(0, b"x" * 4096)], False))
    parser.receive_data(stream[:100])
    parser.abandon(1)
    parser.receive_data(stream[100:])
    assert events(parser)[0].ok
    assert buffer[: 100 - 16] == b"x" * 84 and buffer[84:] == bytes(4096 - 84)


def test_register_misuse() -> None:
    parser = ReplyParser(structured=True)
    parser.register(1, Command.FLUSH, 0, 0)
    with pytest.raises(LocalProtocolError):
        parser.register(1, Command.FLUSH, 0, 0)
    with pytest.raises(LocalProtocolError):
        parser.register(2, Command.READ, 0, 10)
    with pytest.raises(LocalProtocolError):
        parser.register(2, Command.READ, 0, 10, buffer=bytearray(9))


def chunk(flags: int, type_: int, handle: int, payload: bytes) -> bytes:
    return wire.encode_chunk_header(flags, type_, handle, len(payload)) + payload


DONE = ReplyFlag.DONE


def data_chunk(flags: int, offset: int, length: int, handle: int = 1) -> bytes:
    return chunk(flags, ReplyType.OFFSET_DATA, handle, struct.pack(">Q", offset) + b"\xab" * length)


def hole_chunk(flags: int, offset: int, length: int, handle: int = 1) -> bytes:
    return chunk(flags, ReplyType.OFFSET_HOLE, handle, struct.pack(">QI", offset, length))


@pytest.mark.parametrize(
    "stream, match",
    [
        (wire.encode_simple_reply(99), "unknown handle"),
        (struct.pack(">IIQ", 0x12345678, 0, 1), "magic"),
        (wire.encode_simple_reply(1), "simple reply to a READ"),
        (chunk(DONE, ReplyType.OFFSET_DATA, 1, struct.pack(">Q", 4000) + bytes(200)), "outside the request"),
        (chunk(DONE, ReplyType.OFFSET_DATA, 1, struct.pack(">Q", 0)), "length 8"),
        (chunk(DONE, ReplyType.OFFSET_HOLE, 1, struct.pack(">QI", 0, 0)), "size 0"),
        (chunk(DONE, ReplyType.OFFSET_HOLE, 1, struct.pack(">QI", 0, 2048)), "covered 2048 of 4096"),
        (
            chunk(0, ReplyType.OFFSET_HOLE, 1, struct.pack(">QI", 0, 4096))
            + chunk(DONE, ReplyType.OFFSET_HOLE, 1, struct.pack(">QI", 0, 4096)),
            "overlap",
        ),
        (chunk(0, ReplyType.NONE, 1, b""), "NONE chunk"),
        (chunk(DONE, 42, 1, b""), "unknown reply chunk type 42"),
        (chunk(DONE, ReplyType.BLOCK_STATUS, 1, struct.pack(">III", 1, 512, 0)), "not a READ|another command"),
        (chunk(DONE, ReplyType.BLOCK_STATUS, 2, struct.pack(">III", 3, 512, 0)), "not negotiated"),
        (chunk(DONE, ReplyType.BLOCK_STATUS, 2, struct.pack(">III", 1, 0, 0)), "length 0"),
        (chunk(DONE, ReplyType.BLOCK_STATUS, 2, struct.pack(">IIIII", 1, 8192, 0, 512, 0)), "run past"),
        (chunk(DONE, ReplyType.BLOCK_STATUS, 2, struct.pack(">IIII", 1, 512, 0, 1)), "BLOCK_STATUS chunk of length"),
        (wire.encode_simple_reply(2), "BLOCK_STATUS without a structured reply"),
        (chunk(DONE, ReplyType.ERROR, 3, struct.pack(">IH", 0, 0)), "error 0"),
        (chunk(DONE, ReplyType.ERROR, 3, struct.pack(">IH", 5, 10) + b"abc"), "longer than the chunk"),
        (chunk(DONE, ReplyType.ERROR_OFFSET, 3, struct.pack(">IHQ", 5, 0, 1 << 40)), "outside the request"),
        (chunk(DONE, ReplyType.ERROR_OFFSET, 4, struct.pack(">IHQ", 5, 0, 0)), "ERROR_OFFSET"),
        (chunk(DONE, ReplyType.BLOCK_STATUS, 2, struct.pack(">III", 1, 512, 0)), "lacks a chunk"),
        # Content that adds up to the request but overlaps or leaves a gap:
        (data_chunk(0, 0, 2048) + data_chunk(DONE, 0, 2048), "overlaps earlier content"),
        (hole_chunk(0, 0, 2048) + data_chunk(DONE, 0, 2048), "overlaps earlier content"),
        (data_chunk(0, 2048, 2048) + hole_chunk(DONE, 2048, 2048), "overlaps earlier content"),
        (data_chunk(0, 0, 2048) + data_chunk(0, 1024, 2048) + data_chunk(DONE, 3072, 1024), "overlaps"),
        (data_chunk(0, 0, 1024) + data_chunk(DONE, 2048, 2048), "covered 3072 of 4096"),
        (data_chunk(0, 0, 2048) + chunk(DONE, ReplyType.NONE, 1, b""), "covered 2048 of 4096"),
        (data_chunk(DONE, 4095, 2), "outside the request"),
        (hole_chunk(DONE, (1 << 64) - 4096, 4096), "outside the request"),
        # Replies to handles no longer (or never) in flight:
        (wire.encode_simple_reply(4) + wire.encode_simple_reply(4), "unknown handle 0x4"),
        (chunk(DONE, ReplyType.NONE, 4, b"") + chunk(DONE, ReplyType.NONE, 4, b""), "unknown handle 0x4"),
        # A simple reply to a READ once structured replies were negotiated (the data would be ambiguous):
        (wire.encode_simple_reply(1) + bytes(4096), "simple reply to a READ"),
        (chunk(DONE, ReplyType.OFFSET_DATA, 3, struct.pack(">Q", 0) + bytes(16)), "not a READ"),
        (chunk(DONE, ReplyType.OFFSET_HOLE, 3, struct.pack(">QI", 0, 16)), "unexpected OFFSET_HOLE"),
        (
            chunk(DONE, ReplyType.ERROR, 3, struct.pack(">IH", 5, 5000) + bytes(5000)),
            f"message of 5000 bytes \\(the limit is {MAX_ERROR_MESSAGE}\\)",
        ),
        (chunk(DONE, ReplyType.ERROR, 3, struct.pack(">IH", 5, 0) + bytes(2)), "trailing bytes"),
        (chunk(DONE, ReplyType.OFFSET_DATA, 1, bytes(1 << 16)), "outside the request"),
        (chunk(DONE, 42, 1, bytes(MAX_CHUNK + 1)), "too long"),
        (
            chunk(0, ReplyType.BLOCK_STATUS, 2, struct.pack(">III", 1, 512, 0))
            + chunk(DONE, ReplyType.BLOCK_STATUS, 2, struct.pack(">III", 1, 512, 0)),
            "two BLOCK_STATUS chunks for context 1",
        ),
    ],
)
def test_reply_violations(stream: bytes, match: str) -> None:
    parser = ReplyParser(structured=True, context_ids=CONTEXTS)
    parser.register(1, Command.READ, 0, 4096, buffer=bytearray(4096))
    parser.register(2, Command.BLOCK_STATUS, 0, 4096)
    parser.register(3, Command.WRITE, 0, 4096)
    parser.register(4, Command.FLUSH, 0, 0)
    with pytest.raises(ProtocolError, match=match):
        parser.receive_data(stream)


@st.composite
def read_pieces(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, bool]]]:
    """A request length and content chunks that may overlap, leave gaps or stray outside."""
    length = draw(st.integers(1, 64))
    pieces = draw(
        st.lists(st.tuples(st.integers(-4, length + 4), st.integers(1, length + 4), st.booleans()), max_size=8)
    )
    return length, [(max(0, start), size, hole) for start, size, hole in pieces]


@FUZZ
@given(case=read_pieces(), base=st.sampled_from([0, 1 << 40]))
def test_read_reply_accepted_exactly_when_chunks_tile_the_request(
    case: tuple[int, list[tuple[int, int, bool]]], base: int
) -> None:
    """Never a success with some bytes left unwritten or written twice, whatever the byte sum."""
    length, pieces = case
    parser = ReplyParser(structured=True)
    buffer = bytearray(b"\xee") * length
    parser.register(1, Command.READ, base, length, buffer=buffer)
    stream = b""
    for i, (start, size, hole) in enumerate(pieces):
        flags = DONE if i == len(pieces) - 1 else 0
        stream += (hole_chunk if hole else data_chunk)(flags, base + start, size)
    if not pieces:
        stream = chunk(DONE, ReplyType.NONE, 1, b"")
    covered = [0] * length
    inside = all(start + size <= length for start, size, _ in pieces)
    for start, size, _ in pieces if inside else ():
        for i in range(start, start + size):
            covered[i] += 1
    tiles = inside and covered == [1] * length
    try:
        parser.receive_data(stream)
    except ProtocolError:
        assert not tiles
        return
    assert tiles
    (reply,) = events(parser)
    assert reply.ok
    assert buffer == b"".join(bytes(size) if hole else b"\xab" * size for _, size, hole in sorted(pieces))


def test_read_in_many_disjoint_pieces_is_bounded() -> None:
    parser = ReplyParser(structured=True)
    length = 4 * MAX_READ_PIECES
    parser.register(1, Command.READ, 0, length, buffer=bytearray(length))
    stream = b"".join(data_chunk(0, offset, 1) for offset in range(0, length, 2))
    with pytest.raises(ProtocolError, match="disjoint pieces"):
        parser.receive_data(stream)


def test_out_of_order_pieces_join_up() -> None:
    parser = ReplyParser(structured=True)
    buffer = bytearray(8)
    parser.register(1, Command.READ, 0, 8, buffer=buffer)
    order = [6, 0, 4, 2, 1, 7, 3]
    stream = b"".join(data_chunk(0, at, 1) for at in order) + chunk(
        DONE, ReplyType.OFFSET_HOLE, 1, struct.pack(">QI", 5, 1)
    )
    parser.receive_data(stream)
    assert events(parser)[0].ok and buffer == b"\xab" * 5 + b"\0" + b"\xab" * 2


def test_extent_list_is_compact_and_compares_with_pairs() -> None:
    extents = ExtentList(struct.pack(">II", 512, 3) + struct.pack(">II", 1 << 31, 0))
    assert len(extents) == 2 and list(extents) == [(512, 3), (1 << 31, 0)]
    assert extents == ((512, 3), (1 << 31, 0)) and extents != [(512, 3)]
    assert list(extents.lengths()) == [512, 1 << 31]


def test_structured_reply_without_negotiation() -> None:
    parser = ReplyParser(structured=False)
    parser.register(1, Command.FLUSH, 0, 0)
    with pytest.raises(ProtocolError, match="without NBD_OPT_STRUCTURED_REPLY"):
        parser.receive_data(join(tx.ok_reply(1, True)))


def test_req_one_block_status_must_be_one_extent() -> None:
    parser = ReplyParser(structured=True, context_ids=[1])
    parser.register(1, Command.BLOCK_STATUS, 0, 4096, flags=CommandFlag.REQ_ONE)
    with pytest.raises(ProtocolError, match="REQ_ONE"):
        parser.receive_data(join(tx.block_status_reply(1, [(1, placed([(512, 0), (512, 3)]))])))


@st.composite
def read_replies(draw: st.DrawFn) -> tuple[int, int, list[tx.ReadSegment], bytes]:
    offset = draw(st.integers(0, 1 << 40))
    pieces = draw(st.lists(st.tuples(st.booleans(), st.integers(1, 3000)), min_size=0, max_size=8))
    segments: list[tx.ReadSegment] = []
    expected = b""
    position = offset
    for i, (is_hole, length) in enumerate(pieces):
        if is_hole:
            segments.append(tx.Hole(position, length))
            expected += bytes(length)
        else:
            data = bytes([(i * 37 + 1) % 256]) * length
            segments.append(tx.Data(position, data))
            expected += data
        position += length
    order = draw(st.permutations(range(len(segments))))
    return offset, len(expected), [segments[i] for i in order], expected


@FUZZ
@given(
    replies=st.lists(read_replies(), min_size=1, max_size=5),
    structured=st.booleans(),
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=5),
)
def test_read_round_trips(replies: list, structured: bool, sizes: list[int]) -> None:  # type: ignore[type-arg]
    parser = ReplyParser(structured=structured)
    buffers = []
    stream = b""
    for handle, (offset, length, segments, _) in enumerate(replies):
        buffer = bytearray(b"\xee") * length
        buffers.append(buffer)
        parser.register(handle, Command.READ, offset, length, buffer=buffer)
        if not structured:
            segments = sorted(segments, key=lambda s: s.offset)
        stream += join(tx.read_reply(handle, segments, structured))
    feed(parser, stream, sizes)
    assert [r.handle for r in events(parser)] == list(range(len(replies)))
    assert [bytes(b) for b in buffers] == [expected for *_, expected in replies]


@FUZZ
@given(
    extents=st.lists(st.tuples(st.integers(1, 1 << 31), st.integers(0, 3)), min_size=1, max_size=50),
    errno=st.sampled_from(list(Errno)[1:]),
    message=st.text(max_size=50),
)
def test_block_status_and_error_round_trips(extents: list[tuple[int, int]], errno: int, message: str) -> None:
    parser = ReplyParser(structured=True, context_ids=[1])
    length = sum(e for e, _ in extents[:-1]) + 1
    parser.register(1, Command.BLOCK_STATUS, 0, length)
    parser.register(2, Command.WRITE_ZEROES, 0, 4096)
    parser.receive_data(
        join(tx.block_status_reply(1, [(1, placed(extents))])) + join(tx.error_reply(2, errno, message, True))
    )
    status, error = events(parser)
    assert list(status.extents[1]) == extents
    assert (error.errno, error.message) == (errno, message)


@FUZZ
@given(data=st.binary(max_size=1200), structured=st.booleans(), prefix=st.sampled_from([b"", b"\x67\x44\x66\x98"]))
def test_reply_fuzz_raises_only_protocol_errors(data: bytes, structured: bool, prefix: bytes) -> None:
    parser = ReplyParser(structured=structured, context_ids=[1])
    for handle, command in enumerate([Command.READ, Command.WRITE, Command.BLOCK_STATUS, Command.FLUSH]):
        buffer = bytearray(600) if command == Command.READ else None
        parser.register(handle, command, 0, 600, buffer=buffer)
    try:
        parser.receive_data(prefix + data)
        events(parser)
    except ProtocolError:
        pass


def test_reply_event_is_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Reply(1, 0).errno = 5  # type: ignore[misc]
