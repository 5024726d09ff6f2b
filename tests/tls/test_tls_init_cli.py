"""``sendense-nbd tls init``: the files it writes, checked by real openssl, used for a mutual-TLS
handshake under the names given, and a second run refused."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from click.testing import CliRunner

from sendense_nbd.cli.nbd import cli
from sendense_nbd.tls import client_context, server_context
from tests.tls.test_credentials import Outcome, handshake

TIMEOUT = 30


def run_init(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["tls", "init", *args])
    return result.exit_code, result.output


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT)


def test_tls_init_makes_a_deployment(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    names = ["--hub-name", "hub.example", "--hub-name", "hub", "--hub-address", "10.0.0.5"]
    code, output = run_init(str(root), *names, "--node", "node1", "--node", "node2", "--days", "30")
    assert code == 0, output
    assert f"hub: {root / 'hub'}" in output and f"node node2: {root / 'nodes' / 'node2'}" in output
    for key in [root / "ca-key.pem", root / "hub" / "server-key.pem", *root.glob("nodes/*/client-key.pem")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    certs = [root / "hub" / "server-cert.pem", root / "nodes" / "node1" / "client-cert.pem"]
    verified = openssl("verify", "-CAfile", root / "ca-cert.pem", *certs)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.splitlines() == [f"{cert}: OK" for cert in certs]
    text = openssl("x509", "-in", certs[0], "-noout", "-text").stdout
    assert "DNS:hub.example, DNS:hub, IP Address:10.0.0.5" in text
    assert "TLS Web Server Authentication" in text
    assert "TLS Web Client Authentication" in openssl("x509", "-in", certs[1], "-noout", "-text").stdout
    dates = openssl("x509", "-in", certs[0], "-noout", "-checkend", str(29 * 86400))
    assert (
        dates.returncode == 0
        and openssl("x509", "-in", certs[0], "-noout", "-checkend", str(31 * 86400)).returncode == 1
    )


def test_the_made_credentials_do_mutual_tls_by_name(tmp_path: Path) -> None:
    assert run_init(str(tmp_path), "--hub-name", "hub.example", "--node", "node1")[0] == 0
    server = server_context(tmp_path / "hub", verify_client=True)
    assert handshake(server, client_context(tmp_path / "nodes" / "node1"), "hub.example") == Outcome(version="TLSv1.3")
    assert handshake(server, client_context(tmp_path / "nodes" / "node1"), "localhost").client is not None


def test_tls_init_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run_init(str(tmp_path))[0] == 0
    ca = (tmp_path / "ca-cert.pem").read_bytes()
    code, output = run_init(str(tmp_path), "--node", "n1")
    assert code == 1
    assert output.startswith(f"Error: refusing to overwrite existing credentials: {tmp_path / 'ca-cert.pem'}")
    assert (tmp_path / "ca-cert.pem").read_bytes() == ca and not (tmp_path / "nodes").exists()


def test_tls_init_explains_a_bad_address(tmp_path: Path) -> None:
    code, output = run_init(str(tmp_path / "pki"), "--hub-address", "hub.example")
    assert code == 1 and "'hub.example' is not an IP address" in output
