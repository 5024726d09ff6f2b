"""``sendense-nbd serve --tls/--tls-creds/--tls-verify-client`` and ``sendense-nbd copy`` with nbds://
URIs, ``--tls-creds`` and ``--tls-fingerprint``, as processes; nbdcopy judges the TLS server."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from pathlib import Path

import pytest

from sendense_nbd.tls.pki import Layout, init_pki
from tests.conftest import random_file, run, server_command

pytestmark = pytest.mark.peer

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return init_pki(tmp_path_factory.mktemp("pki"), nodes=["node1"])


def _pin(pki: Layout) -> str:
    der = ssl.PEM_cert_to_DER_cert((pki.hub / "server-cert.pem").read_text())
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(server_command(*args), capture_output=True, text=True, timeout=60)


def test_serve_require_and_copy_over_tls(tmp_path: Path, serve, pki: Layout) -> None:  # type: ignore[no-untyped-def]
    disk = random_file(tmp_path / "d.raw", 4 * MiB)
    srv = serve("-f", "raw", "-t", "-e", "8", "-x", "disk", "--tls-creds", str(pki.hub), str(disk))
    uri = f"nbds://localhost:{srv.port}/disk"
    out = tmp_path / "out.raw"
    result = _cli("copy", uri, str(out), "-f", "raw", "--tls-creds", str(pki.hub), "--verify")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == disk.read_bytes()
    pinned = tmp_path / "pinned.raw"
    result = _cli(
        "copy", uri.replace("localhost", "127.0.0.1"), str(pinned), "-f", "raw", "--tls-fingerprint", _pin(pki)
    )
    assert result.returncode == 0, result.stderr
    assert pinned.read_bytes() == disk.read_bytes()
    # libnbd judges the server: nbdcopy over TLS.
    judged = tmp_path / "judged.raw"
    run("nbdcopy", f"{uri}?tls-certificates={pki.hub}", str(judged))
    assert judged.read_bytes() == disk.read_bytes()
    # Plaintext is refused with a sentence that says why.
    refused = _cli("copy", f"nbd://localhost:{srv.port}/disk", str(tmp_path / "x.raw"), "-f", "raw", "--retries", "0")
    assert refused.returncode == 1 and "requires TLS" in refused.stderr


def test_copy_errors_over_tls(tmp_path: Path, serve, pki: Layout) -> None:  # type: ignore[no-untyped-def]
    disk = random_file(tmp_path / "d.raw", MiB)
    srv = serve("-f", "raw", "-t", "--tls", "require", "--tls-creds", str(pki.hub), str(disk))
    uri = f"nbds://localhost:{srv.port}/"
    wrong = _cli("copy", uri, str(tmp_path / "o.raw"), "-f", "raw", "--tls-fingerprint", "sha256:" + "00" * 32)
    assert wrong.returncode == 1 and "not the pinned" in wrong.stderr
    untrusted = _cli("copy", uri, str(tmp_path / "o.raw"), "-f", "raw", "--retries", "0")  # the system's CAs
    assert untrusted.returncode == 1 and "CA" in untrusted.stderr
    plain = _cli("copy", f"nbd://localhost:{srv.port}/", str(tmp_path / "o.raw"), "-f", "raw", "--tls-creds", "/x")
    assert plain.returncode == 2 and "nbds://" in plain.stderr


def test_serve_mutual_tls(tmp_path: Path, serve, pki: Layout) -> None:  # type: ignore[no-untyped-def]
    disk = random_file(tmp_path / "d.raw", MiB)
    srv = serve("-f", "raw", "-t", "--tls-creds", str(pki.hub), "--tls-verify-client", str(disk))
    out = tmp_path / "out.raw"
    uri = f"nbds://localhost:{srv.port}/"
    ok = _cli("copy", uri, str(out), "-f", "raw", "--tls-creds", str(pki.nodes["node1"]))
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes() == disk.read_bytes()
    refused = _cli("copy", uri, str(tmp_path / "o.raw"), "-f", "raw", "--tls-creds", str(pki.hub), "--retries", "0")
    assert refused.returncode == 1 and "client certificate" in refused.stderr


def test_serve_allow_takes_both(tmp_path: Path, serve, pki: Layout) -> None:  # type: ignore[no-untyped-def]
    disk = random_file(tmp_path / "d.raw", MiB)
    srv = serve("-f", "raw", "-t", "--tls", "allow", "--tls-creds", str(pki.hub), str(disk))
    for uri, extra in ((f"nbd://localhost:{srv.port}/", []), (f"nbds://localhost:{srv.port}/", ["--tls-creds"])):
        out = tmp_path / "out.raw"
        out.unlink(missing_ok=True)
        args = [*extra, str(pki.hub)] if extra else []
        result = _cli("copy", uri, str(out), "-f", "raw", *args)
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == disk.read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tls", "require"], "needs --tls-creds"),
        (["--tls", "off", "--tls-creds", "{hub}"], "need --tls allow or require"),
        (["--tls-verify-client"], "need --tls allow or require"),
        (["--tls-creds", "{missing}"], "missing"),
    ],
)
def test_serve_tls_usage_errors(tmp_path: Path, pki: Layout, args: list[str], message: str) -> None:
    disk = random_file(tmp_path / "d.raw", MiB)
    filled = [a.format(hub=pki.hub, missing=tmp_path / "missing") for a in args]
    result = _cli("serve", "--port", "0", *filled, str(disk))
    assert result.returncode != 0
    assert message in result.stderr


def test_serve_help_says_what_tls_creds_takes() -> None:
    text = " ".join(_cli("serve", "--help").stdout.split())
    assert "--tls-creds DIR" in text and "qemu's layout" in text and "Refused with --tls off" in text


def test_serve_with_a_psk_directory(tmp_path: Path) -> None:
    """qemu's tls-creds-psk layout (DIR/keys.psk): served where Python has TLS-PSK, else refused saying why."""
    import sys

    creds = tmp_path / "psk"
    creds.mkdir()
    (creds / "keys.psk").write_text("node1:" + "ab" * 32 + "\n")
    disk = random_file(tmp_path / "d.raw", MiB)
    if sys.version_info < (3, 13):
        result = _cli("serve", "--port", "0", "--tls-creds", str(creds), str(disk))
        assert result.returncode != 0 and "TLS-PSK needs Python 3.13" in result.stderr, result.stderr
    else:  # it listens (qemu-nbd's tls-creds-psk against it was checked by hand on 3.13)
        command = server_command("serve", "--port", "0", "--tls-creds", str(creds), str(disk))
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None and int(proc.stdout.readline()) > 0
        finally:
            proc.kill()
            proc.communicate()
    refused = _cli("serve", "--port", "0", "--tls-creds", str(creds), "--tls-verify-client", str(disk))
    assert refused.returncode != 0 and "for x509 credentials" in refused.stderr, refused.stderr
