"""TLS contexts from a credentials directory in qemu's layout, certificate pins and TLS-PSK keys.

A directory holds ``ca-cert.pem`` and, for a server, ``server-cert.pem`` + ``server-key.pem``, for
a client ``client-cert.pem`` + ``client-key.pem`` (mutual TLS): what qemu's ``tls-creds-x509``,
nbdkit's ``--tls-certificates`` and libnbd's ``tls-certificates`` read. Every context allows
TLS 1.2 at least and prefers 1.3. Whatever cannot be used raises :class:`TLSError` naming the file
and what to do; :func:`handshake_error` makes a failed handshake a sentence.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
import stat
import sys
from pathlib import Path
from typing import NoReturn

import attrs

from sendense_nbd.errors import NBDConnectionError, TLSError

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
_KEY_BEGIN = re.compile(rb"-----BEGIN (?:(RSA|EC|DSA|ENCRYPTED) )?PRIVATE KEY-----")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")

_log = logging.getLogger(__name__)


def server_context(creds_dir: str | os.PathLike[str], *, verify_client: bool = False) -> ssl.SSLContext:
    """A server context from ``server-cert.pem`` and ``server-key.pem`` in ``creds_dir``.

    ``verify_client``: mutual TLS, every client must present a certificate signed by the
    directory's ``ca-cert.pem``.
    """
    directory = _directory(creds_dir)
    context = _base_context(server=True)
    _load_chain(context, directory / SERVER_CERT, directory / SERVER_KEY)
    if verify_client:
        _load_ca(context, directory / CA_CERT)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@attrs.frozen
class ServerCredentials:
    """A server's credentials directory and whether it requires client certificates: a picklable value, so
    that another process (an export worker) loads the same context (:meth:`context`)."""

    directory: str
    verify_client: bool = False

    def context(self) -> ssl.SSLContext:
        """The server context (:func:`server_context`), loaded now."""
        return server_context(self.directory, verify_client=self.verify_client)


def client_context(
    creds_dir: str | os.PathLike[str] | None = None, *, verify_peer: bool = True, fingerprint: str | None = None
) -> ssl.SSLContext:
    """A client context: the server's certificate checked against ``creds_dir/ca-cert.pem`` (which
    must be there, as qemu requires; the system's CAs without ``creds_dir``) and the host name given
    to the handshake.

    ``client-cert.pem`` and ``client-key.pem`` in ``creds_dir`` are presented when there (mutual
    TLS). ``fingerprint`` (``sha256:HEX``) pins the server's certificate instead of any CA: the
    context checks nothing, the caller calls :func:`check_fingerprint` after the handshake.
    ``verify_peer=False`` checks nothing at all (encryption without authentication).
    """
    directory = _directory(creds_dir) if creds_dir is not None else None
    context = _base_context(server=False)
    if fingerprint is not None or not verify_peer:
        if fingerprint is not None:
            parse_fingerprint(fingerprint)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif directory is not None:
        _load_ca(context, directory / CA_CERT)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if directory is not None and ((directory / CLIENT_CERT).exists() or (directory / CLIENT_KEY).exists()):
        _load_chain(context, directory / CLIENT_CERT, directory / CLIENT_KEY)
    return context


def fingerprint(der: bytes) -> str:
    """A certificate's pin: ``sha256:`` and the SHA-256 of its DER bytes in lowercase hex."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def parse_fingerprint(text: str) -> str:
    """A pin in :func:`fingerprint`'s form, from ``sha256:HEX`` or bare hex, with colons and upper
    case allowed; also what ``openssl x509 -noout -fingerprint -sha256`` prints
    (``sha256 Fingerprint=AB:CD:...``)."""
    value = text.strip()
    label, equals, rest = value.partition("=")
    if equals and label.lower() == "sha256 fingerprint":
        value = rest
    kind, colon, digest = value.partition(":")
    if colon and kind.lower() == "sha256":
        value = digest
    elif colon and len(kind) != 2:
        raise TLSError(f"certificate fingerprint {text!r}: only sha256 pins are supported (sha256:HEX)")
    digest = value.replace(":", "").lower()
    if not _HEX_DIGEST.fullmatch(digest):
        raise TLSError(f"certificate fingerprint {text!r} is not a SHA-256 digest (sha256: and 64 hex digits)")
    return "sha256:" + digest


def check_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: str) -> None:
    """Raise :class:`TLSError` unless the peer's certificate has the pin ``expected``."""
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        raise TLSError("the server sent no certificate to check the pinned fingerprint against")
    pin = parse_fingerprint(expected)
    actual = fingerprint(der)
    if not hmac.compare_digest(actual, pin):
        raise TLSError(f"the server's certificate is {actual}, not the pinned {pin}: refusing it")


def parse_psk_file(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """qemu's ``keys.psk`` (as nbdkit's ``--tls-psk``): one ``identity:hexkey`` per line."""
    text = _read(Path(path), "the TLS-PSK keys").decode("utf-8", "replace")
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        identity, colon, hexkey = line.strip().partition(":")
        where = f"{os.fspath(path)} line {number}"
        if not colon or not identity:
            raise TLSError(f"{where}: not 'identity:hexkey'")
        if identity in keys:
            raise TLSError(f"{where}: identity {identity!r} appears twice")
        try:
            keys[identity] = bytes.fromhex(hexkey)
        except ValueError:
            raise TLSError(f"{where}: the key of {identity!r} is not hexadecimal") from None
        if not keys[identity]:
            raise TLSError(f"{where}: the key of {identity!r} is empty")
    if not keys:
        raise TLSError(f"{os.fspath(path)}: no 'identity:hexkey' line")
    return keys


def psk_server_context(keys_psk_path: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server context that admits a client knowing one of the keys of ``keys.psk``."""
    _require_psk()
    keys = parse_psk_file(keys_psk_path)
    context = _base_context(server=True)
    context.set_ciphers("PSK")

    def key_of(identity: str | None) -> bytes:
        key = keys.get(identity or "")
        if key is None:
            _log.warning("TLS-PSK: a client names the identity %r, which %s does not have", identity, keys_psk_path)
        return key or b""

    getattr(context, "set_psk_server_callback")(key_of)  # noqa: B009
    return context


def psk_client_context(keys_psk_path: str | os.PathLike[str], identity: str | None = None) -> ssl.SSLContext:
    """A client context that proves ``identity``'s key of ``keys.psk`` (the only one when None)."""
    _require_psk()
    keys = parse_psk_file(keys_psk_path)
    if identity is None and len(keys) != 1:
        raise TLSError(f"{os.fspath(keys_psk_path)} holds {len(keys)} identities: name the one to use")
    name = identity if identity is not None else next(iter(keys))
    if name not in keys:
        raise TLSError(f"{os.fspath(keys_psk_path)} has no key for the identity {name!r}")
    context = _base_context(server=False)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("PSK")
    getattr(context, "set_psk_client_callback")(lambda hint: (name, keys[name]))  # noqa: B009
    return context


def handshake_error(exc: OSError, *, server_hostname: str | None = None) -> TLSError | NBDConnectionError:
    """A failed TLS handshake as a sentence: :class:`TLSError` when TLS refused it (a certificate, an
    alert: retrying will not help), :class:`NBDConnectionError` when the connection broke or timed out
    in it (``OSError`` other than ``ssl.SSLError``: a retry may get through)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(_verify_failure(exc, server_hostname))
    if isinstance(exc, TimeoutError):
        return NBDConnectionError(f"the TLS handshake timed out ({exc or type(exc).__name__})")
    if not isinstance(exc, ssl.SSLError):
        return NBDConnectionError(f"the connection was lost during the TLS handshake ({exc or type(exc).__name__})")
    reason = exc.reason or ""
    for marker, text in _ALERTS:
        if marker in reason:
            return TLSError(f"TLS handshake failed: {text} ({reason})")
    return TLSError(f"TLS handshake failed: {exc}")


#: OpenSSL reasons (a substring) and what they mean to an operator.
_ALERTS = (
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "the client sent no certificate and this server requires one (mutual TLS)"),
    ("CERTIFICATE_REQUIRED", "the server requires a client certificate (client-cert.pem, client-key.pem)"),
    ("UNKNOWN_CA", "the peer does not trust the CA that signed our certificate"),
    ("CERTIFICATE_EXPIRED", "the peer says our certificate has expired"),
    ("BAD_CERTIFICATE", "the peer refused our certificate"),
    ("UNSUPPORTED_PROTOCOL", "no TLS version both sides accept (TLS 1.2 is the minimum)"),
    ("PROTOCOL_VERSION", "no TLS version both sides accept (TLS 1.2 is the minimum)"),
    ("WRONG_VERSION_NUMBER", "the peer does not speak TLS here"),
    ("NO_SHARED_CIPHER", "no cipher both sides accept"),
    ("BINDER_DOES_NOT_VERIFY", "the client's pre-shared key is not the one keys.psk has for its identity"),
    ("UNEXPECTED_EOF", "the peer hung up in the handshake: it refused us, its log says why"),
)

#: X509_V_ERR codes: the peer's certificate is not signed by a CA this side trusts.
_UNTRUSTED = frozenset({2, 7, 18, 19, 20, 21})


def _verify_failure(exc: ssl.SSLCertVerificationError, server_hostname: str | None) -> str:
    code, message = exc.verify_code, exc.verify_message
    if code == 10:
        return f"the peer's certificate has expired ({message}): renew it"
    if code == 9:
        return f"the peer's certificate is not valid yet ({message}): check both clocks"
    if code in _UNTRUSTED:
        return (
            f"the peer's certificate is not signed by a CA this side trusts, ca-cert.pem (the system's CAs for "
            f"a client without a credentials directory) ({message}): wrong CA?"
        )
    if code in (62, 64):
        name = f" {server_hostname!r}" if server_hostname else ""
        return (
            f"the peer's certificate is not valid for the host name{name} ({message}): connect by a name or "
            "address its subjectAltName lists, or give the name to check (tls-hostname=)"
        )
    return f"the peer's certificate was refused: {message}"


def _base_context(*, server: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _directory(creds_dir: str | os.PathLike[str]) -> Path:
    directory = Path(creds_dir)
    try:
        is_dir = stat.S_ISDIR(directory.stat().st_mode)
    except FileNotFoundError:
        raise TLSError(f"TLS credentials directory {directory} does not exist") from None
    except OSError as exc:
        raise TLSError(f"TLS credentials directory {directory}: {exc.strerror or exc}") from None
    if not is_dir:
        raise TLSError(f"TLS credentials directory {directory} is not a directory")
    return directory


def _read(path: Path, what: str) -> bytes:
    """The file's bytes, or a TLSError naming it and why it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSError(f"{path}: missing ({what})") from None
    except PermissionError:
        raise TLSError(f"{path}: cannot be read by this user (permission denied)") from None
    except OSError as exc:
        raise TLSError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _check_certificate(path: Path, what: str = "a PEM certificate") -> str:
    """The PEM text of ``path``, checked to hold certificates OpenSSL can parse."""
    data = _read(path, what)
    if _CERT_BEGIN not in data:
        raise TLSError(f"{path}: no certificate in it (no '{_CERT_BEGIN.decode()}' line)")
    text = data.decode("ascii", "replace")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise TLSError(f"{path}: a damaged PEM certificate ({exc.reason or exc})") from None
    return text


def _check_key(path: Path) -> None:
    data = _read(path, "a PEM private key")
    found = _KEY_BEGIN.search(data)
    if found is None:
        raise TLSError(f"{path}: no private key in it (no '-----BEGIN PRIVATE KEY-----' line)")
    if found.group(1) == b"ENCRYPTED" or b"Proc-Type: 4,ENCRYPTED" in data:
        raise TLSError(f"{path}: the key is encrypted; store it unencrypted, 0600 (openssl pkey -in KEY -out KEY)")


def _no_password() -> NoReturn:
    raise TLSError("the private key asks for a password; store it unencrypted, 0600")


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """``cert`` and its ``key`` into ``context``, each checked with an error naming the file."""
    _check_certificate(cert)
    _check_key(key)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(f"{key}: this key does not match the certificate {cert}") from None
        raise TLSError(f"{key}: a damaged PEM private key ({exc.reason or exc})") from None


def _load_ca(context: ssl.SSLContext, path: Path) -> None:
    context.load_verify_locations(
        cadata=_check_certificate(path, "the CA certificate that must have signed the peer's certificate")
    )


def _require_psk() -> None:
    if not hasattr(ssl.SSLContext, "set_psk_server_callback"):
        raise TLSError(
            "TLS-PSK needs Python 3.13 or later (ssl.SSLContext.set_psk_server_callback); this is Python "
            f"{'.'.join(map(str, sys.version_info[:3]))}: use x509 credentials (sendense-nbd tls init)"
        )
