"""Our client over TLS against real servers: qemu-nbd (``--object tls-creds-x509 --tls-creds``) and
nbdkit (``--tls=require --tls-certificates``), judged by nbdcopy.

Reads, writes and ``sendense-nbd copy`` with several connections over ``nbds://``; mutual TLS with
and without a client certificate; a server certificate from another CA, an expired one and one
for another host name each refused with a sentence saying which; the pin and ``tls-hostname=``
overrides; a plaintext ``nbd://`` client told that the server requires TLS.
"""

from __future__ import annotations

import random
import ssl
import subprocess
from pathlib import Path

import pytest

from sendense_nbd.client import connect
from sendense_nbd.errors import SendenseError
from sendense_nbd.tls import fingerprint
from tests.conftest import server_command
from tests.tls.peers import OTHER_NAME, Endpoint, Pki, TLSPeers, nbdcopy_out

pytestmark = pytest.mark.peer

MiB = 1 << 20
SERVERS = ["qemu-nbd", "nbdkit"]


def start(
    kind: str, pki: Pki, image: Path, peers: TLSPeers, *, creds: Path | None = None, mutual: bool = False
) -> Endpoint:
    """qemu-nbd serving ``image``, or nbdkit serving a copy of it in memory, over TLS."""
    creds = creds or pki.server
    if kind == "qemu-nbd":
        return peers.qemu_nbd(image, creds, verify_client=mutual)
    return peers.nbdkit(creds, "--filter=cow", "file", str(image), verify_client=mutual)


async def refusal(uri: str) -> str:
    """Connecting to ``uri`` fails; the error's text."""
    with pytest.raises(SendenseError) as caught:
        async with connect(uri, timeout=10) as nbd:
            await nbd.pread(offset=0, length=4096)
    return str(caught.value)


@pytest.mark.parametrize("kind", SERVERS)
async def test_reads_and_writes_over_tls(
    kind: str, pki: Pki, image: Path, tls_peers: TLSPeers, image_data: bytes
) -> None:
    server = start(kind, pki, image, tls_peers)
    expected = bytearray(image_data)
    async with connect(server.uri(pki.anonymous), timeout=10) as nbd:
        assert nbd.size == len(expected)
        assert await nbd.pread(offset=0, length=len(expected)) == expected
        rng = random.Random(7)
        for _ in range(16):
            offset, data = rng.randrange(0, len(expected) - 65536), rng.randbytes(rng.randrange(1, 65536))
            await nbd.pwrite(data, offset=offset)
            expected[offset : offset + len(data)] = data
        await nbd.flush()
        assert await nbd.pread(offset=0, length=len(expected)) == expected
    assert nbdcopy_out(server.uri(pki.anonymous)) == expected


@pytest.mark.parametrize("kind", SERVERS)
async def test_mutual_tls(kind: str, pki: Pki, image: Path, tls_peers: TLSPeers, image_data: bytes) -> None:
    server = start(kind, pki, image, tls_peers, mutual=True)
    async with connect(server.uri(pki.client), timeout=10) as nbd:
        assert await nbd.pread(offset=0, length=MiB) == image_data[:MiB]
    for creds in (pki.anonymous, pki.foreign_client, pki.expired_client):
        message = await refusal(server.uri(creds))
        assert "client certificate" in message, message


async def test_bad_server_certificates_are_refused(
    pki: Pki, image: Path, tls_peers: TLSPeers, image_data: bytes
) -> None:
    good = tls_peers.qemu_nbd(image, pki.server)
    expired = tls_peers.nbdkit(pki.expired_server, "memory", "1M")
    wrong_name = tls_peers.qemu_nbd(image, pki.wrong_name_server)
    assert "not signed by a CA this side trusts" in await refusal(good.uri(pki.wrong_ca))
    assert "has expired" in await refusal(expired.uri(pki.anonymous))
    message = await refusal(wrong_name.uri(pki.anonymous))
    assert "not valid for the host name '127.0.0.1'" in message, message
    async with connect(wrong_name.uri(pki.anonymous, **{"tls-hostname": OTHER_NAME}), timeout=10) as nbd:
        assert nbd.size == len(image_data)
    async with connect(good.uri(pki.wrong_ca, **{"tls-verify-peer": "false"}), timeout=10) as nbd:
        assert nbd.size == len(image_data)


async def test_a_pinned_certificate(pki: Pki, image: Path, tls_peers: TLSPeers, image_data: bytes) -> None:
    """A pin replaces the CA: the wrong-name server is accepted by its fingerprint, another pin refused."""
    server = tls_peers.qemu_nbd(image, pki.wrong_name_server)
    pin = fingerprint(ssl.PEM_cert_to_DER_cert((pki.wrong_name_server / "server-cert.pem").read_text()))
    uri = f"nbds://127.0.0.1:{server.port}/disk?tls-fingerprint={pin}"
    async with connect(uri, timeout=10) as nbd:
        assert await nbd.pread(offset=0, length=4096) == image_data[:4096]
    other = fingerprint(ssl.PEM_cert_to_DER_cert((pki.server / "server-cert.pem").read_text()))
    assert "not the pinned" in await refusal(f"nbds://127.0.0.1:{server.port}/disk?tls-fingerprint={other}")


async def test_nbds_unix_checks_the_name_localhost(
    pki: Pki, image: Path, tls_peers: TLSPeers, image_data: bytes
) -> None:
    """Over a unix socket the certificate must be for ``localhost`` (or ``tls-hostname=``), CA checked."""
    good = tls_peers.qemu_nbd_unix(image, pki.server)
    async with connect(f"nbds+unix:///disk?socket={good}&tls-certificates={pki.anonymous}", timeout=10) as nbd:
        assert await nbd.pread(offset=0, length=MiB) == image_data[:MiB]
    assert "not signed by a CA" in await refusal(f"nbds+unix:///disk?socket={good}&tls-certificates={pki.wrong_ca}")
    other = tls_peers.qemu_nbd_unix(image, pki.wrong_name_server)
    message = await refusal(f"nbds+unix:///disk?socket={other}&tls-certificates={pki.anonymous}")
    assert "not valid for the host name 'localhost'" in message, message
    uri = f"nbds+unix:///disk?socket={other}&tls-certificates={pki.anonymous}&tls-hostname={OTHER_NAME}"
    async with connect(uri, timeout=10) as nbd:
        assert nbd.size == len(image_data)


@pytest.mark.parametrize("kind", SERVERS)
async def test_a_plaintext_client_is_told_tls_is_required(
    kind: str, pki: Pki, image: Path, tls_peers: TLSPeers
) -> None:
    server = start(kind, pki, image, tls_peers)
    message = await refusal(server.uri())
    assert "requires TLS" in message and "nbds://" in message, message


async def test_a_server_offering_tls(pki: Pki, image: Path, tls_peers: TLSPeers, image_data: bytes) -> None:
    """nbdkit ``--tls=on`` (TLS offered, not required): nbds:// gets TLS, nbd:// stays plaintext."""
    server = tls_peers.nbdkit(pki.server, "--filter=cow", "file", str(image), tls="on")
    for uri in (server.uri(pki.anonymous), server.uri()):
        async with connect(uri, timeout=10) as nbd:
            assert await nbd.pread(offset=0, length=MiB) == image_data[:MiB]
    assert "not signed by a CA" in await refusal(server.uri(pki.wrong_ca))


def test_copy_between_tls_servers(pki: Pki, image: Path, tls_peers: TLSPeers, image_data: bytes) -> None:
    """``sendense-nbd copy`` from qemu-nbd to nbdkit, both over TLS, four connections, verified."""
    source = tls_peers.qemu_nbd(image, pki.server)
    target = tls_peers.nbdkit(pki.server, "memory", "4M")
    cmd = server_command("copy", "-C", "4", "--verify", source.uri(pki.client), target.uri(pki.client))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert nbdcopy_out(target.uri(pki.anonymous)) == image_data


def test_copy_with_credentials_given_on_the_command_line(
    pki: Pki, image: Path, tls_peers: TLSPeers, image_data: bytes, tmp_path: Path
) -> None:
    """``copy --tls-creds DIR`` for two nbds:// URIs: nbdkit to qemu-nbd, both asking for our client certificate."""
    target_image = tmp_path / "target.raw"
    target_image.write_bytes(bytes(len(image_data)))
    source = start("nbdkit", pki, image, tls_peers, mutual=True)
    target = tls_peers.qemu_nbd(target_image, pki.server, verify_client=True)
    cmd = server_command("copy", "-C", "4", "--tls-creds", str(pki.client), source.nbds, target.nbds)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert target_image.read_bytes() == image_data


def test_copy_with_a_pin_on_the_command_line(pki: Pki, image: Path, tls_peers: TLSPeers, image_data: bytes) -> None:
    """``copy --tls-fingerprint`` trusts exactly that certificate (both servers have it), and no other."""
    source = tls_peers.qemu_nbd(image, pki.server)
    target = tls_peers.nbdkit(pki.server, "memory", "4M")
    pin = fingerprint(ssl.PEM_cert_to_DER_cert((pki.server / "server-cert.pem").read_text()))
    result = subprocess.run(
        server_command("copy", "--tls-fingerprint", pin, source.nbds, target.nbds),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert nbdcopy_out(target.uri(pki.anonymous)) == image_data
    other = tls_peers.qemu_nbd(image, pki.wrong_name_server)
    result = subprocess.run(
        server_command("copy", "--tls-fingerprint", pin, other.nbds, target.nbds),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and "not the pinned" in result.stderr, result.stderr
