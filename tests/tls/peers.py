"""TLS peers for tests: certificates in qemu's directory layout, and TLS servers and clients.

The good credentials are a deployment made by ``sendense_nbd.tls.pki.init_pki`` (what
``sendense-nbd tls init`` writes): its hub directory serves, a node's directory is the client of
mutual TLS. The odd ones the refusal tests need are issued with the same module: signed by the
deployment's CA read back from disk (an expired certificate, one for another host name), or by
another CA. Each role has a directory in qemu's layout, read alike by qemu
(``--object tls-creds-x509,dir=DIR``), nbdkit (``--tls-certificates=DIR``), libnbd
(``?tls-certificates=DIR``) and our ``--tls-creds DIR``: ``ca-cert.pem`` always,
``server-cert.pem``/``server-key.pem`` for a server, ``client-cert.pem``/``client-key.pem`` for a
client that shows a certificate.

What the GnuTLS peers (qemu, nbdkit, libnbd) expect, learnt here:

* qemu checks certificates when it loads them, before any client comes: the CA needs
  basicConstraints CA:TRUE and keyUsage keyCertSign; a server certificate CA:FALSE, keyUsage
  digitalSignature *and* keyEncipherment (even for an EC key) and extendedKeyUsage serverAuth; a
  client certificate clientAuth. It refuses to start with an expired certificate ("The server
  certificate .../server-cert.pem has expired"), so an expired *server* is nbdkit or ours, and an
  expired client is libnbd or ours; and with a certificate its own ca-cert.pem does not sign
  ("Our own certificate ... failed validation against ... ca-cert.pem").
* qemu's server endpoint verifies client certificates unless ``verify-peer=off``.
* Unencrypted PKCS#8 PEM (``BEGIN PRIVATE KEY``) ECDSA P-256 keys are read by all three; key files
  at 0600 are fine (no peer insists on a mode).
* libnbd 1.14 checks the server's certificate against the host name of an ``nbds://`` URI (an IP
  address is matched against the IP SANs) but verifies nothing over ``nbds+unix://`` (no host
  name), and ignores ``tls-hostname=`` and ``tls-verify-peer=`` in URIs: tests use TCP on 127.0.0.1.
* qemu checks the host name (``tls-hostname=`` overrides it), IP addresses included.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sendense_nbd.tls import pki
from tests.conftest import require
from tests.peers import Processes

#: Names and addresses of every good server certificate.
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")
#: The only name on the wrong-name server certificate.
OTHER_NAME = "elsewhere.invalid"


@attrs.frozen
class Pki:
    """Credential directories for every case, all in qemu's layout.

    ``server``/``client``: the deployment's hub and node (the client's certificate makes mutual
    TLS); ``anonymous``: the CA alone (a client without a certificate); ``wrong_ca``: a client
    trusting another CA (it refuses every good server); ``foreign_client``: trusts the good CA (and
    the other), shows a certificate from the other CA (a server verifying clients refuses it);
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


def _read_ca(layout: pki.Layout) -> pki.Issued:
    """The deployment's CA, key and certificate, as ``tls init`` left them."""
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return pki.Issued(key, x509.load_pem_x509_certificate(layout.ca_cert.read_bytes()))


def _ca_only(directory: Path, ca: pki.Issued) -> Path:
    directory.mkdir(parents=True)
    (directory / "ca-cert.pem").write_bytes(ca.cert_pem())
    return directory


def _foreign_client(directory: Path, ca: pki.Issued, other: pki.Issued) -> Path:
    """A client certificate of ``other``, trusting both CAs: qemu validates its own certificate
    against its ca-cert.pem when it loads it, so only a bundle gets it as far as the server."""
    pki.write_client_credentials(directory, ca, pki.issue_certificate(other, "intruder", usage="client"))
    with open(directory / "ca-cert.pem", "ab") as bundle:
        bundle.write(other.cert_pem())
    return directory


def make_pki(root: Path) -> Pki:
    """Every credential directory of :class:`Pki`, under ``root``."""
    layout = pki.init_pki(root / "deploy", hub_names=SERVER_NAMES, hub_addresses=SERVER_ADDRESSES, nodes=["node1"])
    ca, other = _read_ca(layout), pki.make_ca("another CA")
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    ended = functools.partial(
        pki.issue_certificate, not_before=yesterday - datetime.timedelta(days=1), not_after=yesterday
    )
    return Pki(
        server=layout.hub,
        client=layout.nodes["node1"],
        anonymous=_ca_only(root / "anonymous", ca),
        wrong_ca=_ca_only(root / "wrong-ca", other),
        foreign_client=_foreign_client(root / "foreign-client", ca, other),
        expired_server=pki.write_server_credentials(
            root / "expired-server",
            ca,
            ended(ca, "localhost", usage="server", dns_names=SERVER_NAMES, ip_addresses=SERVER_ADDRESSES),
        ),
        expired_client=pki.write_client_credentials(root / "expired-client", ca, ended(ca, "node1", usage="client")),
        wrong_name_server=pki.write_server_credentials(
            root / "wrong-name-server",
            ca,
            pki.issue_certificate(ca, OTHER_NAME, usage="server", dns_names=[OTHER_NAME]),
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

    @property
    def nbds(self) -> str:
        """``nbds://HOST:PORT/EXPORT`` with nothing in the query (the credentials given elsewhere)."""
        return f"nbds://{self.host}:{self.port}/{self.export}"

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

    def qemu_nbd_unix(self, image: Path, creds: Path, *, export: str = "disk") -> str:
        """``qemu-nbd`` serving ``image`` over TLS on a unix socket; the socket's path."""
        sock = self.procs.socket_path()
        tls = f"tls-creds-x509,id=tls0,dir={creds},endpoint=server,verify-peer=off"
        cmd = [require("qemu-nbd"), "-f", "raw", "-t", "-x", export, "--object", tls, "--tls-creds", "tls0"]
        self.procs.start_unix([*cmd, "-k", sock, str(image)], sock)
        return sock

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
