"""TLS contexts from credential directories: real handshakes over a socket pair (the server in a
thread), refusals with sentences, credentials that cannot be used named by file, pins, keys.psk."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import serialization

from sendense_nbd.errors import NBDConnectionError, TLSError
from sendense_nbd.tls import (
    check_fingerprint,
    client_context,
    fingerprint,
    handshake_error,
    parse_fingerprint,
    parse_psk_file,
    psk_client_context,
    psk_server_context,
    server_context,
)
from sendense_nbd.tls.pki import Issued, issue_certificate, make_ca, write_client_credentials, write_server_credentials

TIMEOUT = 10


@attrs.frozen
class Creds:
    """Credential directories, each in qemu's layout."""

    ca: Issued
    server: Path  # localhost, 127.0.0.1
    client: Path  # a client certificate (mutual TLS)
    anonymous: Path  # ca-cert.pem only
    other_ca_client: Path  # ca-cert.pem of another CA, and a client certificate it signed
    expired_server: Path
    server_cert: Issued


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    root = tmp_path_factory.mktemp("creds")
    ca, other = make_ca(), make_ca("another CA")
    server = issue_certificate(ca, "localhost", usage="server", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired = issue_certificate(ca, "localhost", usage="server", dns_names=["localhost"], not_before=past,
                                not_after=past + datetime.timedelta(days=1))  # fmt: skip
    write_server_credentials(root / "server", ca, server)
    write_server_credentials(root / "expired", ca, expired)
    write_client_credentials(root / "client", ca, issue_certificate(ca, "node1", usage="client"))
    write_client_credentials(root / "other", other, issue_certificate(other, "intruder", usage="client"))
    (root / "anonymous").mkdir()
    shutil.copy(root / "server" / "ca-cert.pem", root / "anonymous")
    return Creds(ca, root / "server", root / "client", root / "anonymous", root / "other", root / "expired", server)


@attrs.define
class Outcome:
    """What each side of one handshake saw."""

    server: OSError | None = None
    client: OSError | None = None
    version: str | None = None


def handshake(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    hostname: str | None = "localhost",
    check: Callable[[ssl.SSLSocket], None] | None = None,
) -> Outcome:
    """A TLS handshake and one byte each way (a TLS 1.3 server refuses a client certificate only
    after the client's handshake is done) over a socket pair; the server side runs in a thread."""
    outcome = Outcome()
    left, right = socket.socketpair()
    left.settimeout(TIMEOUT)
    right.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True) as tls:
                tls.sendall(b"s")
                if tls.recv(1) != b"c":  # a client that refused the server closes, with or without a reset
                    raise ConnectionAbortedError("the client closed the connection")
        except OSError as exc:
            outcome.server = exc
        finally:
            left.close()

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(serve)
        try:
            with client.wrap_socket(right, server_hostname=hostname) as tls:
                outcome.version = tls.version()
                if check is not None:
                    check(tls)
                assert tls.recv(1) == b"s"
                tls.sendall(b"c")
        except OSError as exc:
            outcome.client = exc
        finally:
            right.close()
        done.result(timeout=TIMEOUT)
    return outcome


def test_generated_credentials_handshake_with_tls_1_3(creds: Creds) -> None:
    outcome = handshake(server_context(creds.server), client_context(creds.anonymous))
    assert outcome == Outcome(version="TLSv1.3")


def test_an_ip_address_in_the_subject_alt_name_is_a_host_name(creds: Creds) -> None:
    assert handshake(server_context(creds.server), client_context(creds.anonymous), "127.0.0.1").client is None


def test_mutual_tls_admits_a_client_certificate_of_the_ca(creds: Creds) -> None:
    def shown(tls: ssl.SSLSocket) -> None:
        assert tls.getpeercert() is not None

    outcome = handshake(server_context(creds.server, verify_client=True), client_context(creds.client), check=shown)
    assert outcome == Outcome(version="TLSv1.3")


def test_mutual_tls_refuses_a_client_without_a_certificate(creds: Creds) -> None:
    outcome = handshake(server_context(creds.server, verify_client=True), client_context(creds.anonymous))
    assert outcome.server is not None and outcome.client is not None
    assert "the client sent no certificate and this server requires one" in str(handshake_error(outcome.server))
    assert "the server requires a client certificate" in str(handshake_error(outcome.client))


def test_mutual_tls_refuses_a_client_certificate_of_another_ca(creds: Creds) -> None:
    context = client_context(creds.other_ca_client, verify_peer=False)
    outcome = handshake(server_context(creds.server, verify_client=True), context)
    assert outcome.server is not None and outcome.client is not None
    assert "not signed by a CA this side trusts" in str(handshake_error(outcome.server))
    assert "the peer does not trust the CA that signed our certificate" in str(handshake_error(outcome.client))


def test_a_server_certificate_of_another_ca_is_refused(creds: Creds) -> None:
    outcome = handshake(server_context(creds.server), client_context(creds.other_ca_client))
    assert isinstance(outcome.client, ssl.SSLCertVerificationError)
    message = str(handshake_error(outcome.client))
    assert message.startswith("the peer's certificate is not signed by a CA this side trusts, ca-cert.pem")
    assert outcome.server is not None


def test_an_expired_server_certificate_is_refused(creds: Creds) -> None:
    outcome = handshake(server_context(creds.expired_server), client_context(creds.anonymous))
    assert outcome.client is not None
    assert str(handshake_error(outcome.client)).startswith("the peer's certificate has expired")


def test_a_certificate_for_another_host_name_is_refused(creds: Creds) -> None:
    outcome = handshake(server_context(creds.server), client_context(creds.anonymous), "hub.example")
    assert outcome.client is not None
    message = str(handshake_error(outcome.client, server_hostname="hub.example"))
    assert message.startswith("the peer's certificate is not valid for the host name 'hub.example'")


def test_without_peer_verification_any_certificate_is_taken(creds: Creds) -> None:
    context = client_context(creds.other_ca_client, verify_peer=False)
    assert handshake(server_context(creds.server), context, "hub.example").client is None


def test_without_a_directory_the_client_verifies_by_the_system_store() -> None:
    context = client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_connection_lost_in_the_handshake_is_a_connection_error_not_a_tls_refusal(creds: Creds) -> None:
    """A reset or a timeout may pass on a retry; what TLS itself refused will not (a real reset in the
    handshake: tests/client/test_tls.py)."""
    reset = handshake_error(ConnectionResetError(104, "Connection reset by peer"))
    assert isinstance(reset, NBDConnectionError) and not isinstance(reset, TLSError)
    assert str(reset) == "the connection was lost during the TLS handshake ([Errno 104] Connection reset by peer)"
    timed_out = handshake_error(TimeoutError("timed out"))
    assert isinstance(timed_out, NBDConnectionError) and "the TLS handshake timed out" in str(timed_out)
    refused = handshake(server_context(creds.server), client_context(creds.other_ca_client))
    assert refused.client is not None and isinstance(handshake_error(refused.client), TLSError)


def test_tls_1_2_is_accepted_and_1_1_refused(creds: Creds) -> None:
    old = client_context(creds.anonymous)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(server_context(creds.server), old).version == "TLSv1.2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 itself is deprecated
        older = client_context(creds.anonymous)
        older.minimum_version = ssl.TLSVersion.TLSv1_1
        older.maximum_version = ssl.TLSVersion.TLSv1_1
    older.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer it at all
    outcome = handshake(server_context(creds.server), older)
    assert outcome.server is not None and outcome.client is not None
    assert "TLS 1.2 is the minimum" in str(handshake_error(outcome.server))


def test_a_pinned_fingerprint_is_accepted_without_a_ca(creds: Creds) -> None:
    pin = fingerprint(creds.server_cert.certificate.public_bytes(serialization.Encoding.DER))
    context = client_context(creds.other_ca_client, fingerprint=pin)
    outcome = handshake(server_context(creds.server), context, "hub.example", lambda tls: check_fingerprint(tls, pin))
    assert outcome.client is None and outcome.server is None


def test_another_fingerprint_is_refused(creds: Creds) -> None:
    actual = fingerprint(creds.server_cert.certificate.public_bytes(serialization.Encoding.DER))
    other = "sha256:" + "ab" * 32
    seen: list[TLSError] = []

    def check(tls: ssl.SSLSocket) -> None:
        with pytest.raises(TLSError) as refused:
            check_fingerprint(tls, other)
        seen.append(refused.value)
        raise ConnectionAbortedError("refused")

    handshake(server_context(creds.server), client_context(fingerprint=other), check=check)
    assert str(seen[0]) == f"the server's certificate is {actual}, not the pinned {other}: refusing it"


def test_fingerprint_matches_openssl_and_parses_its_spellings(creds: Creds) -> None:
    printed = subprocess.run(
        ["openssl", "x509", "-in", creds.server / "server-cert.pem", "-noout", "-fingerprint", "-sha256"],
        capture_output=True, text=True, check=True, timeout=TIMEOUT,
    ).stdout.strip()  # fmt: skip
    pin = fingerprint(creds.server_cert.certificate.public_bytes(serialization.Encoding.DER))
    assert parse_fingerprint(printed) == pin
    hexdigits = pin.removeprefix("sha256:")
    colons = ":".join(hexdigits[i : i + 2] for i in range(0, 64, 2)).upper()
    for spelling in (pin, pin.upper(), hexdigits, colons, f"SHA256:{colons}", f"  {pin}\n"):
        assert parse_fingerprint(spelling) == pin


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sha1:" + "ab" * 20, "only sha256 pins are supported"),
        ("sha256:" + "ab" * 31, "is not a SHA-256 digest"),
        ("sha256:" + "zz" * 32, "is not a SHA-256 digest"),
        ("", "is not a SHA-256 digest"),
    ],
)
def test_a_malformed_fingerprint_is_refused(text: str, message: str) -> None:
    with pytest.raises(TLSError, match=message):
        parse_fingerprint(text)
    with pytest.raises(TLSError, match=message):
        client_context(fingerprint=text)


# -- credentials that cannot be used --------------------------------------------------------------


@pytest.fixture
def broken(creds: Creds, tmp_path: Path) -> Path:
    """A copy of the server's directory, to break."""
    return Path(shutil.copytree(creds.server, tmp_path / "server"))


def refusal(call: Callable[[], object]) -> str:
    with pytest.raises(TLSError) as refused:
        call()
    return str(refused.value)


def test_a_missing_directory_or_file_is_named(broken: Path) -> None:
    assert refusal(lambda: server_context(broken / "nowhere")) == (
        f"TLS credentials directory {broken / 'nowhere'} does not exist"
    )
    (broken / "server-key.pem").unlink()
    assert refusal(lambda: server_context(broken)) == f"{broken / 'server-key.pem'}: missing (a PEM private key)"
    (broken / "ca-cert.pem").unlink()
    assert refusal(lambda: server_context(broken, verify_client=True)).startswith(
        f"{broken / 'server-key.pem'}: missing"
    )


def test_mutual_tls_needs_the_ca_certificate(broken: Path) -> None:
    (broken / "ca-cert.pem").unlink()
    server_context(broken)
    assert refusal(lambda: server_context(broken, verify_client=True)) == (
        f"{broken / 'ca-cert.pem'}: missing (the CA certificate that must have signed the peer's certificate)"
    )


def test_a_client_directory_without_the_ca_certificate_is_refused(creds: Creds, tmp_path: Path) -> None:
    """As qemu: a credentials directory brings its CA; the system's CAs are for a client without one."""
    client = Path(shutil.copytree(creds.client, tmp_path / "client"))
    (client / "ca-cert.pem").unlink()
    assert refusal(lambda: client_context(client)) == (
        f"{client / 'ca-cert.pem'}: missing (the CA certificate that must have signed the peer's certificate)"
    )
    client_context(client, verify_peer=False)  # nothing to check it against, nothing needed
    client_context(client, fingerprint="sha256:" + "ab" * 32)


def test_a_server_the_system_store_does_not_trust_names_the_system_store(creds: Creds) -> None:
    outcome = handshake(server_context(creds.server), client_context())
    assert outcome.client is not None
    assert "the system's CAs for a client without a credentials directory" in str(handshake_error(outcome.client))


def test_a_client_key_without_its_certificate_is_named(creds: Creds, tmp_path: Path) -> None:
    client = Path(shutil.copytree(creds.client, tmp_path / "client"))
    (client / "client-cert.pem").unlink()
    assert refusal(lambda: client_context(client)) == f"{client / 'client-cert.pem'}: missing (a PEM certificate)"


def test_an_unreadable_file_is_named(broken: Path) -> None:
    key = broken / "server-key.pem"
    key.unlink()
    key.mkdir()
    assert refusal(lambda: server_context(broken)) == f"{key}: cannot be read: Is a directory"


def test_a_file_the_user_may_not_read_is_named(creds: Creds) -> None:
    """As root (who reads anything) the check runs as ``nobody``, in a directory it may enter."""
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o755)
        directory = Path(shutil.copytree(creds.server, Path(scratch) / "server"))
        os.chmod(directory, 0o755)
        key = directory / "server-key.pem"
        key.chmod(0)
        if os.geteuid() != 0:
            assert (
                refusal(lambda: server_context(directory)) == f"{key}: cannot be read by this user (permission denied)"
            )
            return
        probe = "from sendense_nbd.tls import server_context\nserver_context(__import__('sys').argv[1])"
        result = subprocess.run(
            [sys.executable, "-c", probe, str(directory)], user=65534, capture_output=True, text=True, timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
    assert f"TLSError: {key}: cannot be read by this user (permission denied)" in result.stderr


def test_a_key_of_another_certificate_is_named(broken: Path, creds: Creds) -> None:
    shutil.copy(creds.client / "client-key.pem", broken / "server-key.pem")
    assert refusal(lambda: server_context(broken)) == (
        f"{broken / 'server-key.pem'}: this key does not match the certificate {broken / 'server-cert.pem'}"
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("server-cert.pem", b"garbage\n", "no certificate in it (no '-----BEGIN CERTIFICATE-----' line)"),
        ("server-cert.pem", b"", "no certificate in it"),
        ("server-cert.pem", b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
         "a damaged PEM certificate"),
        ("server-key.pem", b"garbage\n", "no private key in it (no '-----BEGIN PRIVATE KEY-----' line)"),
        ("server-key.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
         "a damaged PEM private key"),
        ("ca-cert.pem", b"garbage\n", "no certificate in it"),
    ],
)  # fmt: skip
def test_garbage_pem_is_named(broken: Path, name: str, content: bytes, message: str) -> None:
    (broken / name).write_bytes(content)
    assert refusal(lambda: server_context(broken, verify_client=True)).startswith(f"{broken / name}: {message}")


def test_an_encrypted_key_is_refused_without_asking_for_a_password(broken: Path) -> None:
    key = broken / "server-key.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", key, "-out", key.with_suffix(".enc"), "-aes256", "-passout", "pass:secret"],
        check=True, timeout=TIMEOUT,
    )  # fmt: skip
    key.with_suffix(".enc").replace(key)
    assert "the key is encrypted; store it unencrypted, 0600" in refusal(lambda: server_context(broken))


def test_a_garbage_ca_certificate_of_a_client_is_named(creds: Creds, tmp_path: Path) -> None:
    client = Path(shutil.copytree(creds.anonymous, tmp_path / "client"))
    (client / "ca-cert.pem").write_text("garbage")
    assert refusal(lambda: client_context(client)).startswith(f"{client / 'ca-cert.pem'}: no certificate in it")


# -- TLS-PSK --------------------------------------------------------------------------------------


@pytest.fixture
def keys_psk(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "keys.psk"
    path.write_text("qemu:0123456789abcdef0123456789abcdef\nnode1:" + "a5" * 32 + "\n\n")
    yield path


def test_keys_psk_is_parsed(keys_psk: Path) -> None:
    assert parse_psk_file(keys_psk) == {
        "qemu": bytes.fromhex("0123456789abcdef0123456789abcdef"),
        "node1": bytes([0xA5]) * 32,
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("qemu\n", "line 1: not 'identity:hexkey'"),
        (":abcd\n", "line 1: not 'identity:hexkey'"),
        ("a:abcd\na:abcd\n", "line 2: identity 'a' appears twice"),
        ("a:xyz\n", "line 1: the key of 'a' is not hexadecimal"),
        ("a:\n", "line 1: the key of 'a' is empty"),
        ("\n", "no 'identity:hexkey' line"),
    ],
)
def test_a_malformed_keys_psk_is_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.psk"
    path.write_text(content)
    assert refusal(lambda: parse_psk_file(path)) == f"{path}{' ' if message.startswith('line') else ': '}{message}"


def test_a_missing_keys_psk_is_named(tmp_path: Path) -> None:
    assert (
        refusal(lambda: parse_psk_file(tmp_path / "keys.psk")) == f"{tmp_path / 'keys.psk'}: missing (the TLS-PSK keys)"
    )


def test_psk_works_where_python_has_it_and_is_refused_with_the_reason_elsewhere(keys_psk: Path) -> None:
    if not hasattr(ssl.SSLContext, "set_psk_server_callback"):
        message = refusal(lambda: psk_server_context(keys_psk))
        assert message.startswith("TLS-PSK needs Python 3.13 or later (ssl.SSLContext.set_psk_server_callback)")
        assert message.endswith("use x509 credentials (sendense-nbd tls init)")
        assert refusal(lambda: psk_client_context(keys_psk, "qemu")) == message
        return
    outcome = handshake(psk_server_context(keys_psk), psk_client_context(keys_psk, "node1"), None)
    assert outcome.client is None and outcome.server is None
    stranger = keys_psk.with_name("other.psk")
    stranger.write_text("node1:" + "5a" * 32 + "\n")
    assert handshake(psk_server_context(keys_psk), psk_client_context(stranger), None).client is not None
