"""The deployment's certificates: what each carries, read back by real openssl; the layout
``init_pki`` writes, with its modes, and its refusals (nothing overwritten, nothing half made)."""

from __future__ import annotations

import datetime
import ipaddress
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sendense_nbd.errors import TLSError
from sendense_nbd.tls import client_context, server_context
from sendense_nbd.tls.pki import init_pki, issue_certificate, make_ca, write_server_credentials

TIMEOUT = 30


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Real openssl, its output kept."""
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_ca_signs_certificates_and_nothing_else() -> None:
    ca = make_ca("test CA", days=30).certificate
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ca.subject == ca.issuer
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 30


def test_a_server_certificate_carries_its_names_and_purpose() -> None:
    ca = make_ca()
    server = issue_certificate(
        ca, "hub", usage="server", dns_names=["hub", "hub.example"], ip_addresses=["10.0.0.5", "::1"]
    )
    names = server.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["hub", "hub.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    purposes = server.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(purposes) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.certificate.issuer == ca.certificate.subject


def test_validity_can_be_set_in_the_past() -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = issue_certificate(
        make_ca(), "old", usage="client", not_before=past, not_after=past + datetime.timedelta(days=1)
    )
    assert expired.certificate.not_valid_after_utc == past + datetime.timedelta(days=1)


def test_openssl_verifies_what_the_ca_signed(tmp_path: Path) -> None:
    ca = make_ca()
    write_server_credentials(tmp_path, ca, issue_certificate(ca, "localhost", usage="server", dns_names=["localhost"]))
    result = openssl(
        "verify", "-CAfile", tmp_path / "ca-cert.pem", "-purpose", "sslserver", tmp_path / "server-cert.pem"
    )
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stdout + result.stderr
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca().cert_pem())
    assert openssl("verify", "-CAfile", other, tmp_path / "server-cert.pem").returncode != 0


def test_init_writes_qemus_layout_with_private_keys_0600(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    layout = init_pki(root, nodes=["node1", "node-2.example"])
    assert layout.hub == root / "hub" and layout.nodes == {n: root / "nodes" / n for n in ("node1", "node-2.example")}
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    node_files = [
        f"nodes/{n}/{f}"
        for n in ("node-2.example", "node1")
        for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem")
    ]
    assert files == sorted(
        ["ca-cert.pem", "ca-key.pem", "hub/ca-cert.pem", "hub/server-cert.pem", "hub/server-key.pem", *node_files]
    )
    for path in root.rglob("*.pem"):
        assert mode(path) == (0o600 if path.name.endswith("-key.pem") else 0o644), path
        assert path.read_bytes().startswith(
            b"-----BEGIN PRIVATE KEY-----" if "key" in path.name else b"-----BEGIN CERTIFICATE-----"
        )
    assert (root / "hub" / "ca-cert.pem").read_bytes() == (root / "ca-cert.pem").read_bytes()
    server_context(root / "hub", verify_client=True)
    client_context(root / "nodes" / "node1")


def test_init_defaults_to_localhost_and_loopback(tmp_path: Path) -> None:
    init_pki(tmp_path)
    text = openssl("x509", "-in", tmp_path / "hub" / "server-cert.pem", "-noout", "-text").stdout
    assert "DNS:localhost, IP Address:127.0.0.1" in text
    assert not (tmp_path / "nodes").exists()


def test_init_never_overwrites_and_writes_nothing_when_refusing(tmp_path: Path) -> None:
    init_pki(tmp_path, nodes=["n1"])
    before = {path: path.read_bytes() for path in tmp_path.rglob("*.pem")}
    with pytest.raises(TLSError, match=r"refusing to overwrite existing credentials: .*ca-cert\.pem"):
        init_pki(tmp_path, nodes=["n2"])
    assert not (tmp_path / "nodes" / "n2").exists()
    assert {path: path.read_bytes() for path in tmp_path.rglob("*.pem")} == before


def test_init_refuses_a_lone_existing_node_directory(tmp_path: Path) -> None:
    (tmp_path / "nodes" / "n1").mkdir(parents=True)
    with pytest.raises(TLSError, match="refusing to overwrite existing credentials: .*nodes/n1"):
        init_pki(tmp_path, nodes=["n1"])
    assert not (tmp_path / "ca-cert.pem").exists()


def _with_file_size_limit(limit: int, code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a Python whose writes past ``limit`` bytes fail (EFBIG), as on a full disk."""
    script = textwrap.dedent(f"""
        import resource, signal
        from sendense_nbd.errors import TLSError
        from sendense_nbd.tls import pki
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
        {textwrap.indent(textwrap.dedent(code), "    ")}
        except TLSError as exc:
            print(exc)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT, check=True)


def test_init_that_fails_writing_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    result = _with_file_size_limit(300, f"pki.init_pki({str(root)!r}, nodes=['n1'])")
    assert "ca-cert.pem: cannot be written: File too large" in result.stdout, result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary one


def test_a_key_that_cannot_be_written_leaves_no_partial_file(tmp_path: Path) -> None:
    key = tmp_path / "server-key.pem"
    result = _with_file_size_limit(100, f"pki._write(pki.Path({str(key)!r}), pki.make_ca().key_pem(), 0o600)")
    assert f"{key}: cannot be written: File too large" in result.stdout, result.stderr
    assert not key.exists()


def test_init_into_an_existing_directory_keeps_what_else_is_there(tmp_path: Path) -> None:
    (tmp_path / "nodes" / "old").mkdir(parents=True)
    (tmp_path / "README").write_text("mine")
    layout = init_pki(tmp_path, nodes=["n1"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README", "ca-cert.pem", "ca-key.pem", "hub", "nodes"]
    assert sorted(path.name for path in (tmp_path / "nodes").iterdir()) == ["n1", "old"]
    assert (tmp_path / "README").read_text() == "mine" and mode(tmp_path / "ca-key.pem") == 0o600
    client_context(layout.nodes["n1"])
    assert list(tmp_path.parent.glob(f".{tmp_path.name}.*")) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nodes": ["../escape"]}, "node name '../escape': use letters, digits"),
        ({"nodes": ["a", "a"]}, "a node is named twice"),
        ({"hub_addresses": ["hub.example"]}, "'hub.example' is not an IP address"),
        ({"hub_names": ["10.0.0.5"]}, "--hub-name 10.0.0.5: an IP address; give it with --hub-address"),
        ({"days": 0}, "--days 0: a certificate must be valid for a day at least"),
    ],
)
def test_init_refuses_bad_names(tmp_path: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(TLSError, match=message.replace("(", r"\(").replace(".", r"\.")):
        init_pki(tmp_path / "pki", **options)
    assert not (tmp_path / "pki").exists()


def test_the_openssl_steps_in_the_docs_make_working_credentials(tmp_path: Path) -> None:
    """docs/TLS.md's openssl commands, run as written (in a scratch directory), then used for mutual TLS."""
    from tests.tls.test_credentials import Outcome, handshake

    text = (Path(__file__).resolve().parents[2] / "docs" / "TLS.md").read_text()
    make, check = re.findall(r"```sh\n(.*?)```", text, re.S)
    script = "set -e\n" + make.replace("cd /srv/sendense-pki", "") + check
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hub/server-cert.pem: OK" in result.stdout and "DNS:hub.example.com, IP Address:10.0.0.5" in result.stdout
    assert mode(tmp_path / "ca-key.pem") == mode(tmp_path / "nodes" / "node1" / "client-key.pem") == 0o600
    server = server_context(tmp_path / "hub", verify_client=True)
    outcome = handshake(server, client_context(tmp_path / "nodes" / "node1"), "hub.example.com")
    assert outcome == Outcome(version="TLSv1.3")
