"""The server over TLS (NBD_OPT_STARTTLS), in process, driven by a small stdlib client:
the upgrade and transmission over it, require-mode refusals, plaintext injected after
STARTTLS, a TLS handshake that fails or stalls dropping only its own client."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sendense_nbd import Export, NBDServer, ServerError, memory_device
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import Command, Option, OptionReply, TLSMode
from sendense_nbd.server import connection
from sendense_nbd.tls import client_context, server_context
from sendense_nbd.tls.pki import Layout, init_pki
from tests.conftest import server_command
from tests.server.test_hardening import until

MiB = 1 << 20
DATA = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return init_pki(tmp_path_factory.mktemp("pki"), nodes=["node1"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return init_pki(tmp_path_factory.mktemp("other"))


def _device() -> object:
    device = memory_device(MiB)
    device.write(offset=0, data=DATA)
    return device


@pytest.fixture
async def server(pki: Layout) -> AsyncIterator[NBDServer]:
    async with NBDServer(
        [Export("disk", _device())],  # type: ignore[arg-type]
        port=0,
        shared=8,
        persistent=True,
        handshake_limit=2,
        tls=TLSMode.REQUIRE,
        tls_context=server_context(pki.hub),
    ) as nbd:
        yield nbd


async def _option(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, option: int, data: bytes = b""
) -> list[int]:
    """Send an option; the reply types up to its final one."""
    writer.write(wire.encode_option(option, data))
    types = []
    while True:
        raw = await asyncio.wait_for(reader.readexactly(20), 10)
        _, _, reply, length = struct.unpack(">QIII", raw)
        await reader.readexactly(length)
        types.append(reply)
        if reply == OptionReply.ACK and option != Option.GO or reply & (1 << 31) or reply == OptionReply.ACK:
            return types


async def _greeted(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(reader.readexactly(wire.GREETING.size), 10)
    writer.write(wire.CLIENT_FLAGS.pack(3))
    return reader, writer


async def _upgraded(port: int, context: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _greeted(port)
    assert await _option(reader, writer, Option.STARTTLS) == [OptionReply.ACK]
    await asyncio.wait_for(writer.start_tls(context, server_hostname="localhost"), 10)
    return reader, writer


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


async def _read_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, offset: int, length: int) -> bytes:
    writer.write(wire.encode_request(Command.READ, 7, offset, length))
    magic, error, handle = struct.unpack(">IIQ", await asyncio.wait_for(reader.readexactly(16), 10))
    assert (error, handle) == (0, 7)
    return await reader.readexactly(length)


def _go(name: str = "disk") -> bytes:
    return wire.encode_string(name) + wire.U16.pack(0)


async def test_require_refuses_plaintext_then_serves_over_tls(server: NBDServer, pki: Layout) -> None:
    assert server.port is not None
    reader, writer = await _greeted(server.port)
    assert await _option(reader, writer, Option.GO, _go()) == [OptionReply.ERR_TLS_REQD]
    assert await _option(reader, writer, Option.LIST) == [OptionReply.ERR_TLS_REQD]
    assert await _option(reader, writer, Option.STARTTLS) == [OptionReply.ACK]
    await asyncio.wait_for(writer.start_tls(client_context(pki.ca_cert.parent), server_hostname="localhost"), 10)
    assert writer.get_extra_info("ssl_object").version() in ("TLSv1.3", "TLSv1.2")
    assert await _option(reader, writer, Option.STARTTLS) == [OptionReply.ERR_INVALID]
    assert (await _option(reader, writer, Option.GO, _go()))[-1] == OptionReply.ACK
    assert await _read_over(reader, writer, 0, MiB) == DATA
    assert await _read_over(reader, writer, 4096, 100) == DATA[4096:4196]
    writer.close()


async def test_export_name_before_tls_closes(server: NBDServer) -> None:
    assert server.port is not None
    reader, writer = await _greeted(server.port)
    writer.write(wire.encode_option(Option.EXPORT_NAME, b"disk"))
    assert await _closed(reader)


async def test_plaintext_injected_after_starttls_closes_without_an_ack(server: NBDServer) -> None:
    assert server.port is not None
    reader, writer = await _greeted(server.port)
    writer.write(wire.encode_option(Option.STARTTLS) + wire.encode_option(Option.GO, _go()))
    assert await asyncio.wait_for(reader.read(), 10) == b""


async def test_a_failed_tls_handshake_drops_only_that_client(
    server: NBDServer, pki: Layout, other_pki: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    assert server.port is not None
    good_reader, good_writer = await _upgraded(server.port, client_context(pki.ca_cert.parent))
    assert (await _option(good_reader, good_writer, Option.GO, _go()))[-1] == OptionReply.ACK
    with pytest.raises(ssl.SSLCertVerificationError):
        await _upgraded(server.port, client_context(other_pki.ca_cert.parent))  # trusts another CA
    reader, writer = await _greeted(server.port)
    assert await _option(reader, writer, Option.STARTTLS) == [OptionReply.ACK]
    writer.write(b"GET / HTTP/1.0\r\n\r\n")  # not TLS
    assert await _closed(reader)
    assert "TLS handshake failed" in caplog.text
    assert await _read_over(good_reader, good_writer, 0, 4096) == DATA[:4096]
    reader, writer = await _upgraded(server.port, client_context(pki.ca_cert.parent))
    assert (await _option(reader, writer, Option.GO, _go()))[-1] == OptionReply.ACK
    assert server.client_count == 2


async def test_the_handshake_deadline_holds_during_the_tls_handshake(server: NBDServer) -> None:
    assert server.port is not None
    loop = asyncio.get_running_loop()
    reader, writer = await _greeted(server.port)
    assert await _option(reader, writer, Option.STARTTLS) == [OptionReply.ACK]
    started = loop.time()
    assert await _closed(reader)  # no ClientHello ever comes
    assert loop.time() - started < 5


async def test_a_tls_handshake_past_the_limit_is_said_once(server: NBDServer, caplog: pytest.LogCaptureFixture) -> None:
    """STARTTLS a second in, then no ClientHello: dropped at the handshake limit (2 s after connecting,
    not after STARTTLS), with one warning naming --handshake-limit, whoever of the TLS handshake's
    timeout and the watchdog ends it."""
    assert server.port is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await _greeted(server.port)
    peer = str(writer.get_extra_info("sockname"))
    await asyncio.sleep(1)
    with caplog.at_level(logging.INFO, logger="sendense_nbd.server"):
        assert await _option(reader, writer, Option.STARTTLS) == [OptionReply.ACK]
        assert await _closed(reader)
        assert loop.time() - started < 2.6
        await asyncio.sleep(0.2)  # the other of the two would have logged by now
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and peer in r.getMessage()]
    assert len(warnings) == 1 and "--handshake-limit" in warnings[0], warnings
    assert server.client_count == 0


async def test_mutual_tls_needs_a_client_certificate(pki: Layout) -> None:
    async with NBDServer(
        [Export("disk", _device())],  # type: ignore[arg-type]
        port=0,
        persistent=True,
        tls=TLSMode.REQUIRE,
        tls_context=server_context(pki.hub, verify_client=True),
    ) as nbd:
        assert nbd.port is not None
        reader, writer = await _upgraded(nbd.port, client_context(pki.nodes["node1"]))
        assert (await _option(reader, writer, Option.GO, _go()))[-1] == OptionReply.ACK
        writer.close()
        reader, writer = await _greeted(nbd.port)
        assert await _option(reader, writer, Option.STARTTLS) == [OptionReply.ACK]
        try:
            await asyncio.wait_for(
                writer.start_tls(client_context(pki.ca_cert.parent), server_hostname="localhost"), 10
            )
            refused = await _closed(reader)  # TLS 1.3: the client learns after its handshake
        except (ssl.SSLError, ConnectionResetError):
            refused = True
        assert refused


async def test_allow_serves_plaintext_and_off_refuses_starttls(pki: Layout) -> None:
    async with NBDServer(
        [Export("disk", _device())],  # type: ignore[arg-type]
        port=0,
        persistent=True,
        shared=2,
        tls=TLSMode.ALLOW,
        tls_context=server_context(pki.hub),
    ) as nbd:
        assert nbd.port is not None
        reader, writer = await _greeted(nbd.port)
        assert (await _option(reader, writer, Option.GO, _go()))[-1] == OptionReply.ACK
        assert await _read_over(reader, writer, 0, 512) == DATA[:512]
    async with NBDServer([Export("disk", _device())], port=0) as nbd:  # type: ignore[arg-type]
        assert nbd.port is not None
        reader, writer = await _greeted(nbd.port)
        assert await _option(reader, writer, Option.STARTTLS) == [OptionReply.ERR_POLICY]


def test_tls_needs_credentials_and_credentials_need_tls(pki: Layout) -> None:
    device = memory_device(MiB)
    with pytest.raises(ServerError, match="--tls-creds"):
        NBDServer([Export("disk", device)], tls=TLSMode.REQUIRE)
    with pytest.raises(ServerError, match="--tls allow or require"):
        NBDServer([Export("disk", device)], tls_context=server_context(pki.hub))


def test_client_certificates_need_require_not_allow(pki: Layout, tmp_path: Path) -> None:
    """Under allow a client that skips STARTTLS would be served without the certificate mutual TLS asks."""
    device = memory_device(MiB)
    with pytest.raises(ServerError, match="need --tls require"):
        NBDServer([Export("disk", device)], tls=TLSMode.ALLOW, tls_context=server_context(pki.hub, verify_client=True))
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    args = ["serve", "--port", "0", "--tls", "allow", "--tls-creds", str(pki.hub), "--tls-verify-client", str(disk)]
    result = subprocess.run(server_command(*args), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--tls-verify-client needs --tls require" in " ".join(result.stderr.split())


def _patterned(size: int) -> bytes:
    return b"".join(i.to_bytes(4, "big") * 1024 for i in range(size // 4096))


async def _upgraded_small_window(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Over TLS with a 4 KiB receive buffer: the server's replies back up as soon as this client pauses."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    await asyncio.wait_for(reader.readexactly(wire.GREETING.size), 10)
    writer.write(wire.CLIENT_FLAGS.pack(3))
    assert await _option(reader, writer, Option.STARTTLS) == [OptionReply.ACK]
    await asyncio.wait_for(writer.start_tls(context, server_hostname="localhost"), 10)
    assert (await _option(reader, writer, Option.GO, _go()))[-1] == OptionReply.ACK
    return reader, writer


async def test_replies_over_tls_stay_whole_when_the_client_reads_late(pki: Layout) -> None:
    """Large replies are encrypted a piece at a time: pipelined READs and WRITEs, answered while
    the socket is backed up, must still come back each whole, never interleaved."""
    size = 16 * MiB
    data = _patterned(size)
    device = memory_device(size)
    device.write(offset=0, data=data)
    async with NBDServer(
        [Export("disk", device)], port=0, tls=TLSMode.REQUIRE, tls_context=server_context(pki.hub)
    ) as nbd:
        assert nbd.port is not None
        reader, writer = await _upgraded_small_window(nbd.port, client_context(pki.ca_cert.parent))
        expected: dict[int, bytes] = {}
        for handle in range(1, 41):
            offset, length = (handle * 389 * 1024) % (size - 2 * MiB), [100, 300 * 1024, 2 * MiB, 4096][handle % 4]
            if handle % 5 == 0:
                writer.write(wire.encode_request(Command.WRITE, handle, size - 4096, 4096) + data[:4096])
                expected[handle] = b""
            else:
                writer.write(wire.encode_request(Command.READ, handle, offset, length))
                expected[handle] = data[offset : offset + length]
        await writer.drain()
        await asyncio.sleep(0.5)  # the replies back up in the server
        while expected:
            magic, error, handle = struct.unpack(">IIQ", await asyncio.wait_for(reader.readexactly(16), 10))
            assert (magic, error) == (0x67446698, 0) and handle in expected, (hex(magic), error, handle)
            want = expected.pop(handle)
            assert await asyncio.wait_for(reader.readexactly(len(want)), 10) == want, f"reply {handle}"
        writer.close()


async def test_unread_replies_over_tls_time_out(pki: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that never reads its replies is dropped at --io-timeout, also when all that waits is
    encrypted in the socket's transport, under the TLS one: one reply of less than a piece, and a
    server socket buffer too small for it."""

    def small_send_buffer(sock: socket.socket, **_: object) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)

    monkeypatch.setattr(connection, "tune_socket", small_send_buffer)
    async with NBDServer(
        [Export("disk", memory_device(MiB))],
        port=0,
        io_timeout=1.0,
        tls=TLSMode.REQUIRE,
        tls_context=server_context(pki.hub),
    ) as nbd:
        assert nbd.port is not None
        reader, writer = await _upgraded_small_window(nbd.port, client_context(pki.ca_cert.parent))
        writer.write(wire.encode_request(Command.READ, 1, 0, 240 * 1024))
        await until(lambda: nbd.client_count == 0, 8, "the client that reads nothing dropped")
        writer.transport.abort()
