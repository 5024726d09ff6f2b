"""Unit tests for sendense_nbd.protocol.wire: exact bytes and round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sendense_nbd.errors import ProtocolError
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)


def other_than(value: int, bits: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << bits) - 1).filter(lambda v: v != value)


# -- exact encodings (independent of the codec's own Struct definitions) -------


def test_magic_constants_spell_the_spec() -> None:
    assert NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert OPTION_REPLY_MAGIC == 0x0003E889045565A9
    assert REQUEST_MAGIC == 0x25609513
    assert SIMPLE_REPLY_MAGIC == 0x67446698
    assert STRUCTURED_REPLY_MAGIC == 0x668E33EF


def test_greeting_bytes() -> None:
    assert wire.encode_greeting(3) == b"NBDMAGICIHAVEOPT\x00\x03"
    assert wire.GREETING.size == 18


def test_request_bytes() -> None:
    encoded = wire.encode_request(Command.WRITE, 0x0102030405060708, 0x1122334455667788, 0x200, flags=CommandFlag.FUA)
    assert encoded == bytes.fromhex("25609513000100010102030405060708112233445566778800000200")
    assert len(encoded) == 28


def test_simple_reply_bytes() -> None:
    assert wire.encode_simple_reply(0xAABB, 22) == bytes.fromhex("6744669800000016000000000000aabb")
    assert wire.encode_simple_reply(7) == bytes.fromhex("67446698000000000000000000000007")


def test_chunk_header_bytes() -> None:
    assert wire.encode_chunk_header(ReplyFlag.DONE, ReplyType.OFFSET_HOLE, 5, 12) == bytes.fromhex(
        "668e33ef0001000200000000000000050000000c"
    )


def test_option_bytes() -> None:
    assert wire.encode_option(Option.LIST) == b"IHAVEOPT" + bytes.fromhex("0000000300000000")
    assert wire.encode_option(Option.EXPORT_NAME, b"abc") == b"IHAVEOPT" + bytes.fromhex("0000000100000003") + b"abc"


def test_option_reply_bytes() -> None:
    assert (
        wire.encode_option_reply(Option.GO, OptionReply.ERR_UNKNOWN, b"no")
        == bytes.fromhex("0003e889045565a9000000078000000600000002") + b"no"
    )


def test_encode_string() -> None:
    assert wire.encode_string("") == b"\x00\x00\x00\x00"
    assert wire.encode_string("é") == b"\x00\x00\x00\x02\xc3\xa9"


def test_error_chunk_bytes() -> None:
    assert (
        wire.encode_error_chunk(9, 5, "bad")
        == bytes.fromhex("668e33ef00018001000000000000000900000009000000050003") + b"bad"
    )
    assert wire.encode_error_chunk(9, 5, "", done=False) == bytes.fromhex(
        "668e33ef00008001000000000000000900000006000000050000"
    )


def test_block_status_chunk_bytes() -> None:
    encoded = wire.encode_block_status_chunk(3, 1, [(4096, 0), (8192, 3)], done=True)
    assert encoded == bytes.fromhex("668e33ef000100050000000000000003000000140000000100001000000000000000200000000003")
    not_done = wire.encode_block_status_chunk(3, 2, [(512, 1)], done=False)
    assert not_done[4:6] == b"\x00\x00"
    assert struct.unpack(">I", not_done[16:20])[0] == 4 + 8


# -- round trips -----------------------------------------------------------------


@given(flags=u16)
def test_greeting_round_trip(flags: int) -> None:
    encoded = wire.encode_greeting(flags)
    assert encoded[:16] == b"NBDMAGICIHAVEOPT"
    assert wire.decode_greeting(encoded) == flags


@given(command=u16, handle=u64, offset=u64, length=u32, flags=u16)
def test_request_round_trip(command: int, handle: int, offset: int, length: int, flags: int) -> None:
    encoded = wire.encode_request(command, handle, offset, length, flags)
    assert len(encoded) == wire.REQUEST.size == 28
    assert wire.decode_request(encoded) == wire.RequestHeader(flags, command, handle, offset, length)
    assert wire.decode_request(memoryview(encoded)) == wire.RequestHeader(flags, command, handle, offset, length)


@given(handle=u64, error=u32)
def test_simple_reply_round_trip(handle: int, error: int) -> None:
    encoded = wire.encode_simple_reply(handle, error)
    assert len(encoded) == 16
    assert wire.decode_reply_magic(encoded) == SIMPLE_REPLY_MAGIC
    assert wire.decode_simple_reply(encoded) == (handle, error)


@given(flags=u16, type_=u16, handle=u64, length=u32)
def test_chunk_header_round_trip(flags: int, type_: int, handle: int, length: int) -> None:
    encoded = wire.encode_chunk_header(flags, type_, handle, length)
    assert len(encoded) == 20
    assert wire.decode_reply_magic(encoded) == STRUCTURED_REPLY_MAGIC
    header = wire.decode_chunk_header(encoded)
    assert header == wire.ChunkHeader(flags, type_, handle, length)
    assert header.done == bool(flags & 1)


@given(option=u32, data=st.binary(max_size=64))
def test_option_round_trip(option: int, data: bytes) -> None:
    encoded = wire.encode_option(option, data)
    assert len(encoded) == 16 + len(data)
    assert wire.decode_option_header(encoded[:16]) == (option, len(data))
    assert encoded[16:] == data


@given(option=u32, reply=u32, data=st.binary(max_size=64))
def test_option_reply_round_trip(option: int, reply: int, data: bytes) -> None:
    encoded = wire.encode_option_reply(option, reply, data)
    assert wire.decode_option_reply_header(encoded[:20]) == wire.OptionReplyHeader(option, reply, len(data))
    assert encoded[20:] == data


@given(handle=u64, error=u32, message=st.text(max_size=40), done=st.booleans())
def test_error_chunk_round_trip(handle: int, error: int, message: str, done: bool) -> None:
    encoded = wire.encode_error_chunk(handle, error, message, done=done)
    header = wire.decode_chunk_header(encoded[:20])
    raw = message.encode()
    assert header == wire.ChunkHeader(1 if done else 0, ReplyType.ERROR, handle, 6 + len(raw))
    assert struct.unpack(">IH", encoded[20:26]) == (error, len(raw))
    assert encoded[26:].decode() == message


@given(
    handle=u64,
    context_id=u32,
    extents=st.lists(st.tuples(u32, u32), min_size=1, max_size=20),
    done=st.booleans(),
)
def test_block_status_chunk_round_trip(
    handle: int, context_id: int, extents: list[tuple[int, int]], done: bool
) -> None:
    encoded = wire.encode_block_status_chunk(handle, context_id, extents, done=done)
    header = wire.decode_chunk_header(encoded[:20])
    assert header == wire.ChunkHeader(int(done), ReplyType.BLOCK_STATUS, handle, 4 + 8 * len(extents))
    assert len(encoded) == 20 + header.length
    assert struct.unpack(">I", encoded[20:24])[0] == context_id
    assert list(struct.iter_unpack(">II", encoded[24:])) == extents


# -- bad magic -----------------------------------------------------------------


@given(magic=other_than(NBDMAGIC, 64))
def test_bad_greeting_magic(magic: int) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_greeting(struct.pack(">QQH", magic, IHAVEOPT, 3))


@given(magic=other_than(IHAVEOPT, 64))
def test_bad_greeting_second_magic(magic: int) -> None:
    # An oldstyle server sends a size instead of IHAVEOPT.
    with pytest.raises(ProtocolError):
        wire.decode_greeting(struct.pack(">QQH", NBDMAGIC, magic, 3))


@given(magic=other_than(IHAVEOPT, 64))
def test_bad_option_magic(magic: int) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_option_header(struct.pack(">QII", magic, Option.GO, 0))


@given(magic=other_than(OPTION_REPLY_MAGIC, 64))
def test_bad_option_reply_magic(magic: int) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_option_reply_header(struct.pack(">QIII", magic, 1, 1, 0))


@given(magic=other_than(REQUEST_MAGIC, 32))
def test_bad_request_magic(magic: int) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_request(struct.pack(">IHHQQI", magic, 0, 0, 1, 0, 512))


@given(magic=other_than(SIMPLE_REPLY_MAGIC, 32))
def test_bad_simple_reply_magic(magic: int) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_simple_reply(struct.pack(">IIQ", magic, 0, 1))


@given(magic=other_than(STRUCTURED_REPLY_MAGIC, 32))
def test_bad_chunk_magic(magic: int) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_chunk_header(struct.pack(">IHHQI", magic, 1, 0, 1, 0))


@given(magic=u32.filter(lambda m: m not in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC)))
def test_bad_reply_magic(magic: int) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_reply_magic(struct.pack(">IIQ", magic, 0, 1))


def test_structured_magic_is_not_a_simple_reply() -> None:
    with pytest.raises(ProtocolError):
        wire.decode_simple_reply(struct.pack(">IIQ", STRUCTURED_REPLY_MAGIC, 0, 1))
