"""A scripted NBD server that lies, for the hostile-server tests.

No real server misbehaves on demand, so this one is our own: an asyncio
server on 127.0.0.1 that negotiates and answers like an honest read-only
export (replies encoded by the sans-IO protocol package), then applies one
:class:`Case`'s mutation to the messages it sends: flipped bytes, truncation
and hang-up, duplicated or dropped messages, delays and stalls, oversized
length fields, wrong handles, overlapping READ chunks, bogus extents, absurd
export sizes or block sizes, endless option replies, data that changes on
re-read. Each message is one option reply, one simple reply or one
structured chunk; ``count`` says which message number the mutation hits
first, ``persistent`` whether every later message of the same phase is hit
too (so retries cannot get past it).
"""

from __future__ import annotations

import asyncio
import random
import struct

import attrs

from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import (
    BASE_ALLOCATION,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

BLOCK = 4096
READ, DISC, FLUSH, BLOCK_STATUS = 0, 2, 3, 7
CONTEXT_ID = 1

#: Mutations of any message (header or payload, handshake or transmission).
BYTE_KINDS = ("flip-header", "truncate", "duplicate", "drop", "oversize", "delay", "stall", "reorder")
#: Mutations that need to know what a transmission reply means.
REPLY_KINDS = ("wrong-handle", "overlap", "hole-overlap", "gap", "zero-extent", "bad-context", "extents-past",
               "all-zero-extents", "flip-data", "lie-on-reread")  # fmt: skip
#: Mutations of the handshake.
HANDSHAKE_KINDS = ("huge-size", "bad-block-sizes", "endless-info", "endless-meta", "size-change")
KINDS = BYTE_KINDS + REPLY_KINDS + HANDSHAKE_KINDS


class Hangup(Exception):
    """The mutation ends the connection."""


@attrs.define
class Case:
    """One seeded hostile behaviour."""

    seed: int
    kind: str
    #: Message number first hit: option replies with ``handshake``, else transmission messages (replies
    #: to READ for the mutations that need their meaning; BLOCK_STATUS replies count modulo 2).
    count: int = 0
    persistent: bool = False
    handshake: bool = False

    @classmethod
    def draw(cls, seed: int) -> Case:
        rng = random.Random(seed)
        kind = rng.choice(KINDS)
        handshake = kind in HANDSHAKE_KINDS or (kind in BYTE_KINDS and rng.random() < 0.25)
        limit = 3 if handshake else 12
        # A data flip on every read would be a consistent lie no client can see: flip once.
        persistent = kind != "flip-data" and rng.random() < 0.4
        return cls(seed, kind, rng.randrange(limit), persistent, handshake)

    def __str__(self) -> str:
        where = "handshake" if self.handshake else "transmission"
        return f"seed={self.seed} kind={self.kind} count={self.count} persistent={self.persistent} {where}"


def make_disk(seed: int, size: int = 256 * 1024) -> bytes:
    """Random data blocks and zero blocks."""
    rng = random.Random(seed)
    out = bytearray(size)
    for block in range(0, size, BLOCK):
        if rng.random() < 0.6:
            out[block : block + BLOCK] = rng.randbytes(BLOCK)
    return bytes(out)


class HostileServer:
    """Serves ``disk`` read-only on 127.0.0.1, mutated by ``case``."""

    def __init__(self, disk: bytes, case: Case) -> None:
        self.disk = disk
        self.case = case
        self.rng = random.Random(case.seed)
        self.connections = 0
        self.sent = {True: 0, False: 0}  # messages sent, by "in the handshake"
        self.answered: dict[int, int] = {}  # replies by command, for the mutations that need their meaning
        self.requests: list[tuple[int, int, int]] = []  # (command, offset, length) as received
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"nbd://127.0.0.1:{port}/"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        index = self.connections
        self.connections += 1
        try:
            if await self._handshake(reader, writer, index):
                await self._transmission(reader, writer, index)
        except (asyncio.IncompleteReadError, ConnectionError, Hangup):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)

    # -- sending, with the mutation ----------------------------------------------

    def _hit(self, handshake: bool) -> bool:
        case = self.case
        number = self.sent[handshake]
        self.sent[handshake] += 1
        if case.handshake != handshake or case.kind not in BYTE_KINDS:
            return False
        return number == case.count or (case.persistent and number > case.count)

    async def _send(self, writer: asyncio.StreamWriter, messages: list[bytes], *, handshake: bool) -> None:
        """Send one reply's messages, mutating the one the case picks."""
        out: list[bytes] = []
        for i, message in enumerate(messages):
            if self._hit(handshake):
                out += await self._mutate(writer, message, messages[i + 1 :], handshake)
                if self.case.kind == "reorder":
                    break
            else:
                out.append(message)
        writer.write(b"".join(out))
        await writer.drain()

    async def _mutate(
        self, writer: asyncio.StreamWriter, message: bytes, rest: list[bytes], handshake: bool
    ) -> list[bytes]:
        kind, rng = self.case.kind, self.rng
        header = 20 if handshake else min(len(message), 20)
        if kind == "flip-header":
            at = rng.randrange(header)
            return [message[:at] + bytes([message[at] ^ (1 << rng.randrange(8))]) + message[at + 1 :]]
        if kind == "truncate":
            writer.write(message[: rng.randrange(len(message))])
            await writer.drain()
            raise Hangup
        if kind == "duplicate":
            return [message, message]
        if kind == "drop":
            return []
        if kind == "oversize" and len(message) >= 20:  # the length field of an option reply or chunk
            return [message[:16] + struct.pack(">I", rng.choice([1 << 31, (1 << 32) - 1, 1 << 24])) + message[20:]]
        if kind == "delay":
            await asyncio.sleep(rng.uniform(0.05, 1.2))
            return [message]
        if kind == "stall":
            await asyncio.sleep(3600)
        if kind == "reorder":
            both = [message, *rest]
            rng.shuffle(both)
            return both
        return [message]

    # -- handshake ------------------------------------------------------------------

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> bool:
        writer.write(wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        await reader.readexactly(4)
        while True:
            _, option, length = struct.unpack(">QII", await reader.readexactly(16))
            await reader.readexactly(length)
            if option == Option.ABORT:
                return False
            replies = self._option_replies(option, index)
            endless = {"endless-info": Option.GO, "endless-meta": Option.SET_META_CONTEXT}.get(self.case.kind)
            if option == endless:
                await self._endless(writer, option)
            await self._send(writer, replies, handshake=True)
            if option == Option.GO:
                return True

    def _option_replies(self, option: int, index: int) -> list[bytes]:
        def reply(kind: int, data: bytes = b"") -> bytes:
            return wire.encode_option_reply(option, kind, data)

        kind = self.case.kind
        if option == Option.STRUCTURED_REPLY:
            return [reply(OptionReply.ACK)]
        if option == Option.SET_META_CONTEXT:
            return [reply(OptionReply.META_CONTEXT, struct.pack(">I", CONTEXT_ID) + BASE_ALLOCATION.encode()),
                    reply(OptionReply.ACK)]  # fmt: skip
        if option != Option.GO:
            return [reply(OptionReply.ERR_UNSUP)]
        size = len(self.disk)
        if kind == "huge-size":
            size = self.rng.choice([1 << 63, (1 << 64) - 1])
        elif kind == "size-change" and index > 0:
            size += BLOCK
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH
        sizes = (1, BLOCK, 1 << 20)
        if kind == "bad-block-sizes":
            sizes = self.rng.choice(
                [(3, BLOCK, 1 << 20), (8192, BLOCK, 1 << 20), (512, BLOCK, 1024), (1 << 17, 1 << 17, 1 << 20)]
            )
        return [
            reply(OptionReply.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, size, flags)),
            reply(OptionReply.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, *sizes)),
            reply(OptionReply.ACK),
        ]

    async def _endless(self, writer: asyncio.StreamWriter, option: int) -> None:
        """Option replies with distinct contents until the client hangs up (bounded at 64 MiB)."""
        for i in range(64 * 1024):
            if option == Option.GO:
                data = struct.pack(">H", 1000 + i % 1000)  # unknown NBD_INFO types (many, small)
                kind = OptionReply.INFO
            else:
                data = struct.pack(">I", i + 2) + f"{BASE_ALLOCATION}{i}".encode() + bytes(1000)
                kind = OptionReply.META_CONTEXT
            writer.write(wire.encode_option_reply(option, kind, data))
            await writer.drain()
        raise Hangup

    # -- transmission ------------------------------------------------------------------

    async def _transmission(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            _, _, command, handle, offset, length = struct.unpack(">IHHQQI", await reader.readexactly(28))
            if command == DISC:
                return
            self.answered[command] = self.answered.get(command, -1) + 1
            self.requests.append((command, offset, length))
            if command == READ:
                messages = self._read(handle, offset, length, index)
            elif command == BLOCK_STATUS:
                messages = self._block_status(handle, offset, length)
            elif command == FLUSH:
                messages = [wire.encode_chunk_header(ReplyFlag.DONE, ReplyType.NONE, handle, 0)]
            else:
                messages = [wire.encode_error_chunk(handle, 22, "not supported here")]
            if self.case.kind == "wrong-handle" and self._semantic_hit(READ):
                messages = [m[:8] + struct.pack(">Q", handle ^ 0x5A5A) + m[16:] for m in messages]
            await self._send(writer, messages, handshake=False)

    def _semantic_hit(self, command: int) -> bool:
        """This reply is the case's ``count``-th to ``command`` (or a later one, when persistent)."""
        case = self.case
        count = case.count if command == READ else case.count % 2  # there are few BLOCK_STATUS requests
        number = self.answered.get(command, 0)
        return number == count or (case.persistent and number > count)

    def _data(self, offset: int, length: int, index: int) -> bytes:
        data = self.disk[offset : offset + length]
        if self.case.kind == "lie-on-reread" and index > 0:
            return bytes(b ^ index for b in data)
        return data

    def _read(self, handle: int, offset: int, length: int, index: int) -> list[bytes]:
        kind = self.case.kind
        data = self._data(offset, length, index)
        if kind in ("overlap", "hole-overlap", "gap") and length >= 2 and self._semantic_hit(READ):
            half = length // 2
            if kind == "overlap":  # two chunks over the first half: the byte count adds up
                return [_data_chunk(handle, offset, bytes(b ^ 0xFF for b in data[:half]), False),
                        _data_chunk(handle, offset, data[: length - half], True)]  # fmt: skip
            if kind == "hole-overlap":
                return [
                    _hole_chunk(handle, offset, length - half, False),
                    _data_chunk(handle, offset, data[:half], True),
                ]
            return [_data_chunk(handle, offset, data[:half], True)]
        if kind == "flip-data" and self._semantic_hit(READ) and any(data):
            changed = bytearray(data)
            changed[self.rng.randrange(length)] ^= 0x01
            data = bytes(changed)
        messages = []
        runs = _runs(data, offset)
        for i, (start, end, zero) in enumerate(runs):
            done = i == len(runs) - 1
            piece = data[start - offset : end - offset]
            messages.append(
                _hole_chunk(handle, start, end - start, done) if zero else _data_chunk(handle, start, piece, done)
            )
        return messages

    def _block_status(self, handle: int, offset: int, length: int) -> list[bytes]:
        kind = self.case.kind
        extents = [
            (end - start, 3 if zero else 0) for start, end, zero in _runs(self.disk[offset : offset + length], offset)
        ]
        context = CONTEXT_ID
        if kind in ("zero-extent", "bad-context", "extents-past", "all-zero-extents") and self._semantic_hit(
            BLOCK_STATUS
        ):
            if kind == "zero-extent":
                extents.insert(self.rng.randrange(len(extents) + 1), (0, 0))
            elif kind == "bad-context":
                context = 7
            elif kind == "extents-past":
                extents = [(length, 0), (BLOCK, 0)]
            else:
                extents = [(length, 3)]  # a lie: data claimed to read as zeroes
        return [wire.encode_block_status_chunk(handle, context, extents, done=True)]


def _runs(data: bytes, offset: int) -> list[tuple[int, int, bool]]:
    """``(start, end, zero)`` runs of ``data`` (which starts at ``offset``), by 4 KiB block."""
    runs: list[tuple[int, int, bool]] = []
    for start in range(0, len(data), BLOCK):
        piece = data[start : start + BLOCK]
        zero = not any(piece)
        end = start + len(piece)
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], offset + end, zero)
        else:
            runs.append((offset + start, offset + end, zero))
    return runs


def _data_chunk(handle: int, offset: int, data: bytes, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return wire.encode_chunk_header(flags, ReplyType.OFFSET_DATA, handle, 8 + len(data)) + wire.U64.pack(offset) + data


def _hole_chunk(handle: int, offset: int, length: int, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    payload = wire.OFFSET_HOLE_PAYLOAD.pack(offset, length)
    return wire.encode_chunk_header(flags, ReplyType.OFFSET_HOLE, handle, len(payload)) + payload
