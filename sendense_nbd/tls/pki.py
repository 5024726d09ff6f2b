"""A deployment's certificates (``sendense-nbd tls init``): a CA, the hub's server certificate and
a client certificate per node, written in qemu's layout. Keys are ECDSA P-256, written unencrypted
(PKCS#8 PEM) with mode 0600; nothing that exists is ever overwritten.

docs/TLS.md gives the openssl command for every step.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sendense_nbd.errors import TLSError
from sendense_nbd.tls.credentials import CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY

#: Certificates start this long before they are made, for clocks a little behind.
BACKDATE = datetime.timedelta(minutes=5)
#: The CA outlives the certificates it signs by default.
CA_DAYS = 3650
DEFAULT_DAYS = 825

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@attrs.frozen
class Issued:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def cert_pem(self) -> bytes:
        """The certificate in PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The key in unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


@attrs.frozen
class Layout:
    """What :func:`init_pki` wrote: the CA's files, the hub's directory and each node's."""

    ca_cert: Path
    ca_key: Path
    hub: Path
    nodes: dict[str, Path]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "sendense-nbd CA", *, days: int = CA_DAYS) -> Issued:
    """A self-signed CA (basicConstraints CA:TRUE, path length 0; keyCertSign, cRLSign)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - BACKDATE
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return Issued(key, builder.sign(key, hashes.SHA256()))


def issue_certificate(
    ca: Issued,
    common_name: str,
    *,
    usage: Literal["server", "client"],
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A certificate signed by ``ca`` for a TLS server or client, with a fresh key.

    ``dns_names`` and ``ip_addresses`` go in the subjectAltName, which clients check the host
    name against. ``not_before``/``not_after`` override the validity (tests make expired ones).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else _now() - BACKDATE
    end = not_after if not_after is not None else start + datetime.timedelta(days=days)
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    names = [x509.DNSName(name) for name in dns_names] + [_ip(address) for address in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs handshakes (keyEncipherment too, which
    qemu's certificate checks ask of TLS certificates)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ip(address: str) -> x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        raise TLSError(f"{address!r} is not an IP address (give host names as names)") from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def write_server_credentials(directory: str | os.PathLike[str], ca: Issued, server: Issued) -> Path:
    """``directory`` made with ca-cert.pem, server-cert.pem and server-key.pem (0600)."""
    return _write_set(Path(directory), ca, server, SERVER_CERT, SERVER_KEY)


def write_client_credentials(directory: str | os.PathLike[str], ca: Issued, client: Issued) -> Path:
    """``directory`` made with ca-cert.pem, client-cert.pem and client-key.pem (0600)."""
    return _write_set(Path(directory), ca, client, CLIENT_CERT, CLIENT_KEY)


def _write_set(directory: Path, ca: Issued, leaf: Issued, cert_name: str, key_name: str) -> Path:
    """The three files, or (on a failure) none of them."""
    files = [(CA_CERT, ca.cert_pem(), 0o644), (cert_name, leaf.cert_pem(), 0o644), (key_name, leaf.key_pem(), 0o600)]
    _refuse_existing([directory / name for name, _, _ in files])
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise TLSError(f"{directory}: cannot be created: {exc.strerror or exc}") from None
    written: list[Path] = []
    try:
        for name, data, mode in files:
            _write(directory / name, data, mode)
            written.append(directory / name)
    except TLSError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return directory


def _write(path: Path, data: bytes, mode: int) -> None:
    """A new file (never replacing one) with ``mode`` from its creation on; none if writing fails."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise TLSError(f"{path} exists: refusing to overwrite it") from None
    except OSError as exc:
        raise TLSError(f"{path}: cannot be created: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(fd, mode)
            file.write(data)
    except OSError as exc:
        path.unlink(missing_ok=True)  # no partial file (a key cut short would fail only when used)
        raise TLSError(f"{path}: cannot be written: {exc.strerror or exc}") from None


def _refuse_existing(paths: Sequence[Path]) -> None:
    there = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if there:
        raise TLSError(f"refusing to overwrite existing credentials: {', '.join(there)}")


def init_pki(
    directory: str | os.PathLike[str],
    *,
    hub_names: Sequence[str] = (),
    hub_addresses: Sequence[str] = (),
    nodes: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
) -> Layout:
    """A CA, the hub's server certificate and one client certificate per node under ``directory``:
    ``ca-cert.pem``, ``ca-key.pem`` (0600), ``hub/`` and ``nodes/NAME/`` in qemu's layout.

    Without names or addresses the hub's certificate is for ``localhost`` and ``127.0.0.1``.
    Refuses (before writing anything) when one of these files exists. The deployment is written in a
    temporary directory next to ``directory``, then renamed into place: a failure leaves nothing.
    """
    root = Path(directory)
    if days < 1:
        raise TLSError(f"--days {days}: a certificate must be valid for a day at least")
    names, addresses = (hub_names, hub_addresses) if hub_names or hub_addresses else (["localhost"], ["127.0.0.1"])
    for address in addresses:
        _ip(address)
    for name in names:
        if _is_ip(name):
            raise TLSError(f"--hub-name {name}: an IP address; give it with --hub-address")
    _check_node_names(nodes)
    hub, node_dirs = root / "hub", {name: root / "nodes" / name for name in nodes}
    planned = [root / CA_CERT, root / "ca-key.pem", hub]
    _refuse_existing(planned + list(node_dirs.values()))
    ca = make_ca(days=max(CA_DAYS, days))
    server = issue_certificate(ca, names[0] if names else addresses[0], usage="server", dns_names=names,
                               ip_addresses=addresses, days=days)  # fmt: skip
    try:
        root.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    except OSError as exc:
        raise TLSError(f"{root}: cannot be created: {exc.strerror or exc}") from None
    try:
        _write(staging / CA_CERT, ca.cert_pem(), 0o644)
        _write(staging / "ca-key.pem", ca.key_pem(), 0o600)
        write_server_credentials(staging / "hub", ca, server)
        for name in nodes:
            issued = issue_certificate(ca, name, usage="client", days=days)
            write_client_credentials(staging / "nodes" / name, ca, issued)
        _move_into(staging, root, [CA_CERT, "ca-key.pem", "hub"] + [f"nodes/{name}" for name in nodes])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Layout(ca_cert=root / CA_CERT, ca_key=root / "ca-key.pem", hub=hub, nodes=node_dirs)


def _move_into(staging: Path, root: Path, entries: Sequence[str]) -> None:
    """``staging`` renamed to ``root``; into it, entry by entry, when ``root`` exists (all or none)."""
    moved: list[str] = []
    try:
        staging.chmod(0o755)
        if not root.exists() and not root.is_symlink():
            staging.rename(root)
            return
        if any(entry.startswith("nodes/") for entry in entries):
            (root / "nodes").mkdir(mode=0o755, exist_ok=True)
        for entry in entries:
            _refuse_existing([root / entry])
            (staging / entry).rename(root / entry)
            moved.append(entry)
    except (OSError, TLSError) as exc:
        for entry in moved:
            (root / entry).rename(staging / entry)
        if isinstance(exc, TLSError):
            raise
        raise TLSError(f"{root}: cannot be written: {exc.strerror or exc}") from None


def _check_node_names(nodes: Sequence[str]) -> None:
    for name in nodes:
        if not _NODE_NAME.fullmatch(name):
            raise TLSError(f"node name {name!r}: use letters, digits, '.', '_' and '-' (a directory is named so)")
    if len(set(nodes)) != len(nodes):
        raise TLSError("a node is named twice")
