"""Our server (``sendense-nbd serve --tls ... --tls-creds DIR``) over TLS against real clients:
libnbd's nbdinfo and nbdcopy with ``nbds://`` URIs, qemu-img and qemu-io with
``--object tls-creds-x509`` and ``tls-creds`` in the nbd options.

Reads, writes and compares; mutual TLS (``--tls-verify-client``) accepting the client certificate
and refusing none, a foreign and an expired one while it keeps serving; our certificate refused by
the peers when it is from a CA they do not trust, expired or for another name; ``require``
telling a plaintext peer that TLS is required; ``allow`` serving both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer, require, run
from tests.tls.peers import OTHER_NAME, Endpoint, Pki, nbdcopy_out, qemu_tls_object, refused

pytestmark = pytest.mark.peer

MiB = 1 << 20


def tls_serve(
    serve: Callable[..., RunningServer], image: Path, creds: Path, *extra: str, mode: str = "require"
) -> tuple[Endpoint, RunningServer]:
    """``sendense-nbd serve`` of ``image`` as export ``disk`` with TLS ``mode`` and credentials ``creds``."""
    server = serve(
        "-f", "raw", "-t", "-e", "8", "-x", "disk", "--tls", mode, "--tls-creds", str(creds), *extra, str(image)
    )
    assert server.port is not None
    return Endpoint(server.port, "disk"), server


def qemu(tool: str, creds: Path | None, *args: str) -> list[str]:
    """A qemu tool's command with the client ``--object`` reading ``creds`` (none: plaintext);
    qemu-img takes it after its subcommand."""
    head, tail = (args[:1], args[1:]) if tool == "qemu-img" else ((), args)
    return [require(tool), *head, *(qemu_tls_object(creds) if creds else []), *tail]


def test_libnbd_reads_and_writes(pki: Pki, image: Path, image_data: bytes, serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, _ = tls_serve(serve, image, pki.server)
    uri = endpoint.uri(pki.anonymous)
    assert "protocol: newstyle-fixed with TLS" in run(require("nbdinfo"), uri, timeout=30).stdout
    assert nbdcopy_out(uri) == image_data
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(reversed(image_data)))
    run(require("nbdcopy"), "--connections=4", other, uri, timeout=60)
    assert nbdcopy_out(uri) == other.read_bytes() == image.read_bytes()


def test_qemu_reads_writes_and_compares(pki: Pki, image: Path, image_data: bytes, serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, _ = tls_serve(serve, image, pki.server)
    opts = endpoint.image_opts()
    run(
        *qemu("qemu-io", pki.anonymous, "--image-opts", opts, "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k")
    )
    expected = bytearray(image_data)
    expected[MiB : MiB + 65536] = b"\x5a" * 65536
    assert image.read_bytes() == expected
    copy = tmp_path / "copy.raw"
    run(*qemu("qemu-img", pki.anonymous, "convert", "-O", "raw", "--image-opts", opts, str(copy)))
    assert copy.read_bytes() == expected
    local = f"driver=raw,file.driver=file,file.filename={copy}"
    run(*qemu("qemu-img", pki.anonymous, "compare", "--image-opts", opts, local))


def test_mutual_tls(pki: Pki, image: Path, image_data: bytes, serve) -> None:  # type: ignore[no-untyped-def]
    """Without a certificate, with another CA's or an expired one (libnbd: qemu will not load an
    expired certificate of its own), a client is refused, the server saying why, and serving on."""
    endpoint, server = tls_serve(serve, image, pki.server, "--tls-verify-client")
    assert nbdcopy_out(endpoint.uri(pki.client)) == image_data
    for creds in (pki.anonymous, pki.foreign_client, pki.expired_client):
        said = refused(require("nbdinfo"), endpoint.uri(creds))
        # TLS 1.3: the server checks the client's certificate after the client's handshake ended, so the client
        # reads either the server's alert (gnutls reports it) or, when the close wins the race, the close
        assert "gnutls" in said or "server closed socket unexpectedly" in said, said
    for creds in (pki.anonymous, pki.foreign_client):
        assert "TLS channel" in refused(*qemu("qemu-img", creds, "info", "--image-opts", endpoint.image_opts()))
    run(*qemu("qemu-img", pki.client, "info", "--image-opts", endpoint.image_opts()))
    assert server.alive()
    server.stop()
    log = server.stderr()
    assert log.count("the client sent no certificate and this server requires one (mutual TLS)") == 2, log
    assert log.count("the peer's certificate is not signed by a CA this side trusts") == 2, log
    assert log.count("the peer's certificate has expired") == 1, log


def test_peers_refuse_our_bad_certificates(pki: Pki, image: Path, serve) -> None:  # type: ignore[no-untyped-def]
    good, _ = tls_serve(serve, image, pki.server)
    expired, _ = tls_serve(serve, image, pki.expired_server)
    wrong_name, _ = tls_serve(serve, image, pki.wrong_name_server)
    assert "certificate verification" in refused(require("nbdinfo"), good.uri(pki.wrong_ca))
    assert "certificate verification" in refused(require("nbdinfo"), expired.uri(pki.anonymous))
    assert "certificate verification" in refused(require("nbdinfo"), wrong_name.uri(pki.anonymous))
    info = qemu("qemu-img", pki.anonymous, "info", "--image-opts")
    assert "not trusted" in refused(*info, expired.image_opts())
    assert "does not match the hostname 127.0.0.1" in refused(*info, wrong_name.image_opts())
    run(*info, wrong_name.image_opts(hostname=OTHER_NAME))


def test_require_refuses_plaintext_peers(pki: Pki, image: Path, serve) -> None:  # type: ignore[no-untyped-def]
    endpoint, _ = tls_serve(serve, image, pki.server)
    message = refused(*qemu("qemu-img", None, "info", "--image-opts", endpoint.image_opts(tls=False)))
    assert "TLS negotiation required before option 7 (go)" in message, message
    log = refused(require("nbdinfo"), endpoint.uri())
    said = [line for line in log.splitlines() if "server error message" in line]
    assert said and "TLS" in said[0], log


def test_allow_serves_both(pki: Pki, image: Path, image_data: bytes, serve) -> None:  # type: ignore[no-untyped-def]
    endpoint, _ = tls_serve(serve, image, pki.server, mode="allow")
    assert "without TLS" in run(require("nbdinfo"), endpoint.uri(), timeout=30).stdout
    assert "with TLS" in run(require("nbdinfo"), endpoint.uri(pki.anonymous), timeout=30).stdout
    assert nbdcopy_out(endpoint.uri()) == nbdcopy_out(endpoint.uri(pki.anonymous)) == image_data
    run(*qemu("qemu-img", None, "info", "--image-opts", endpoint.image_opts(tls=False)))
    run(*qemu("qemu-img", pki.anonymous, "info", "--image-opts", endpoint.image_opts()))
