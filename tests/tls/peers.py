"""TLS peers for tests: certificates in qemu's directory layout, and TLS servers and clients.

Certificates are made with the ``cryptography`` library: a test CA, a server certificate for
localhost/127.0.0.1/::1, a client certificate, and the odd ones the refusal tests need (another
CA, an expired certificate, a certificate for another host name). Each role gets a directory in
qemu's layout, read alike by qemu (``--object tls-creds-x509,dir=DIR``), nbdkit
(``--tls-certificates=DIR``), libnbd (``?tls-certificates=DIR``) and our ``--tls-creds DIR``:
``ca-cert.pem`` always, ``server-cert.pem``/``server-key.pem`` for a server,
``client-cert.pem``/``client-key.pem`` for a client that shows a certificate.

What GnuTLS (qemu, nbdkit, libnbd) expects of such a directory, learnt here:

* qemu checks certificates when it loads them, before any client comes: the CA needs
  basicConstraints CA:TRUE and keyUsage keyCertSign; a server certificate CA:FALSE, keyUsage
  digitalSignature *and* keyEncipherment (even for an EC key) and extendedKeyUsage serverAuth; a
  client certificate clientAuth. It refuses to start with an expired or not yet valid
  certificate ("The certificate ... has expired"), so an expired *server* is nbdkit or ours.
* qemu's server endpoint verifies client certificates unless ``verify-peer=off``.
* Keys are unencrypted PEM; PKCS#8 (``BEGIN PRIVATE KEY``) EC keys are read by all three.
* Key files at 0600 are fine for all of them (no peer insists on it); ours are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import require
from tests.peers import Processes

#: The names every good server certificate carries.
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")
#: The only name on the wrong-name server certificate.
OTHER_NAME = "elsewhere.invalid"

_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@attrs.frozen
class Issued:
    """A certificate and its private key, both PEM."""

    cert: bytes
    key: bytes


@attrs.define
class Authority:
    """A test certificate authority: a self-signed CA certificate and its key."""

    name: str
    key: ec.EllipticCurvePrivateKey = attrs.field(factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    cert: x509.Certificate = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        builder = self._builder(subject, self.key.public_key(), _now() - _DAY, _now() + 30 * _DAY)
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(_usage(ca=True), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
        )
        self.cert = builder.sign(self.key, hashes.SHA256())

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM (a ``ca-cert.pem``)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def _builder(
        self, subject: x509.Name, public: ec.EllipticCurvePublicKey, start: datetime.datetime, end: datetime.datetime
    ) -> x509.CertificateBuilder:
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )

    def issue(
        self,
        common_name: str,
        *,
        server: bool,
        names: tuple[str, ...] = SERVER_NAMES,
        addresses: tuple[str, ...] = SERVER_ADDRESSES,
        expired: bool = False,
    ) -> Issued:
        """A server (SANs ``names`` and ``addresses``) or client certificate signed by this CA;
        ``expired`` ended yesterday (valid for a day before that)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = (_now() - 2 * _DAY, _now() - _DAY) if expired else (_now() - _DAY, _now() + 30 * _DAY)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = self._builder(subject, key.public_key(), start, end)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(_usage(ca=False), critical=True)
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
            sans += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_creds(directory: Path, ca: Authority, *, server: Issued | None = None, client: Issued | None = None) -> Path:
    """``directory`` in qemu's layout: ``ca-cert.pem``, and the server's and/or client's pair (keys 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(ca.cert_pem)
    for role, issued in (("server", server), ("client", client)):
        if issued is not None:
            (directory / f"{role}-cert.pem").write_bytes(issued.cert)
            key = directory / f"{role}-key.pem"
            key.write_bytes(issued.key)
            os.chmod(key, 0o600)
    return directory


@attrs.frozen
class Pki:
    """Credential directories for every case, all in qemu's layout.

    ``server``/``client``: the good pair (the client's certificate makes mutual TLS);
    ``anonymous``: the CA alone (a client without a certificate);
    ``wrong_ca``: a client trusting another CA (it refuses every good server);
    ``foreign_client``: a client trusting the good CA, with a certificate from another CA
    (a server verifying clients refuses it);
    ``expired_server``/``expired_client``: certificates that ended yesterday;
    ``wrong_name_server``: a certificate for :data:`OTHER_NAME` only.
    """

    server: Path
    client: Path
    anonymous: Path
    wrong_ca: Path
    foreign_client: Path
    expired_server: Path
    expired_client: Path
    wrong_name_server: Path


def make_pki(root: Path) -> Pki:
    """Every credential directory of :class:`Pki`, under ``root``."""
    ca, other = Authority("sendense test CA"), Authority("another CA")
    return Pki(
        server=write_creds(root / "server", ca, server=ca.issue("localhost", server=True)),
        client=write_creds(root / "client", ca, client=ca.issue("node1", server=False)),
        anonymous=write_creds(root / "anonymous", ca),
        wrong_ca=write_creds(root / "wrong-ca", other),
        foreign_client=write_creds(root / "foreign-client", ca, client=other.issue("intruder", server=False)),
        expired_server=write_creds(
            root / "expired-server", ca, server=ca.issue("localhost", server=True, expired=True)
        ),
        expired_client=write_creds(root / "expired-client", ca, client=ca.issue("node1", server=False, expired=True)),
        wrong_name_server=write_creds(
            root / "wrong-name-server", ca, server=ca.issue(OTHER_NAME, server=True, names=(OTHER_NAME,), addresses=())
        ),
    )


def _tcp_listening(port: int) -> bool:
    """Something listens on TCP ``port`` of 127.0.0.1 or any address (state 0A in /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port and address in ("0100007F", "00000000"):
                return True
    return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@attrs.frozen
class Endpoint:
    """A server on ``127.0.0.1:port`` serving ``export``, and the ways each client names it."""

    port: int
    export: str = ""
    host: str = "127.0.0.1"

    def uri(self, creds: Path | None = None, **query: str) -> str:
        """``nbds://HOST:PORT/EXPORT?tls-certificates=CREDS&QUERY`` for libnbd and us; ``nbd://`` without ``creds``."""
        params = ({"tls-certificates": str(creds)} if creds else {}) | query
        tail = "?" + "&".join(f"{key}={value}" for key, value in params.items()) if params else ""
        return f"{'nbds' if creds else 'nbd'}://{self.host}:{self.port}/{self.export}{tail}"

    def image_opts(self, *, tls: bool = True, hostname: str | None = None) -> str:
        """qemu's ``--image-opts`` for this export, using the ``--object`` of :func:`qemu_tls_object`;
        ``hostname``: the name to check the server's certificate against (``tls-hostname``)."""
        opts = {"driver": "nbd", "host": self.host, "port": str(self.port), "export": self.export}
        opts |= ({"tls-creds": "tls0"} if tls else {}) | ({"tls-hostname": hostname} if hostname else {})
        return ",".join(f"{key}={value}" for key, value in opts.items())


def qemu_tls_object(creds: Path, endpoint: str = "client") -> list[str]:
    """qemu's ``--object tls-creds-x509`` named ``tls0`` reading ``creds``."""
    return ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint={endpoint}"]


class TLSPeers:
    """qemu-nbd and nbdkit serving over TLS on 127.0.0.1, started in a :class:`tests.peers.Processes`."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs

    def _start_tcp(self, command: Callable[[int], list[str]]) -> int:
        """Start ``command(port)`` on a free port; another port when one was taken meanwhile."""
        for _ in range(3):
            port = _free_port()
            try:
                self.procs.start(command(port), lambda: _tcp_listening(port))
            except AssertionError as exc:
                if "in use" not in str(exc):
                    raise
                continue
            return port
        raise AssertionError("no free port after 3 tries")

    def qemu_nbd(
        self, image: Path, creds: Path, *, verify_client: bool = False, export: str = "disk", fmt: str = "raw"
    ) -> Endpoint:
        """``qemu-nbd`` serving ``image`` with x509 credentials ``creds`` (mutual TLS with ``verify_client``)."""
        tls = f"tls-creds-x509,id=tls0,dir={creds},endpoint=server,verify-peer={'on' if verify_client else 'off'}"
        base = [require("qemu-nbd"), "-f", fmt, "-t", "-e", "8", "-x", export, "--object", tls, "--tls-creds", "tls0"]
        port = self._start_tcp(lambda port: [*base, "-b", "127.0.0.1", "-p", str(port), str(image)])
        return Endpoint(port, export)

    def nbdkit(self, creds: Path, *plugin: str, verify_client: bool = False, tls: str = "require") -> Endpoint:
        """``nbdkit --tls=TLS --tls-certificates=CREDS PLUGIN...`` (``--tls-verify`` with ``verify_client``)."""
        options = [f"--tls={tls}", f"--tls-certificates={creds}", *(["--tls-verify"] if verify_client else [])]
        base = [require("nbdkit"), "-f", "--exit-with-parent", "-i", "127.0.0.1", *options]
        port = self._start_tcp(lambda port: [*base, "-p", str(port), *plugin])
        return Endpoint(port)


def nbdcopy_out(uri: str) -> bytes:
    """The whole export as nbdcopy reads it (the judge of what a server holds)."""
    result = subprocess.run([require("nbdcopy"), uri, "-"], capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def refused(*cmd: str | Path) -> str:
    """Run a client that must fail; its stderr, with libnbd's debug log (the server's messages are there)."""
    env = os.environ | {"LIBNBD_DEBUG": "1"}
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=30, env=env, check=False)
    assert result.returncode != 0, f"{cmd} succeeded:\n{result.stdout}"
    return result.stderr
