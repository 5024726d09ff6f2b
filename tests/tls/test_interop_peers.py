"""The TLS harness proven between real peers: the certificates of ``tests.tls.peers`` work with
qemu-nbd, nbdkit, libnbd (nbdinfo, nbdcopy) and qemu (qemu-img, qemu-io), and each bad one is
refused by them. If one of these fails, the interop tests of our own code cannot be trusted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require, run
from tests.tls.peers import Endpoint, Pki, TLSPeers, nbdcopy_out, qemu_tls_object, refused

pytestmark = pytest.mark.peer


def test_libnbd_reads_qemu_nbd_over_tls(pki: Pki, image: Path, tls_peers: TLSPeers) -> None:
    server = tls_peers.qemu_nbd(image, pki.server)
    assert "with TLS" in run(require("nbdinfo"), server.uri(pki.anonymous), timeout=30).stdout
    assert nbdcopy_out(server.uri(pki.anonymous)) == image.read_bytes()


def test_qemu_io_writes_nbdkit_over_tls(pki: Pki, image: Path, tls_peers: TLSPeers) -> None:
    server = tls_peers.nbdkit(pki.server, "memory", "4M")
    client = qemu_tls_object(pki.anonymous)
    run(require("qemu-img"), "convert", "-n", *client, "-f", "raw", image, "--target-image-opts", server.image_opts())
    run(require("qemu-io"), *client, "--image-opts", server.image_opts(), "-c", "write -P 0x5a 1M 64k")
    expected = bytearray(image.read_bytes())
    expected[1 << 20 : (1 << 20) + 65536] = b"\x5a" * 65536
    assert nbdcopy_out(server.uri(pki.anonymous)) == expected


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_mutual_tls_needs_the_client_certificate(kind: str, pki: Pki, image: Path, tls_peers: TLSPeers) -> None:
    if kind == "qemu-nbd":
        server = tls_peers.qemu_nbd(image, pki.server, verify_client=True)
    else:
        server = tls_peers.nbdkit(pki.server, "file", str(image), verify_client=True)
    assert nbdcopy_out(server.uri(pki.client)) == image.read_bytes()
    run(require("qemu-img"), "info", *qemu_tls_object(pki.client), "--image-opts", server.image_opts())
    for creds in (pki.anonymous, pki.foreign_client, pki.expired_client):
        assert "gnutls" in refused(require("nbdinfo"), server.uri(creds))
    for creds in (pki.anonymous, pki.foreign_client):
        assert "TLS" in refused(
            require("qemu-img"), "info", *qemu_tls_object(creds), "--image-opts", server.image_opts()
        )


def test_bad_server_certificates_are_refused(pki: Pki, image: Path, tls_peers: TLSPeers) -> None:
    good = tls_peers.qemu_nbd(image, pki.server)
    expired = tls_peers.nbdkit(pki.expired_server, "memory", "1M")
    wrong_name = tls_peers.qemu_nbd(image, pki.wrong_name_server)
    assert "certificate verification" in refused(require("nbdinfo"), good.uri(pki.wrong_ca))
    assert "certificate verification" in refused(require("nbdinfo"), expired.uri(pki.anonymous))
    assert "certificate verification" in refused(require("nbdinfo"), wrong_name.uri(pki.anonymous))
    qemu = [require("qemu-img"), "info", *qemu_tls_object(pki.anonymous), "--image-opts"]
    assert "not trusted" in refused(*qemu, expired.image_opts())
    assert "does not match the hostname 127.0.0.1" in refused(*qemu, wrong_name.image_opts())


def test_plaintext_clients_are_told_tls_is_required(pki: Pki, image: Path, tls_peers: TLSPeers) -> None:
    server = tls_peers.qemu_nbd(image, pki.server)
    message = refused(require("qemu-img"), "info", "--image-opts", server.image_opts(tls=False))
    assert "TLS negotiation required" in message
    assert "server error message: Option 0x8 not permitted before TLS" in refused(require("nbdinfo"), server.uri())


def test_qemu_refuses_to_load_an_expired_certificate(pki: Pki, image: Path) -> None:
    """qemu checks its own certificate at start: an expired server is nbdkit or ours, never qemu-nbd."""
    tls = f"tls-creds-x509,id=tls0,dir={pki.expired_server},endpoint=server"
    cmd = [require("qemu-nbd"), "-f", "raw", "-b", "127.0.0.1", "-p", "1", "--object", tls, "--tls-creds", "tls0"]
    assert "has expired" in refused(*cmd, image)
    client = qemu_tls_object(pki.expired_client)
    assert "has expired" in refused(require("qemu-img"), "info", *client, "--image-opts", Endpoint(1).image_opts())
