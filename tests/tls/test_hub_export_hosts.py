"""Where nodes dial the hub's exports, checked before a job needs it (docs/TLS.md, "Hub and node").

The hub reads its certificate's names and refuses, at start and when a node is added or changed, an
export host a TLS client would refuse the certificate for (the check agrees with real TLS handshakes,
wildcards and IP addresses included); it refuses a wildcard ``--nbd-bind`` without ``--nbd-advertise``
under TLS, and plain exports on a network address unless ``--allow-plain-nbd`` says so. Real hubs
(processes and in-process), real certificates from ``tls init`` and ``issue_certificate``.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sendense_nbd import connect
from sendense_nbd.client.uri import NBDAddress
from sendense_nbd.errors import ConfigError, TLSError
from sendense_nbd.hub.certnames import CertificateNames, client_names
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.service import HubConfig
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.tls import (
    ServerCredentials,
    client_context,
    fingerprint,
    init_pki,
    issue_certificate,
    make_ca,
    server_context,
)
from sendense_nbd.tls.pki import write_client_credentials, write_server_credentials
from tests.hub.accepting_node import accepting_node
from tests.hub.conftest import Api, HubProcess, free_port_range
from tests.hub.operating import START, local_hub

VM_PATH = "/DC0/vm/DC0_H0_VM0"


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> ssl.SSLObject | None:
    """A TLS handshake in memory, the client connecting to ``host`` as our NBD client names it: the server's
    end when the client accepted the server's certificate, None when it refused it."""
    hostname = NBDAddress(host=host).server_hostname
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    near = client.wrap_bio(to_client, to_server, server_hostname=hostname)
    far_in, far_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    far = server.wrap_bio(far_in, far_out, server_side=True)
    done = [False, False]
    for _ in range(8):
        for index, side in enumerate((near, far)):
            try:
                side.do_handshake()
                done[index] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError:
                return None
        far_in.write(to_server.read())
        to_client.write(far_out.read())
        if all(done):
            return far
    raise AssertionError(f"the handshake for {host} did not end")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Server credential directories: SANs with a wildcard and addresses, and one with a common name only."""
    root = tmp_path_factory.mktemp("hosts")
    ca = make_ca()
    made = {
        "sans": issue_certificate(
            ca, "hub.example.com", usage="server", ip_addresses=["10.0.0.5", "fe80::1"],
            dns_names=["hub.example.com", "*.site.example.com", "*.com", "w*.example.net", "*.dot.example.com.",
                       "*.x-.example.com", "*.-y.example.com"],
        ),
        "cn-only": issue_certificate(ca, "Hub.Example.Org", usage="server"),
    }  # fmt: skip
    directories = {name: write_server_credentials(root / name, ca, issued) for name, issued in made.items()}
    directories["client"] = write_client_credentials(root / "client", ca, issue_certificate(ca, "n", usage="client"))
    return directories


HOSTS = [
    "hub.example.com",
    "HUB.Example.com",
    "hub.example.com.",
    "a.site.example.com",
    "A.Site.Example.COM",
    "site.example.com",
    "www.example.net",
    "a.b.site.example.com",
    "example.com",
    "x.com",
    "10.0.0.5",
    "10.0.0.6",
    "fe80::1",
    "fe80::1%lo",
    "fe80::2",
    "hub.example.org",
    "localhost",
    "127.0.0.1",
    # Wildcards OpenSSL's valid_star refuses (a trailing dot, a label ending or starting with '-') match only
    # their own text; a wildcard stands for letters, digits and '-' only, or a literal '*'.
    "a.dot.example.com.",
    "a.dot.example.com",
    "*.dot.example.com.",
    "a.x-.example.com",
    "a.-y.example.com",
    "a_b.site.example.com",
    "*.site.example.com",
]


@pytest.mark.parametrize("name", ["sans", "cn-only"])
def test_certificate_names_agree_with_a_tls_client(certificates: dict[str, Path], name: str) -> None:
    """For every host, the hub's check says what a real TLS handshake says (RFC 6125 as OpenSSL does it)."""
    names = CertificateNames.from_pem(certificates[name] / "server-cert.pem")
    server = server_context(certificates[name])
    client = client_context(certificates["client"])
    verdicts = {host: names.matches(host) for host in HOSTS}
    assert verdicts == {host: _handshake(server, client, host) is not None for host in HOSTS}
    expected = {
        "hub.example.com",
        "HUB.Example.com",
        "a.site.example.com",
        "A.Site.Example.COM",
        "10.0.0.5",
        "fe80::1",
        "fe80::1%lo",
        "*.dot.example.com.",
        "*.site.example.com",
    }
    if name == "cn-only":
        expected = {"hub.example.org"}
    assert {host for host, ok in verdicts.items() if ok} == expected
    shown = (
        "DNS:hub.example.com, DNS:*.site.example.com, DNS:*.com, DNS:w*.example.net, DNS:*.dot.example.com., "
        "DNS:*.x-.example.com, DNS:*.-y.example.com, IP:10.0.0.5, IP:fe80::1"
    )
    assert str(names) == (shown if name == "sans" else "DNS:hub.example.org")


def test_client_names_are_the_dns_names_else_the_common_name(tmp_path: Path, certificates: dict[str, Path]) -> None:
    """What the hub's exports bind to: a verified client certificate's DNS names, its common name only when it
    has none (RFC 6125 6.4.4, as for the server's names)."""
    ca = make_ca()
    issued = issue_certificate(ca, "s", usage="server", ip_addresses=["127.0.0.1"])
    server = write_server_credentials(tmp_path / "server", ca, issued)
    issued = issue_certificate(ca, "site1", usage="client", dns_names=["site1.example.com"])
    client = write_client_credentials(tmp_path / "client", ca, issued)
    far = _handshake(server_context(server, verify_client=True), client_context(client), "127.0.0.1")
    assert far is not None
    assert client_names(far.getpeercert()) == {"site1.example.com"}  # the common name does not count beside it
    same_ca = server_context(certificates["sans"], verify_client=True)
    far = _handshake(same_ca, client_context(certificates["client"]), "10.0.0.5")
    assert far is not None and client_names(far.getpeercert()) == {"n"}  # no DNS name: the common name
    assert client_names(None) == client_names({}) == frozenset()
    loaded = x509.load_pem_x509_certificate((certificates["client"] / "client-cert.pem").read_bytes())
    assert CertificateNames.from_certificate(loaded).dns == ("n",)  # no DNS name: the common name counts


def _hub(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sendense_nbd", "hub", "--repo", str(tmp_path / "repo"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def started() -> Iterator[list[HubProcess]]:
    hubs: list[HubProcess] = []
    yield hubs
    for hub in hubs:
        if hub.proc is not None and hub.proc.poll() is None:
            hub.stop()


def test_a_hub_refuses_export_hosts_and_plain_exports_that_cannot_work(
    tmp_path: Path, started: list[HubProcess]
) -> None:
    """Each refusal is a usage error before anything opens, naming the host and the certificate's names."""
    layout = init_pki(tmp_path / "pki", hub_names=["hub.example.com"], hub_addresses=["127.0.0.1"], nodes=["s1"])
    creds = ("--nbd-tls-creds", str(layout.hub), "--nbd-tls-verify-client")
    names = "(DNS:hub.example.com, IP:127.0.0.1)"

    wrong = _hub(tmp_path, *creds, "--nbd-advertise", "hub.example.org")
    assert wrong.returncode == 2, wrong.stderr
    assert f"--nbd-advertise) hub.example.org is not a name in the hub's certificate {names}" in wrong.stderr
    bound = _hub(tmp_path, *creds, "--nbd-bind", "127.0.0.2", "--nbd-tls", "require")
    assert bound.returncode == 2 and "without --nbd-advertise) 127.0.0.2 is not a name" in bound.stderr, bound.stderr
    wildcard = _hub(tmp_path, *creds, "--nbd-bind", "0.0.0.0", "--nbd-tls", "require")
    assert wildcard.returncode == 2, wildcard.stderr
    assert "--nbd-bind 0.0.0.0 is every address" in wildcard.stderr
    assert f"give --nbd-advertise with a name in the certificate (the certificate's names: {names[1:-1]})" in (
        " ".join(wildcard.stderr.split())
    )
    plain = _hub(tmp_path, "--nbd-bind", "0.0.0.0")
    assert plain.returncode == 2 and "plain NBD" in plain.stderr and "--allow-plain-nbd" in plain.stderr
    off = _hub(tmp_path, *creds, "--nbd-bind", "0.0.0.0", "--nbd-advertise", "hub.example.com")  # --nbd-tls off
    assert off.returncode == 2 and "without --nbd-tls require the exports of tunnel nodes" in off.stderr
    default = _hub(tmp_path, "--node-url", "http://127.0.0.1:9", "--node-transport", "tls")
    assert default.returncode == 2 and "the default node (--node-url): transport tls needs" in default.stderr
    orphan = _hub(tmp_path, "--node-nbd-host", "hub.example.com")
    assert orphan.returncode == 2 and "--node-nbd-host describes the default node: give --node-url" in orphan.stderr
    assert not (tmp_path / "repo").exists()

    # What works: a wildcard bind advertised by a name in the certificate; plain exports said out loud.
    tls = HubProcess(tmp_path / "repo", free_port_range(4), None, *creds, "--nbd-bind", "0.0.0.0",
                     "--nbd-advertise", "hub.example.com", "--nbd-tls", "require")  # fmt: skip
    allowed = HubProcess(tmp_path / "repo2", free_port_range(4), None, "--nbd-bind", "0.0.0.0", "--allow-plain-nbd")
    loopback = HubProcess(tmp_path / "repo3", free_port_range(4), None)  # the tunnel's default: as before
    for hub in (tls, allowed, loopback):
        started.append(hub.start())
        assert Api(hub.url).get("/ports")[0] == 200  # serving (and past installing its signal handlers)
        assert hub.stop() == 0


def test_a_hub_refuses_tls_exports_on_a_network_address_that_admit_any_client(
    tmp_path: Path, started: list[HubProcess]
) -> None:
    """TLS without client certificates off loopback lets any TLS client read and write the exports: refused
    before anything opens, like plain exports there, unless --allow-any-tls-client says so."""
    layout = init_pki(tmp_path / "pki", hub_names=["hub.example.com"])
    tls = ("--nbd-tls-creds", str(layout.hub), "--nbd-tls", "require", "--nbd-bind", "0.0.0.0",
           "--nbd-advertise", "hub.example.com")  # fmt: skip
    refused = _hub(tmp_path, *tls)
    assert refused.returncode == 2 and "--allow-any-tls-client" in refused.stderr, refused.stderr
    assert "without --nbd-tls-verify-client their TLS admits any TLS client" in " ".join(refused.stderr.split())
    assert not (tmp_path / "repo").exists()
    for extra in ("--allow-any-tls-client", "--nbd-tls-verify-client"):
        hub = HubProcess(tmp_path / f"repo{extra}", free_port_range(4), None, *tls, extra)
        started.append(hub.start())
        assert Api(hub.url).get("/ports")[0] == 200
        assert hub.stop() == 0


async def test_nodes_are_refused_export_hosts_the_certificate_does_not_name(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", hub_names=["hub.example.com", "*.hub.example.com"], hub_addresses=["127.0.0.1"])
    names = CertificateNames.from_pem(layout.hub / "server-cert.pem")
    tls = {"nbd_tls_creds": ServerCredentials(str(layout.hub), verify_client=True), "nbd_tls_names": names}
    clock = ManualClock(START)
    repo = tmp_path / "repo"
    async with local_hub(repo, clock=clock, **tls) as hub:
        body = {"name": "s1", "url": "http://127.0.0.1:9", "transport": "tls", "nbd_host": "hub.example.org"}
        status, answer = await hub.call("POST", "/nodes", body)
        assert status == 400, answer
        message = answer["error"]["message"]
        assert "the nbd_host of node 's1' hub.example.org is not a name in the hub's certificate" in message
        assert "(DNS:hub.example.com, DNS:*.hub.example.com, IP:127.0.0.1)" in message
        for host in ("hub.example.com", "a.hub.example.com", "127.0.0.1", None):
            await hub.ok("POST", "/nodes", {**body, "nbd_host": host, "name": f"ok-{host}"})
        tunnel = await hub.ok("POST", "/nodes", {**body, "name": "t1", "transport": "tunnel"})  # plain: no check
        assert tunnel["nbd_host"] == "hub.example.org"
        status, answer = await hub.call("PATCH", "/nodes/t1", {"transport": "tls"})  # the stored host counts
        assert status == 400 and "hub.example.org is not a name" in answer["error"]["message"], answer
        assert (await hub.ok("GET", "/nodes/t1"))["transport"] == "tunnel"
        await hub.ok("PATCH", "/nodes/t1", {"transport": "tls", "nbd_host": "b.hub.example.com"})
    # Every export requires TLS: a tunnel node's host is checked too, and a stored one refuses its backup.
    other = init_pki(tmp_path / "other", hub_names=["elsewhere.example.com"])
    elsewhere = {
        "nbd_tls_creds": ServerCredentials(str(other.hub)),
        "nbd_tls_names": CertificateNames.from_pem(other.hub / "server-cert.pem"),
        "nbd_advertise": "elsewhere.example.com",
    }
    async with local_hub(repo, clock=clock, nbd_tls=TLSMode.REQUIRE, **elsewhere) as hub:
        status, answer = await hub.call("POST", "/nodes", {"name": "t2", "url": "http://127.0.0.1:9",
                                                           "nbd_host": "127.0.0.1"})  # fmt: skip
        assert status == 400 and "127.0.0.1 is not a name" in answer["error"]["message"], answer
        status, answer = await hub.call("POST", "/backups", {"vm_path": VM_PATH, "node": "t1", "disks": [2000]})
        assert status == 409 and answer["error"]["code"] == "tls_host", answer
        assert (
            "b.hub.example.com is not a name in the hub's certificate (DNS:elsewhere.example.com)"
            in (answer["error"]["message"])
        )
        assert "node edit t1 --nbd-host" in answer["error"]["message"]
        assert (await hub.ok("GET", "/backups"))["backups"] == []
        assert (await hub.ok("GET", "/ports"))["used"] == []


def test_hub_config_checks_the_default_host_and_advertise(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki")
    names = CertificateNames.from_pem(layout.hub / "server-cert.pem")
    context = ServerCredentials(str(layout.hub))
    with pytest.raises(ConfigError, match=r"\(--nbd-advertise\) hub.example.com is not a name .*DNS:localhost"):
        HubConfig(repo=str(tmp_path / "r"), nbd_tls_creds=context, nbd_tls_names=names,
                  nbd_advertise="hub.example.com")  # fmt: skip
    with pytest.raises(ConfigError, match="--nbd-advertise 'hub:10809' must be a host name"):
        HubConfig(repo=str(tmp_path / "r"), nbd_advertise="hub:10809")
    with pytest.raises(ConfigError, match="--allow-plain-nbd"):
        HubConfig(repo=str(tmp_path / "r"), nbd_bind="::")
    assert HubConfig(repo=str(tmp_path / "r"), nbd_bind="::", allow_plain_nbd=True).export_tls().default_host == "::"
    config = HubConfig(repo=str(tmp_path / "r"), nbd_tls_creds=context, nbd_tls_names=names, nbd_advertise="localhost")
    assert config.export_tls().default_host == "localhost"
    assert not (tmp_path / "r").exists()


async def test_a_patch_that_leaves_the_route_alone_is_not_checked_against_a_new_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After the hub gets another certificate, a node's stored host no longer works (logged at start, 409
    tls_host at a backup), but rotating its token or changing its URL is not refused for it; changing its route
    still is."""
    layout = init_pki(tmp_path / "pki", hub_names=["hub.example.com"], hub_addresses=["127.0.0.1"])
    names = CertificateNames.from_pem(layout.hub / "server-cert.pem")
    first = {"nbd_tls_creds": ServerCredentials(str(layout.hub)), "nbd_tls_names": names}
    repo, clock = tmp_path / "repo", ManualClock(START)
    async with local_hub(repo, clock=clock, **first) as hub:
        body = {"name": "s1", "url": "http://127.0.0.1:9", "transport": "tls", "nbd_host": "hub.example.com"}
        await hub.ok("POST", "/nodes", body)
    other = init_pki(tmp_path / "other", hub_names=["elsewhere.example.com"])
    elsewhere = {"nbd_tls_creds": ServerCredentials(str(other.hub)), "nbd_advertise": "elsewhere.example.com",
                 "nbd_tls_names": CertificateNames.from_pem(other.hub / "server-cert.pem")}  # fmt: skip
    caplog.set_level(logging.WARNING, logger="sendense_nbd.hub.service")
    async with local_hub(repo, clock=clock, **elsewhere) as hub:
        [logged] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("node s1 cannot back up")]
        assert "the nbd_host of node 's1' hub.example.com is not a name in the hub's certificate" in logged
        rotated = await hub.ok("PATCH", "/nodes/s1", {"token": "rotated-after-a-leak"})
        assert rotated["token"] is True and rotated["nbd_host"] == "hub.example.com"
        await hub.ok("PATCH", "/nodes/s1", {"url": "http://127.0.0.1:10", "hub_url": "https://h:1"})
        status, answer = await hub.call("POST", "/backups", {"vm_path": VM_PATH, "node": "s1", "disks": [2000]})
        assert status == 409 and answer["error"]["code"] == "tls_host", answer
        status, answer = await hub.call("PATCH", "/nodes/s1", {"transport": "tls"})  # the route: checked
        assert status == 400 and "hub.example.com is not a name" in answer["error"]["message"], answer
        await hub.ok("PATCH", "/nodes/s1", {"nbd_host": None})  # the default host, which the certificate names


async def test_a_node_that_pins_the_hubs_certificate_is_not_refused_names_it_never_checks(tmp_path: Path) -> None:
    """A node with ``[tls] fingerprint`` checks the hub's certificate by its pin, not by a name: registered with
    tls_pinned, its nbd_host need not be in the certificate, and its backup's export is read with the pin."""
    layout = init_pki(tmp_path / "pki", hub_names=["hub.example.com"], nodes=["p1"])
    names = CertificateNames.from_pem(layout.hub / "server-cert.pem")
    tls = {"nbd_tls_creds": ServerCredentials(str(layout.hub), verify_client=True), "nbd_tls_names": names,
           "nbd_advertise": "hub.example.com"}  # fmt: skip
    certificate = x509.load_pem_x509_certificate((layout.hub / "server-cert.pem").read_bytes())
    pin = fingerprint(certificate.public_bytes(serialization.Encoding.DER))
    async with accepting_node() as node, local_hub(tmp_path / "repo", clock=ManualClock(START), **tls) as hub:
        body = {"name": "p1", "url": node.url, "transport": "tls", "nbd_host": "127.0.0.1"}
        status, answer = await hub.call("POST", "/nodes", body)
        assert status == 400 and "127.0.0.1 is not a name" in answer["error"]["message"], answer
        assert (await hub.ok("POST", "/nodes", {**body, "tls_pinned": True}))["tls_pinned"] is True
        status, answer = await hub.call("PATCH", "/nodes/p1", {"tls_pinned": False})  # the route: checked
        assert status == 400 and "127.0.0.1 is not a name" in answer["error"]["message"], answer
        status, answer = await hub.call("PATCH", "/nodes/p1", {"tls_pinned": "yes"})
        assert status == 400 and "tls_pinned must be true or false" in answer["error"]["message"], answer
        disks = [{"key": 2000, "capacity": 1 << 20}]
        job = await hub.ok("POST", "/backups", {"vm_path": VM_PATH, "node": "p1", "disks": disks})
        uri = job["detail"]["disks"][0]["uri"]
        assert uri.startswith("nbds://127.0.0.1:") and node.received[-1]["targets"] == {"2000": uri}
        async with connect(f"{uri}?tls-certificates={layout.nodes['p1']}&tls-fingerprint={pin}") as nbd:
            assert nbd.size == 1 << 20
        with pytest.raises(TLSError, match="not valid for the host name '127.0.0.1'"):  # what the pin spares it
            async with connect(f"{uri}?tls-certificates={layout.nodes['p1']}"):
                pass


def test_a_certificate_whose_names_cannot_be_read_is_a_sentence(tmp_path: Path) -> None:
    """A certificate that parses but whose extensions do not (two subjectAltNames: cryptography raises
    DuplicateExtension, not a ValueError) stops the hub with the file's name, not a traceback."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "hub")])
    now = datetime.datetime.now(datetime.UTC)
    builder = x509.CertificateBuilder(subject_name=name, issuer_name=name, public_key=key.public_key(),
                                      serial_number=1, not_valid_before=now, not_valid_after=now)  # fmt: skip
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("aaaa")]), critical=False)
    builder = builder.add_extension(x509.IssuerAlternativeName([x509.DNSName("aaaa")]), critical=False)
    der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    ian, san = b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11"  # the OIDs of the two extensions
    twice = x509.load_der_x509_certificate(der.replace(ian, san)).public_bytes(serialization.Encoding.PEM)
    path = tmp_path / "server-cert.pem"
    path.write_bytes(twice)
    with pytest.raises(TLSError, match=r"server-cert.pem: not a PEM certificate whose names can be read \(.*reissue"):
        CertificateNames.from_pem(path)
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSError, match="not a PEM certificate whose names can be read"):
        CertificateNames.from_pem(path)
