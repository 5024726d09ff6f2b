"""The client over TLS against our own server, in process: nbds:// and nbds+unix://
URIs, CA verification, pinned fingerprints, host names, mutual TLS, the refusals a
plaintext client or a server without TLS get, a pool of TLS connections."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sendense_nbd import Export, NBDServer, memory_device
from sendense_nbd.client import ConnectionPool, OptionError, connect, export_info, list_exports
from sendense_nbd.errors import ProtocolError, TLSError
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.tls import server_context
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
        with pytest.raises((TLSError, ProtocolError), match="client certificate"):
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
