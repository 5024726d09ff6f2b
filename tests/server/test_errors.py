"""Negative tests: bad requests, bad options and garbage against our server.

libnbd (Debian's python3-libnbd) in non-strict mode sends requests a careful
client never would; where libnbd cannot produce the bad bytes at all, a raw
socket client built on :mod:`sendense_nbd.protocol.wire` does. Every test
asserts the exact NBD errno or option reply the spec asks for.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import (
    IHAVEOPT,
    REQUEST_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    OptionReply,
    ReplyType,
    TransmissionFlag,
)
from tests.peers import nbd

pytestmark = pytest.mark.peer

SIZE = 1 << 20
OK_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
TIMEOUT = 5.0
GO_DATA = wire.encode_string("") + wire.U16.pack(0)  # NBD_OPT_GO/INFO for the default export


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(random.Random(1).randbytes(SIZE))
    return path


def connect(srv, *, name: str = "", strict: int = 0, structured: bool = True) -> nbd.NBD:  # type: ignore[no-untyped-def]
    h = nbd.NBD()
    h.set_strict_mode(strict)
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(srv.uri_for(name))
    return h


def nbd_error(fn: Callable[[], object]) -> nbd.Error:
    """The nbd.Error that ``fn`` raises; fails if it succeeds."""
    try:
        fn()
    except nbd.Error as exc:
        return exc
    raise AssertionError("the request succeeded but should have failed")


def roundtrip(h: nbd.NBD, offset: int, seed: int) -> None:
    """Write 4 KiB at ``offset`` and read it back: the connection still works."""
    data = random.Random(seed).randbytes(4096)
    h.pwrite(data, offset)
    assert h.pread(4096, offset) == data


class Raw:
    """A hand-driven NBD client over a plain socket."""

    def __init__(self, port: int, client_flags: int | None = OK_FLAGS) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.handshake_flags = wire.decode_greeting(self.recv(wire.GREETING.size))
        if client_flags is not None:
            self.send(wire.CLIENT_FLAGS.pack(client_flags))

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def reply(self) -> tuple[wire.OptionReplyHeader, bytes]:
        header = wire.decode_option_reply_header(self.recv(wire.OPTION_REPLY_HEADER.size))
        return header, self.recv(header.length) if header.length else b""

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; its replies up to the final one, as ``(type, data)``."""
        self.send(wire.encode_option(option, data))
        replies = []
        while True:
            header, payload = self.reply()
            assert header.option == option, f"reply for option {header.option}, sent {option}"
            replies.append((header.reply, payload))
            if header.reply not in (OptionReply.SERVER, OptionReply.INFO, OptionReply.META_CONTEXT):
                return replies

    def go(self, name: str = "", *, structured: bool = False, option: int = Option.GO) -> tuple[int, int]:
        """NBD_OPT_GO (or INFO); returns the export's ``(size, transmission flags)``."""
        if structured:
            assert self.option(Option.STRUCTURED_REPLY) == [(OptionReply.ACK, b"")]
        replies = self.option(option, wire.encode_string(name) + wire.U16.pack(0))
        assert replies[-1][0] == OptionReply.ACK, replies
        infos = [data for kind, data in replies if kind == OptionReply.INFO and data[:2] == wire.U16.pack(Info.EXPORT)]
        assert len(infos) == 1, replies
        _, size, flags = wire.INFO_EXPORT.unpack(infos[0])
        return size, flags

    def request(
        self, command: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> None:
        self.send(wire.encode_request(command, handle, offset, length, flags) + payload)

    def simple_reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """``(handle, error, data)`` of a simple reply."""
        handle, error = wire.decode_simple_reply(self.recv(wire.SIMPLE_REPLY.size))
        return handle, error, self.recv(data_length) if data_length and not error else b""

    def chunks(self) -> list[tuple[wire.ChunkHeader, bytes]]:
        """Every chunk of one structured reply, up to the DONE one."""
        out = []
        while True:
            header = wire.decode_chunk_header(self.recv(wire.CHUNK_HEADER.size))
            out.append((header, self.recv(header.length) if header.length else b""))
            if header.done:
                return out

    def wait_closed(self, timeout: float = 3.0) -> bytes:
        """Everything the server sends until it closes; fails if it stays open."""
        self.sock.settimeout(timeout)
        got = bytearray()
        try:
            while chunk := self.sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"server kept the connection open (received {bytes(got[:64])!r})") from None
        return bytes(got)


def chunk_error(chunks: list[tuple[wire.ChunkHeader, bytes]], handle: int) -> int:
    """The errno of a structured reply that must be a single error chunk."""
    assert len(chunks) == 1, chunks
    header, payload = chunks[0]
    assert (header.type, header.handle) == (ReplyType.ERROR, handle) and header.done
    error, _ = wire.ERROR_PAYLOAD.unpack_from(payload)
    return error


# -- transmission: requests libnbd sends in non-strict mode ----------------------

OUT_OF_RANGE = {
    "read": ("EINVAL", lambda h, off, n: h.pread(n, off)),
    "write": ("ENOSPC", lambda h, off, n: h.pwrite(b"\xaa" * n, off)),
    "trim": ("EINVAL", lambda h, off, n: h.trim(n, off)),
    "write_zeroes": ("ENOSPC", lambda h, off, n: h.zero(n, off)),
    "block_status": ("EINVAL", lambda h, off, n: h.block_status(n, off, lambda *a: 0)),
    "cache": ("EINVAL", lambda h, off, n: h.cache(n, off)),
}


@pytest.mark.parametrize("op", list(OUT_OF_RANGE))
def test_out_of_range(serve, image: Path, op: str) -> None:
    srv = serve("-f", "raw", "-t", "--discard", "unmap", str(image))
    h = connect(srv)
    assert h.can_trim() and h.can_zero() and h.can_cache() and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    tail = h.pread(512, SIZE - 512)
    expected, call = OUT_OF_RANGE[op]
    for offset, length in [(SIZE - 512, 1024), (SIZE, 1), (SIZE + 4096, 512), (2**64 - 512, 1024)]:
        err = nbd_error(lambda: call(h, offset, length))
        assert (err.errno, offset, length) == (expected, offset, length), err.string
    assert h.pread(512, SIZE - 512) == tail, "a refused request changed the export"
    call(h, SIZE - 512, 512)  # the last in-range sector works
    roundtrip(h, 0, seed=2)
    h.shutdown()


BAD_FLAGS = [
    ("read", 1 << 7),
    ("read", 1 << 15),
    ("write", 1 << 9),
    ("write_zeroes", 1 << 12),
    ("read", CommandFlag.REQ_ONE),
    ("read", CommandFlag.NO_HOLE),
    ("read", CommandFlag.FAST_ZERO),
    ("write", CommandFlag.DF),
    ("write", CommandFlag.FAST_ZERO),
    ("write", CommandFlag.NO_HOLE),
    ("write_zeroes", CommandFlag.DF),
    ("trim", CommandFlag.NO_HOLE),
    ("flush", CommandFlag.DF),
    ("cache", CommandFlag.REQ_ONE),
    ("block_status", CommandFlag.DF),
]
FLAGGED = {
    "read": lambda h, f: h.pread(512, 0, flags=f),
    "write": lambda h, f: h.pwrite(b"\xbb" * 512, 0, flags=f),
    "write_zeroes": lambda h, f: h.zero(512, 0, flags=f),
    "trim": lambda h, f: h.trim(512, 0, flags=f),
    "flush": lambda h, f: h.flush(flags=f),
    "cache": lambda h, f: h.cache(512, 0, flags=f),
    "block_status": lambda h, f: h.block_status(512, 0, lambda *a: 0, flags=f),
}


@pytest.mark.parametrize(("op", "flag"), BAD_FLAGS, ids=[f"{op}-{int(f):#x}" for op, f in BAD_FLAGS])
def test_bad_command_flags(serve, image: Path, op: str, flag: int) -> None:
    srv = serve("-f", "raw", "-t", "--discard", "unmap", str(image))
    h = connect(srv)
    before = h.pread(512, 0)
    err = nbd_error(lambda: FLAGGED[op](h, int(flag)))
    assert err.errno == "EINVAL", err.string
    assert h.pread(512, 0) == before, "a refused request changed the export"
    roundtrip(h, 8192, seed=3)


def test_df_without_structured_replies(serve, image: Path) -> None:
    srv = serve("-f", "raw", "-t", str(image))
    h = connect(srv, structured=False)
    assert not h.get_structured_replies_negotiated() and not h.can_df()
    assert nbd_error(lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_DF)).errno == "EINVAL"
    assert h.pread(512, 0) == image.read_bytes()[:512]
    roundtrip(h, 4096, seed=4)


@pytest.mark.parametrize("structured", [False, True])
def test_unknown_command_raw(serve, image: Path, structured: bool) -> None:
    srv = serve("-f", "raw", "-t", str(image))
    raw = Raw(srv.port)
    assert raw.go(structured=structured)[0] == SIZE
    for handle, command in enumerate([8, 42, 0x7FFF, 0xFFFF], start=1):
        raw.request(command, handle, 0, 0)
        if structured:
            assert chunk_error(raw.chunks(), handle) == Errno.EINVAL
        else:
            assert raw.simple_reply() == (handle, Errno.EINVAL, b"")
    data = b"\x5a" * 512
    raw.request(Command.WRITE, 100, 512, 512, payload=data)
    if structured:
        ((header, _),) = raw.chunks()
        assert (header.handle, header.type) == (100, ReplyType.NONE)
        raw.request(Command.READ, 101, 512, 512, flags=CommandFlag.DF)
        ((header, payload),) = raw.chunks()
        assert (header.handle, header.type, payload) == (101, ReplyType.OFFSET_DATA, wire.U64.pack(512) + data)
        # a READ error must come as a structured reply too, even for bad flags
        raw.request(Command.READ, 102, 0, 512, flags=CommandFlag.REQ_ONE)
        assert chunk_error(raw.chunks(), 102) == Errno.EINVAL
    else:
        assert raw.simple_reply() == (100, 0, b"")
        raw.request(Command.READ, 101, 512, 512)
        assert raw.simple_reply(512) == (101, 0, data)
        raw.request(Command.BLOCK_STATUS, 102, 0, 512)
        assert raw.simple_reply() == (102, Errno.EINVAL, b"")
    raw.request(Command.DISC, 103, 0, 0)
    assert raw.wait_closed() == b""
    assert image.read_bytes()[512:1024] == data


@pytest.mark.parametrize("op", ["write", "trim", "write_zeroes"])
def test_read_only_export_eperm(serve, image: Path, op: str) -> None:
    srv = serve("-f", "raw", "-t", "-r", str(image))
    h = connect(srv)
    assert h.is_read_only()
    calls = {
        "write": lambda: h.pwrite(b"\xcc" * 4096, 0),
        "trim": lambda: h.trim(4096, 0),
        "write_zeroes": lambda: h.zero(4096, 0),
    }
    err = nbd_error(calls[op])
    assert err.errno == "EPERM", err.string
    assert h.pread(4096, 0) == image.read_bytes()[:4096]


def test_fast_zero(serve, image: Path) -> None:
    srv = serve("-f", "raw", "-t", str(image))
    h = connect(srv)
    assert h.can_zero() and h.can_fast_zero()
    h.zero(65536, 65536, flags=nbd.CMD_FLAG_FAST_ZERO)
    h.zero(4096, 200000, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, 65536) == bytes(65536)
    assert h.pread(4096, 200000) == bytes(4096)
    h.flush()
    on_disk = image.read_bytes()
    assert on_disk[65536:131072] == bytes(65536) and on_disk[200000:204096] == bytes(4096)
    assert on_disk[:65536] == random.Random(1).randbytes(SIZE)[:65536]


# -- handshake: export names --------------------------------------------------------


def test_unknown_export_opt_go(serve, image: Path) -> None:
    srv = serve("-f", "raw", "-t", "-e", "4", str(image))
    err = nbd_error(lambda: connect(srv, name="nosuch"))
    assert err.errno == "ENOENT" and "no export named 'nosuch'" in err.string
    raw = Raw(srv.port)
    replies = raw.option(Option.GO, wire.encode_string("nosuch") + wire.U16.pack(0))  # no info requests
    assert [kind for kind, _ in replies] == [OptionReply.ERR_UNKNOWN]
    size, flags = raw.go("")  # still in sync after the error
    assert size == SIZE and flags & TransmissionFlag.HAS_FLAGS and not flags & TransmissionFlag.SEND_DF
    raw.request(Command.READ, 1, 0, 16)
    assert raw.simple_reply(16) == (1, 0, image.read_bytes()[:16])


def test_unknown_export_export_name_hangs_up(serve, image: Path) -> None:
    srv = serve("-f", "raw", "-t", "-e", "4", str(image))
    raw = Raw(srv.port)
    raw.send(wire.encode_option(Option.EXPORT_NAME, b"nosuch"))
    assert raw.wait_closed() == b"", "the server must hang up without a reply"
    for client_flags, padding in [(OK_FLAGS, 0), (ClientFlag.FIXED_NEWSTYLE, wire.EXPORT_NAME_PADDING)]:
        raw = Raw(srv.port, client_flags)
        raw.send(wire.encode_option(Option.EXPORT_NAME, b""))
        size, flags = wire.EXPORT_NAME_REPLY.unpack(raw.recv(wire.EXPORT_NAME_REPLY.size))
        assert size == SIZE and flags & TransmissionFlag.HAS_FLAGS
        assert raw.recv(padding) == bytes(padding)
        raw.request(Command.READ, 9, 100, 10)
        assert raw.simple_reply(10) == (9, 0, image.read_bytes()[100:110])
        raw.close()


# -- handshake: option haggling with libnbd's opt mode ---------------------------


@pytest.fixture
def two_exports(serve, tmp_path: Path):  # type: ignore[no-untyped-def]
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"A" * 65536)
    b.write_bytes(b"B" * 131072)
    names = ["-x", "disk-a", "-x", "disk-b", "-D", "first", "-D", "second"]
    return serve("-f", "raw", "-t", "-e", "4", *names, str(a), str(b))


def opt_handle(srv, structured: bool = True) -> nbd.NBD:  # type: ignore[no-untyped-def]
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_request_structured_replies(structured)
    h.connect_uri(srv.uri)
    assert h.aio_is_negotiating()
    return h


def test_opt_list(two_exports) -> None:  # type: ignore[no-untyped-def]
    h = opt_handle(two_exports)
    found: list[tuple[str, str]] = []
    assert h.opt_list(lambda name, desc: found.append((name, desc))) == 2
    assert sorted(found) == [("disk-a", "first"), ("disk-b", "second")]
    assert h.aio_is_negotiating()
    h.opt_abort()


def test_opt_info_then_go(two_exports) -> None:  # type: ignore[no-untyped-def]
    h = opt_handle(two_exports)
    for name, size in [("disk-a", 65536), ("disk-b", 131072), ("", 65536)]:
        h.set_export_name(name)
        h.opt_info()
        assert (h.get_size(), h.is_read_only(), h.can_flush()) == (size, False, True)
        assert h.aio_is_negotiating(), "NBD_OPT_INFO must not enter transmission"
    h.set_export_name("nosuch")
    assert nbd_error(h.opt_info).errno == "ENOENT"
    h.set_export_name("disk-b")
    h.opt_go()
    assert h.aio_is_ready() and h.get_size() == 131072
    assert h.pread(4, 131068) == b"BBBB"


def test_opt_abort(two_exports) -> None:  # type: ignore[no-untyped-def]
    h = opt_handle(two_exports)
    h.opt_abort()
    assert h.aio_is_closed() and not h.aio_is_dead()
    raw = Raw(two_exports.port)
    assert raw.option(Option.ABORT) == [(OptionReply.ACK, b"")]
    assert raw.wait_closed() == b""


def test_opt_list_meta_context(two_exports) -> None:  # type: ignore[no-untyped-def]
    h = opt_handle(two_exports)
    h.set_export_name("disk-a")
    for queries, expected in [([], ["base:allocation"]), (["base:"], ["base:allocation"]), (["nosuch:"], [])]:
        h.clear_meta_contexts()
        for query in queries:
            h.add_meta_context(query)
        found: list[str] = []
        assert h.opt_list_meta_context(found.append) == len(expected)
        assert found == expected
    h.opt_abort()


def test_client_without_structured_replies(two_exports) -> None:  # type: ignore[no-untyped-def]
    h = opt_handle(two_exports, structured=False)
    h.set_export_name("disk-a")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()
    assert not h.get_structured_replies_negotiated()
    assert h.pread(8, 0) == b"A" * 8
    roundtrip(h, 4096, seed=5)
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_strict_mode(0)
    assert nbd_error(lambda: h.block_status(512, 0, lambda *a: 0)).errno == "EINVAL"
    roundtrip(h, 8192, seed=6)


# -- handshake: raw option errors ------------------------------------------------


def test_starttls_without_tls(serve, image: Path) -> None:
    srv = serve("-f", "raw", "-t", str(image))
    raw = Raw(srv.port)
    assert [kind for kind, _ in raw.option(Option.STARTTLS)] == [OptionReply.ERR_POLICY]
    assert raw.go()[0] == SIZE
    raw.request(Command.READ, 1, 0, 8)
    assert raw.simple_reply(8) == (1, 0, image.read_bytes()[:8])


def test_unknown_option_unsup(serve, image: Path) -> None:
    srv = serve("-f", "raw", "-t", str(image))
    raw = Raw(srv.port)
    for option, data in [(0x4242, b"x" * 100), (Option.EXTENDED_HEADERS, b""), (0xFFFFFFFF, b"")]:
        assert [kind for kind, _ in raw.option(option, data)] == [OptionReply.ERR_UNSUP]
    assert raw.go()[0] == SIZE
    raw.request(Command.READ, 1, 8, 8)
    assert raw.simple_reply(8) == (1, 0, image.read_bytes()[8:16])


def test_oversized_option_too_big(serve, image: Path) -> None:
    srv = serve("-f", "raw", "-t", str(image))
    raw = Raw(srv.port)
    for length in [64 * 1024 + 1, 1 << 20, (32 << 20) - 1]:
        data = wire.encode_string("") + bytes(length - 4)
        assert [kind for kind, _ in raw.option(Option.INFO, data)] == [OptionReply.ERR_TOO_BIG]
    assert raw.go()[0] == SIZE


@pytest.mark.parametrize("length", [(32 << 20) + 1, 0xFFFFFFFF])
def test_option_over_32mib_closes(serve, image: Path, length: int) -> None:
    srv = serve("-f", "raw", "-t", "-e", "4", str(image))
    raw = Raw(srv.port)
    raw.send(wire.OPTION_HEADER.pack(IHAVEOPT, Option.INFO, length) + bytes(4096))
    assert raw.wait_closed() == b""
    assert srv.alive()
    roundtrip(connect(srv), 0, seed=7)


@pytest.mark.parametrize("unknown", [1 << 2, 1 << 8, 1 << 31, 0xFFFFFFFC])
def test_unknown_client_flags_close(serve, image: Path, unknown: int) -> None:
    srv = serve("-f", "raw", "-t", "-e", "4", str(image))
    raw = Raw(srv.port, OK_FLAGS | unknown)
    raw.send(wire.encode_option(Option.LIST))  # a server that accepted the flags would answer this
    assert raw.wait_closed() == b"", "the server MUST close on unknown client flags"
    assert srv.alive()


# -- --shared ---------------------------------------------------------------------


def test_shared_limit(serve, image: Path) -> None:
    srv = serve("-f", "raw", "-t", "-e", "2", str(image))
    a, b = connect(srv), connect(srv)
    err = nbd_error(lambda: connect(srv))
    assert "policy" in err.string, err.string
    refused = Raw(srv.port)
    # Admission happens at GO: a client over the limit may still look around.
    assert refused.option(Option.LIST)[-1][0] == OptionReply.ACK
    assert refused.option(Option.STRUCTURED_REPLY) == [(OptionReply.ACK, b"")]
    assert refused.option(Option.INFO, GO_DATA)[-1][0] == OptionReply.ACK
    [(kind, message)] = refused.option(Option.GO, GO_DATA)
    assert kind == OptionReply.ERR_POLICY and b"--shared" in message, message
    roundtrip(a, 0, seed=8)
    roundtrip(b, 4096, seed=9)
    assert a.pread(4096, 4096) == b.pread(4096, 4096)
    b.shutdown()
    del b
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            c = connect(srv)
            break
        except nbd.Error:
            assert time.monotonic() < deadline, "no client admitted after one left"
            time.sleep(0.05)
    roundtrip(c, 8192, seed=10)
    roundtrip(a, 12288, seed=11)
    assert refused.option(Option.ABORT) == [(OptionReply.ACK, b"")]


# -- garbage at every stage -----------------------------------------------------

CASES = 20


def _garbage(rng: random.Random, minimum: int, maximum: int, bad_prefix: Callable[[bytes], bool]) -> bytes:
    while True:
        data = rng.randbytes(rng.randint(minimum, maximum))
        if bad_prefix(data):
            return data


def _fuzz_client_flags(raw: Raw, rng: random.Random) -> None:
    raw.send(_garbage(rng, 4, 64, lambda d: int.from_bytes(d[:4], "big") & ~int(OK_FLAGS) != 0))
    assert raw.wait_closed() == b""


def _fuzz_option_header(raw: Raw, rng: random.Random) -> None:
    for _ in range(rng.randint(0, 2)):
        assert raw.option(Option.LIST)[-1][0] == OptionReply.ACK
    raw.send(_garbage(rng, 16, 200, lambda d: d[:8] != wire.U64.pack(IHAVEOPT)))
    assert raw.wait_closed() == b""


def _fuzz_option_data(raw: Raw, rng: random.Random) -> None:
    if rng.random() < 0.5:
        assert raw.option(Option.STRUCTURED_REPLY) == [(OptionReply.ACK, b"")]
    option = rng.choice(
        [
            Option.INFO,
            Option.GO,
            Option.LIST,
            Option.STARTTLS,
            Option.STRUCTURED_REPLY,
            Option.LIST_META_CONTEXT,
            Option.SET_META_CONTEXT,
            0x1234,
        ]
    )
    data = rng.randbytes(rng.randint(1, 300))
    if option in (Option.INFO, Option.GO, Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT) and rng.random() < 0.5:
        data = wire.encode_string(rng.choice(["", "nosuch", "\u00e9"])) + data  # a valid name, then garbage
    overrun = rng.random() < 0.3  # more bytes than the header says: the rest is a garbage header
    extra = _garbage(rng, 16, 64, lambda d: d[:8] != wire.U64.pack(IHAVEOPT)) if overrun else b""
    raw.send(wire.encode_option(option, data) + extra)
    if overrun:  # the server may drop the connection before or after replying
        rest = raw.wait_closed()
        if rest:
            header = wire.decode_option_reply_header(rest[: wire.OPTION_REPLY_HEADER.size])
            assert len(rest) == wire.OPTION_REPLY_HEADER.size + header.length
            assert header.option == option and header.reply & (1 << 31), header
    else:  # an error reply, and the stream is still in sync
        header, _ = raw.reply()
        assert header.option == option and header.reply & (1 << 31), header
        assert raw.go(option=Option.INFO)[0] == SIZE
        assert raw.option(Option.ABORT) == [(OptionReply.ACK, b"")]
        assert raw.wait_closed() == b""


def _fuzz_transmission(raw: Raw, rng: random.Random) -> None:
    structured = rng.random() < 0.5
    raw.go(structured=structured)
    raw.request(Command.READ, 1, 0, 512, flags=CommandFlag.DF if structured else 0)
    if structured:
        raw.chunks()
    else:
        assert raw.simple_reply(512)[:2] == (1, 0)
    raw.send(_garbage(rng, 28, 300, lambda d: d[:4] != wire.U32.pack(REQUEST_MAGIC)))
    assert raw.wait_closed() == b""


def _fuzz_request_fields(raw: Raw, rng: random.Random) -> None:
    """Well-framed requests with random fields are refused; the stream stays in sync."""
    raw.go()
    for handle in range(rng.randint(1, 5)):
        command = rng.choice(
            [
                Command.READ,
                Command.TRIM,
                Command.CACHE,
                Command.WRITE_ZEROES,
                Command.BLOCK_STATUS,
                rng.randint(8, 0xFFFF),
            ]
        )
        raw.request(
            command, handle, rng.randint(SIZE + 1, 2**64 - 1), rng.randint(0, 2**32 - 1), rng.randint(0, 0xFFFF)
        )
        got_handle, error, _ = raw.simple_reply()
        assert got_handle == handle and error in (Errno.EINVAL, Errno.ENOSPC), (command, error)
    raw.request(Command.READ, 99, 0, 16)
    assert raw.simple_reply(16)[:2] == (99, 0)
    raw.request(Command.DISC, 100, 0, 0)
    assert raw.wait_closed() == b""


FUZZ_STAGES = {
    "client_flags": _fuzz_client_flags,
    "option_header": _fuzz_option_header,
    "option_data": _fuzz_option_data,
    "transmission": _fuzz_transmission,
    "request_fields": _fuzz_request_fields,
}


@pytest.mark.parametrize("stage", list(FUZZ_STAGES))
def test_garbage_drops_only_that_connection(serve, image: Path, stage: str) -> None:
    srv = serve("-f", "raw", "-t", "-e", "8", str(image))
    steady = connect(srv)
    rng = random.Random(f"sendense-{stage}")
    for case in range(CASES):
        raw = Raw(srv.port, client_flags=None if stage == "client_flags" else OK_FLAGS)
        try:
            FUZZ_STAGES[stage](raw, rng)
        except (AssertionError, EOFError, OSError) as exc:
            raise AssertionError(f"{stage} case {case}: {exc}") from exc
        finally:
            raw.close()
        roundtrip(steady, case * 4096, seed=case)
    assert srv.alive()
    late = connect(srv)
    assert late.pread(4096, 0) == random.Random(0).randbytes(4096)
    steady.shutdown()
    late.shutdown()
    assert srv.alive()
