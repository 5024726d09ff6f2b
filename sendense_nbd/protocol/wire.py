"""Fixed-size NBD messages: encoders and decoders for both roles.

Every structure here is big-endian, as the spec's "Conventions" section
requires. Decoders raise :class:`~sendense_nbd.errors.ProtocolError` on a bad
magic number; they never read past the slice they are given.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import attrs

from sendense_nbd.errors import ProtocolError
from sendense_nbd.protocol.constants import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ReplyFlag,
    ReplyType,
)

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXTENT = struct.Struct(">II")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
ERROR_PAYLOAD = struct.Struct(">IH")
OFFSET_HOLE_PAYLOAD = struct.Struct(">QI")

#: Bytes of padding after an ``NBD_OPT_EXPORT_NAME`` reply without NO_ZEROES.
EXPORT_NAME_PADDING = 124


@attrs.frozen(slots=True)
class RequestHeader:
    """One transmission request header (the payload of a WRITE follows it)."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int


@attrs.frozen(slots=True)
class ChunkHeader:
    """The header of one structured reply chunk."""

    flags: int
    type: int
    handle: int
    length: int

    @property
    def done(self) -> bool:
        return bool(self.flags & ReplyFlag.DONE)


@attrs.frozen(slots=True)
class OptionReplyHeader:
    """The header of one option reply."""

    option: int
    reply: int
    length: int


def encode_greeting(handshake_flags: int) -> bytes:
    """The server's first 18 bytes: magic, ``IHAVEOPT`` and its handshake flags."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def decode_greeting(data: bytes | memoryview) -> int:
    """Return the handshake flags of a fixed-newstyle greeting."""
    magic, opt, flags = GREETING.unpack(data)
    if magic != NBDMAGIC or opt != IHAVEOPT:
        raise ProtocolError("server greeting is not fixed newstyle NBD")
    return int(flags)


def encode_option(option: int, data: bytes = b"") -> bytes:
    """One client option: header and ``data``."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Return ``(option, length)`` of an option header."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"option magic {magic:#x} is not IHAVEOPT")
    return int(option), int(length)


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """One server option reply: header and ``data``."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def decode_option_reply_header(data: bytes | memoryview) -> OptionReplyHeader:
    """Parse an option reply header; a wrong magic is a :class:`ProtocolError`."""
    magic, option, reply, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"option reply magic {magic:#x} is wrong")
    return OptionReplyHeader(option, reply, length)


def encode_request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    """A transmission request header (the WRITE payload follows it separately)."""
    return REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


def decode_request(data: bytes | memoryview) -> RequestHeader:
    """Parse a request header; a wrong magic is a :class:`ProtocolError`."""
    magic, flags, command, handle, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"request magic {magic:#x} is wrong")
    return RequestHeader(flags, command, handle, offset, length)


def encode_simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header; a READ's data follows it separately."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def encode_chunk_header(flags: int, type_: int, handle: int, length: int) -> bytes:
    """A structured reply chunk header; its payload follows it."""
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, type_, handle, length)


def decode_reply_magic(data: bytes | memoryview) -> int:
    """Return the magic of the next reply: simple or structured."""
    (magic,) = U32.unpack_from(data)
    if magic not in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC):
        raise ProtocolError(f"reply magic {magic:#x} is wrong")
    return int(magic)


def decode_simple_reply(data: bytes | memoryview) -> tuple[int, int]:
    """Return ``(handle, error)`` of a simple reply."""
    magic, error, handle = SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolError(f"simple reply magic {magic:#x} is wrong")
    return int(handle), int(error)


def decode_chunk_header(data: bytes | memoryview) -> ChunkHeader:
    """Parse a structured reply chunk header; a wrong magic is a :class:`ProtocolError`."""
    magic, flags, type_, handle, length = CHUNK_HEADER.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"structured reply magic {magic:#x} is wrong")
    return ChunkHeader(flags, type_, handle, length)


def encode_string(text: str) -> bytes:
    """A UTF-8 string prefixed with its 32-bit length."""
    raw = text.encode()
    return U32.pack(len(raw)) + raw


def encode_text(text: str, limit: int = MAX_STRING) -> bytes:
    """UTF-8 of ``text`` cut to ``limit`` bytes without splitting a character."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode(errors="ignore").encode()


def encode_error_chunk(handle: int, error: int, message: str, *, done: bool = True) -> bytes:
    """A structured error chunk carrying ``error`` and a human-readable ``message``."""
    raw = encode_text(message)
    payload = ERROR_PAYLOAD.pack(error, len(raw)) + raw
    flags = ReplyFlag.DONE if done else 0
    return encode_chunk_header(flags, ReplyType.ERROR, handle, len(payload)) + payload


def encode_block_status_chunk(handle: int, context_id: int, extents: Iterable[tuple[int, int]], *, done: bool) -> bytes:
    """A BLOCK_STATUS chunk from ``(length, flags)`` extents."""
    body = b"".join(EXTENT.pack(length, flags) for length, flags in extents)
    flags = ReplyFlag.DONE if done else 0
    return encode_chunk_header(flags, ReplyType.BLOCK_STATUS, handle, 4 + len(body)) + U32.pack(context_id) + body
