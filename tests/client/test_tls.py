"""The client over TLS against our own server, in process: nbds:// and nbds+unix://
URIs, CA verification, pinned fingerprints, host names, mutual TLS, the refusals a
plaintext client or a server without TLS get, a pool of TLS connections. Small
servers in a thread send what ours never does: option replies in the flight of the
TLS handshake's last message, a reset in the middle of the TLS handshake."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from sendense_nbd import Export, NBDServer, memory_device
from sendense_nbd.client import ClientOptions, ConnectionPool, OptionError, connect, export_info, list_exports
from sendense_nbd.copy.endpoints import NBDEndpoint
from sendense_nbd.errors import EndpointError, NBDConnectionError, TLSError
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import Option, OptionReply, TLSMode
from sendense_nbd.tls import client_context, server_context
from sendense_nbd.tls.pki import Layout, init_pki

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return init_pki(tmp_path_factory.mktemp("pki"), nodes=["node1"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return init_pki(tmp_path_factory.mktemp("other"))


def _server(pki: Layout, *, verify_client: bool = False, **kwargs: object) -> NBDServer:
    device = memory_device(8 * MiB)
    device.write(offset=0, data=os.urandom(8 * MiB))
    options: dict[str, object] = {"port": 0, "shared": 8, "persistent": True, "tls": TLSMode.REQUIRE}
    options.update(kwargs)
    return NBDServer(
        [Export("disk", device)],
        tls_context=server_context(pki.hub, verify_client=verify_client) if options["tls"] is not TLSMode.OFF else None,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
async def server(pki: Layout) -> AsyncIterator[NBDServer]:
    async with _server(pki) as nbd:
        yield nbd


def _uri(server: NBDServer, query: str = "", host: str = "localhost") -> str:
    return f"nbds://{host}:{server.port}/disk" + (f"?{query}" if query else "")


def _pin(pki: Layout) -> str:
    der = ssl.PEM_cert_to_DER_cert((pki.hub / "server-cert.pem").read_text())
    return "sha256:" + hashlib.sha256(der).hexdigest()


async def test_reads_and_writes_over_tls(server: NBDServer, pki: Layout) -> None:
    async with connect(_uri(server, f"tls-certificates={pki.hub}")) as nbd:
        assert nbd.tls_version in ("TLSv1.3", "TLSv1.2")
        assert nbd.structured_replies and nbd.can_block_status
        data = os.urandom(4 * MiB + 512)
        await nbd.pwrite(data, offset=1024)
        buffer = bytearray(len(data))
        await nbd.pread_into(buffer, offset=1024)
        assert buffer == data
        assert await nbd.pread(offset=1024, length=100) == data[:100]
        await nbd.flush()
        assert await nbd.extents()


async def test_unix_socket_with_tls(pki: Layout, tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    async with _server(pki, port=None, unix_path=sock) as nbd:
        assert nbd.port is None
        async with connect(f"nbds+unix:///disk?socket={sock}&tls-certificates={pki.hub}") as client:
            assert client.tls_version is not None  # checked against "localhost"
            assert len(await client.pread(offset=0, length=4096)) == 4096


async def test_a_pinned_fingerprint_replaces_the_ca(server: NBDServer, pki: Layout) -> None:
    async with connect(_uri(server, f"tls-fingerprint={_pin(pki)}", host="127.0.0.1")) as nbd:
        assert nbd.tls_version is not None
    wrong = "sha256:" + "00" * 32
    with pytest.raises(TLSError, match="not the pinned"):
        await connect(_uri(server, f"tls-fingerprint={wrong}"))


async def test_wrong_ca_and_wrong_host_name_are_clear_errors(server: NBDServer, pki: Layout, other_pki: Layout) -> None:
    with pytest.raises(TLSError, match="not signed by a CA"):
        await connect(_uri(server, f"tls-certificates={other_pki.hub}"))
    with pytest.raises(TLSError, match="host name 'elsewhere'"):
        await connect(_uri(server, f"tls-certificates={pki.hub}&tls-hostname=elsewhere"))
    async with connect(_uri(server, f"tls-certificates={pki.hub}&tls-verify-peer=false", host="127.0.0.1")) as nbd:
        assert nbd.tls_version is not None  # encryption without authentication, as asked


async def test_plaintext_client_is_told_the_server_requires_tls(server: NBDServer) -> None:
    with pytest.raises(OptionError, match="requires TLS.*nbds://"):
        await connect(f"nbd://localhost:{server.port}/disk")


async def test_tls_client_against_a_plaintext_server(pki: Layout) -> None:
    async with _server(pki, tls=TLSMode.OFF) as nbd:
        with pytest.raises(OptionError, match="STARTTLS.*TLS is required"):
            await connect(_uri(nbd, f"tls-certificates={pki.hub}"))


async def test_mutual_tls(pki: Layout) -> None:
    async with _server(pki, verify_client=True) as nbd:
        async with connect(_uri(nbd, f"tls-certificates={pki.nodes['node1']}")) as client:
            assert client.tls_version is not None
            assert len(await client.pread(offset=0, length=512)) == 512
        # TLS 1.3: the client's handshake is over when the server refuses it.
        with pytest.raises(TLSError, match="client certificate"):
            await connect(_uri(nbd, f"tls-certificates={pki.hub}"))


async def test_list_and_info_over_tls(server: NBDServer, pki: Layout) -> None:
    uri = _uri(server, f"tls-certificates={pki.hub}")
    assert [e.name for e in await list_exports(uri)] == ["disk"]
    info = await export_info(uri)
    assert info.export.size == 8 * MiB


async def test_a_pool_of_tls_connections(server: NBDServer, pki: Layout) -> None:
    async with ConnectionPool(_uri(server, f"tls-certificates={pki.hub}"), 4) as pool:
        assert len(pool) == 4
        assert {c.tls_version for c in pool.connections} <= {"TLSv1.3", "TLSv1.2"}
        first = await pool.next().pread(offset=0, length=MiB)
        assert await pool.next().pread(offset=0, length=MiB) == first


# -- a pinned context carries its pin -----------------------------------------------------------


async def test_a_pinned_context_without_its_pin_is_refused(server: NBDServer, pki: Layout) -> None:
    """client_context(fingerprint=) checks nothing itself: without the pin it would take any server."""
    pinned = client_context(fingerprint=_pin(pki))
    with pytest.raises(TLSError, match="checks no certificate.*tls-verify-peer=false"):
        await connect(_uri(server), tls_context=pinned)
    with pytest.raises(TLSError, match="checks no certificate"):
        await ConnectionPool(_uri(server), 2, options=ClientOptions(tls_context=pinned)).open()
    async with connect(_uri(server), tls_context=pinned, tls_fingerprint=_pin(pki).upper()) as nbd:
        assert nbd.tls_version is not None
    with pytest.raises(TLSError, match="not the pinned"):
        await connect(_uri(server), tls_context=pinned, tls_fingerprint="sha256:" + "00" * 32)
    async with connect(_uri(server, "tls-verify-peer=false"), tls_context=client_context(verify_peer=False)) as nbd:
        assert nbd.tls_version is not None  # unchecked, as the URI says


# -- servers that are not ours ----------------------------------------------------------------------


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the client hung up")
        data += chunk
    return data


def _to_starttls(conn: socket.socket) -> None:
    """Greet, take the client's flags and its NBD_OPT_STARTTLS, acknowledge it."""
    conn.sendall(wire.encode_greeting(3))
    _exactly(conn, wire.CLIENT_FLAGS.size)
    _, option, length = wire.OPTION_HEADER.unpack(_exactly(conn, wire.OPTION_HEADER.size))
    assert (option, length) == (Option.STARTTLS, 0)
    conn.sendall(wire.encode_option_reply(Option.STARTTLS, OptionReply.ACK))


@contextmanager
def _one_client(serve: Callable[[socket.socket], None]) -> Iterator[tuple[int, Future[None]]]:
    """A listener on 127.0.0.1 whose first client ``serve`` handles in a thread."""
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        listener.settimeout(10)

        def run() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with conn:
                serve(conn)

        yield listener.getsockname()[1], pool.submit(run)


def _tls_then_early(context: ssl.SSLContext, early: bytes) -> Callable[[socket.socket], None]:
    """TLS 1.2 by memory BIOs; ``early`` goes out in the same send as the server's Finished."""

    def serve(conn: socket.socket) -> None:
        _to_starttls(conn)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                conn.sendall(outgoing.read())
                incoming.write(conn.recv(65536) or b"")
        tls.write(early)
        conn.sendall(outgoing.read())
        try:  # read until the client's close_notify (read() gives b""), then hang up
            while data := conn.recv(65536):
                incoming.write(data)
                try:
                    while tls.read(65536):
                        pass
                    return
                except ssl.SSLWantReadError:
                    pass
        except OSError:
            pass  # the client reset it

    return serve


def _tls12(pki: Layout) -> ssl.SSLContext:
    context = server_context(pki.hub)
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # the server's Finished is the handshake's last message
    return context


_LISTED = wire.encode_option_reply(Option.LIST, OptionReply.SERVER, wire.encode_string("disk")) + (
    wire.encode_option_reply(Option.LIST, OptionReply.ACK)
)


async def test_replies_in_the_flight_of_the_servers_finished_are_kept_for_the_handshake(pki: Layout) -> None:
    with _one_client(_tls_then_early(_tls12(pki), _LISTED)) as (port, served):
        uri = f"nbds://127.0.0.1:{port}/?tls-certificates={pki.hub}"
        assert [export.name for export in await list_exports(uri)] == ["disk"]
        served.result(timeout=10)


async def test_the_pin_is_checked_before_bytes_of_the_handshakes_flight_are_read(pki: Layout) -> None:
    wrong = "sha256:" + "00" * 32
    with _one_client(_tls_then_early(_tls12(pki), _LISTED)) as (port, served):
        with pytest.raises(TLSError, match="not the pinned"):
            await list_exports(f"nbds://127.0.0.1:{port}/?tls-fingerprint={wrong}")
        served.result(timeout=10)


def _reset_in_the_tls_handshake(conn: socket.socket) -> None:
    _to_starttls(conn)
    conn.recv(65536)  # the ClientHello
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST


async def test_a_reset_in_the_tls_handshake_is_a_connection_error_and_worth_a_retry(pki: Layout) -> None:
    with _one_client(_reset_in_the_tls_handshake) as (port, served):
        uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki.hub}"
        with pytest.raises(NBDConnectionError, match="lost during the TLS handshake") as caught:
            await connect(uri)
        assert not isinstance(caught.value, TLSError)
        served.result(timeout=10)
    with _one_client(_reset_in_the_tls_handshake) as (port, served):
        uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki.hub}"
        with pytest.raises(EndpointError, match="lost during the TLS handshake") as refused:
            await NBDEndpoint(uri, connections=1).open()
        assert refused.value.transient and uri in str(refused.value)
        served.result(timeout=10)


async def test_a_mutual_tls_refusal_is_a_permanent_copy_error(pki: Layout) -> None:
    async with _server(pki, verify_client=True) as nbd:
        with pytest.raises(EndpointError, match="client certificate") as refused:
            await NBDEndpoint(_uri(nbd, f"tls-certificates={pki.hub}"), connections=1).open()
        assert not refused.value.transient
