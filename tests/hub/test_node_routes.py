"""What the hub tells each node: the hub API URL to report to (per node, else ``--public-url``), the exports'
host (an IPv6 zone id escaped per RFC 6874), and the default node of ``--node-url`` written whole from its
options at every start.

Real hubs (in-process on a manual clock, and ``sendense-nbd hub`` processes), a real node API that accepts
jobs, real HTTP and the hub CLI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sendense_nbd.client.uri import parse_uri
from sendense_nbd.errors import BadRequest, ConfigError
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.nodes import nbd_host
from sendense_nbd.hub.service import HubConfig
from sendense_nbd.node.config import load as load_node_config
from sendense_nbd.node.requests import BackupRequest
from sendense_nbd.tls import ServerCredentials, init_pki
from tests.hub.accepting_node import accepting_node
from tests.hub.conftest import Api, HubProcess
from tests.hub.operating import START, LocalHub, local_hub

MIB = 1 << 20
FINGERPRINT = "SHA256:" + "A1b2" * 10 + "xyz"


async def _backup(hub: LocalHub, node: str, vm: str) -> dict[str, object]:
    body = {"vm_path": f"/DC0/vm/{vm}", "node": node, "disks": [{"key": 2000, "capacity": MIB}]}
    job = await hub.ok("POST", "/backups", body)
    assert job["state"] == "running", job
    return dict(job)


async def test_each_node_gets_its_own_hub_url_else_the_public_url(tmp_path: Path) -> None:
    async with accepting_node() as node, local_hub(tmp_path / "repo", clock=ManualClock(START)) as hub:
        tunnel = await hub.ok("POST", "/nodes", {"name": "t1", "url": node.url, "hub_url": "http://127.0.0.1:18082/"})
        assert tunnel["hub_url"] == "http://127.0.0.1:18082"  # a trailing / cut, as a node's url
        plain = await hub.ok("POST", "/nodes", {"name": "p1", "url": node.url})
        assert plain["hub_url"] is None
        await _backup(hub, "t1", "a")
        await _backup(hub, "p1", "b")
        assert [body["api_url"] for body in node.received] == ["http://127.0.0.1:18082", hub.url]
        edited = await hub.ok("PATCH", "/nodes/p1", {"hub_url": "https://hub.example.com:8443"})
        assert edited["hub_url"] == "https://hub.example.com:8443"
        await _backup(hub, "p1", "c")
        assert (await hub.ok("PATCH", "/nodes/t1", {"hub_url": None}))["hub_url"] is None
        await _backup(hub, "t1", "d")
        assert [body["api_url"] for body in node.received][2:] == ["https://hub.example.com:8443", hub.url]
        for bad in ("ftp://hub", "http://u:p@hub:1", "hub:8082", 5):
            status, answer = await hub.call("POST", "/nodes", {"name": "x", "url": node.url, "hub_url": bad})
            assert status == 400 and answer["error"]["message"].startswith("hub_url"), (bad, answer)


async def test_an_ipv6_zone_id_is_escaped_in_the_export_uri_and_parsed_back(tmp_path: Path) -> None:
    """``nbd_host`` fe80::1%lo gives ``nbd://[fe80::1%25lo]:PORT/...`` (RFC 6874); our URI parser reads the
    zone back (and gives the same URI), the address resolves with lo's scope id, and a node pinned to that
    hub accepts the targets."""
    async with accepting_node() as node, local_hub(tmp_path / "repo", clock=ManualClock(START)) as hub:
        record = await hub.ok("POST", "/nodes", {"name": "z1", "url": node.url, "nbd_host": "fe80::1%lo"})
        assert record["nbd_host"] == "fe80::1%lo"
        job = await _backup(hub, "z1", "a")
        [sent] = node.received
    [uri] = sent["targets"].values()
    port = job["detail"]["disks"][0]["port"]  # type: ignore[index]
    assert uri == f"nbd://[fe80::1%25lo]:{port}/{job['job_id']}-2000"
    address = parse_uri(uri)
    assert (address.host, address.port, address.uri) == ("fe80::1%lo", port, uri)
    assert address.server_hostname == "fe80::1"  # the certificate names the address, not this side's interface
    resolved = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)[0][4]
    assert resolved[0] == "fe80::1" and resolved[3] == socket.if_nametoindex("lo")
    hub_url = "http://[fe80::1%25lo]:8082"
    assert BackupRequest.from_json({**sent, "api_url": hub_url}, hub_urls=(hub_url,)).targets == ((2000, uri),)
    for bad in ("fe80::1%a?b", "fe80::1%", "fe80::1%" + "x" * 65):
        with pytest.raises(BadRequest, match="nbd_host"):
            nbd_host(bad)


async def test_the_default_node_is_written_whole_from_the_command_line(tmp_path: Path) -> None:
    """A node named default registered through the API, then ``--node-url``: none of its fields stays."""
    layout = init_pki(tmp_path / "pki")
    tls = {"nbd_tls_creds": ServerCredentials(str(layout.hub))}
    repo, clock = tmp_path / "repo", ManualClock(START)
    async with accepting_node() as node:
        async with local_hub(repo, clock=clock, **tls) as hub:
            stale = {"name": "default", "url": node.url, "token": "secret-1", "tunnel_identity": FINGERPRINT,
                     "transport": "tls", "nbd_host": "localhost", "hub_url": "https://localhost:8443"}  # fmt: skip
            await hub.ok("POST", "/nodes", stale)
            await hub.ok("GET", "/nodes/default?check=1")
        async with local_hub(repo, clock=clock, node_url=node.url + "/") as hub:
            default = await hub.ok("GET", "/nodes/default")
            expected = {"url": node.url, "token": False, "tunnel_identity": None, "transport": "tunnel",
                        "nbd_host": None, "hub_url": None, "configured": "command line"}  # fmt: skip
            assert {key: default[key] for key in expected} == expected
            assert default["version"] == "accepting"  # the same URL: what was seen of it still holds
            await _backup(hub, "default", "a")
            assert node.received[-1]["api_url"] == hub.url
            assert node.received[-1]["targets"]["2000"].startswith("nbd://127.0.0.1:")
        given = {"node_url": "http://127.0.0.1:9", "node_token": "secret-2", "node_tunnel_identity": FINGERPRINT,
                 "node_transport": "tls", "node_nbd_host": "localhost",
                 "node_hub_url": "https://localhost:8443"}  # fmt: skip
        async with local_hub(repo, clock=clock, **tls, **given) as hub:
            default = await hub.ok("GET", "/nodes/default")
            expected = {"url": "http://127.0.0.1:9", "token": True, "tunnel_identity": FINGERPRINT, "transport": "tls",
                        "nbd_host": "localhost", "hub_url": "https://localhost:8443", "version": None,
                        "last_contact": None}  # fmt: skip
            assert {key: default[key] for key in expected} == expected  # a new URL: what was seen is forgotten
            status, answer = await hub.call("PATCH", "/nodes/default", {"transport": "tunnel"})
            assert status == 409 and answer["error"]["code"] == "configured", answer


def test_hub_config_names_the_default_nodes_option_at_fault(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    for option, value, message in (
        ("node_tunnel_identity", "SHA256:x", "--node-tunnel-identity: tunnel_identity must be"),
        ("node_transport", "ssh", "--node-transport: transport must be tunnel"),
        ("node_nbd_host", "hub:1", "--node-nbd-host: nbd_host 'hub:1' must be"),
        ("node_hub_url", "ftp://hub", "--node-hub-url: hub_url 'ftp://hub' must be an http:// or https:// URL"),
        ("node_transport", "tls", "the default node (--node-url): transport tls needs the hub's NBD TLS"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            HubConfig(repo=repo, node_url="http://127.0.0.1:9", **{option: value})
    with pytest.raises(
        ConfigError, match="--node-transport, --node-hub-url describe the default node: give --node-url too"
    ):
        HubConfig(repo=repo, node_hub_url="http://127.0.0.1:1", node_transport="tls")
    assert not (tmp_path / "repo").exists()


def test_the_hub_and_node_commands_set_every_field(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    """``sendense-nbd hub --node-url ... --node-transport/--node-nbd-host/--node-hub-url/--node-tunnel-identity/
    --node-tls-pinned``, and ``node add/edit --hub-url/--no-hub-url/--tls-pinned/--no-tls-pinned``."""
    layout = init_pki(tmp_path / "pki")
    hub = hub_factory(
        "http://127.0.0.1:9", "--nbd-tls-creds", str(layout.hub), "--node-transport", "tls", "--node-nbd-host",
        "10.0.0.9", "--node-hub-url", "https://localhost:8443", "--node-tunnel-identity", FINGERPRINT,
        "--node-tls-pinned",  # 10.0.0.9 is not in the certificate: the node pins it instead
    )  # fmt: skip
    default = Api(hub.url).get("/nodes/default")[1]
    assert (default["transport"], default["nbd_host"], default["hub_url"], default["tunnel_identity"]) == (
        "tls", "10.0.0.9", "https://localhost:8443", FINGERPRINT,
    )  # fmt: skip
    assert default["tls_pinned"] is True

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("SENDENSE_HUB_URL", "SENDENSE_HUB_TOKEN_FILE")}
        command = [sys.executable, "-m", "sendense_nbd", "node", *args, "--hub", hub.url]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)

    added = cli("add", "t1", "--url", "http://127.0.0.1:9", "--hub-url", "http://127.0.0.1:18082")
    assert added.returncode == 0 and json.loads(added.stdout)["hub_url"] == "http://127.0.0.1:18082", added.stderr
    edited = cli("edit", "t1", "--no-hub-url")
    assert edited.returncode == 0 and json.loads(edited.stdout)["hub_url"] is None, edited.stderr
    both = cli("edit", "t1", "--no-hub-url", "--hub-url", "http://127.0.0.1:1")
    assert both.returncode == 2 and "--no-hub-url and a new hub_url contradict each other" in both.stderr
    pinned = cli(
        "add", "p1", "--url", "http://127.0.0.1:9", "--transport", "tls", "--nbd-host", "10.0.0.9", "--tls-pinned"
    )
    assert pinned.returncode == 0 and json.loads(pinned.stdout)["tls_pinned"] is True, pinned.stderr
    unpinned = cli("edit", "p1", "--no-tls-pinned")  # its host is not in the certificate: refused
    assert unpinned.returncode != 0 and "10.0.0.9 is not a name in the hub's certificate" in unpinned.stderr
    moved = cli("edit", "p1", "--no-tls-pinned", "--nbd-host", "localhost")
    assert moved.returncode == 0 and json.loads(moved.stdout)["tls_pinned"] is False, moved.stderr


async def test_export_hosts_reach_the_node_in_the_form_it_compares(tmp_path: Path) -> None:
    """A bracketed, uncompressed ``--nbd-advertise`` goes into the URIs as :mod:`ipaddress` prints it (not
    ``nbd://[[...]]``), ``nbd_host`` ``Hub.Example.COM.`` and the RFC 6874 form ``[fe80::1%25lo]`` are stored in
    normal form, and nodes whose ``[node]`` settings write the same hosts another way take the targets."""
    advertise = {"nbd_advertise": "[2001:DB8:0::1]"}
    async with accepting_node() as node, local_hub(tmp_path / "repo", clock=ManualClock(START), **advertise) as hub:
        await hub.ok("POST", "/nodes", {"name": "v6", "url": node.url})
        dotted = await hub.ok("POST", "/nodes", {"name": "dot", "url": node.url, "nbd_host": "Hub.Example.COM."})
        zoned = await hub.ok("POST", "/nodes", {"name": "zone", "url": node.url, "nbd_host": "[fe80::1%25lo]"})
        assert (dotted["nbd_host"], zoned["nbd_host"]) == ("hub.example.com", "fe80::1%lo")
        for name, vm in (("v6", "a"), ("dot", "b"), ("zone", "c")):
            await _backup(hub, name, vm)
        targets = [next(iter(body["targets"].values())) for body in node.received]
    assert [parse_uri(uri).host for uri in targets] == ["2001:db8::1", "hub.example.com", "fe80::1%lo"]
    assert targets[0].startswith("nbd://[2001:db8::1]:") and targets[2].startswith("nbd://[fe80::1%25lo]:")
    pins = (
        'hub_url = "http://[2001:0DB8:0:0::1]:8082"\n',
        'hub_url = "http://HUB.example.com.:8082"\n',
        'hub_url = "http://hub.example.com:8082"\nnbd_host = "[fe80::1%25lo]"\n',
    )
    for target, pin in zip(targets, pins, strict=True):
        path = tmp_path / "node.toml"
        path.write_text(f'[vcenter]\nendpoint = "vc:443"\nusername = "u"\npassword = "p"\n[node]\n{pin}')
        path.chmod(0o600)
        config = load_node_config(str(path))
        body = {"job_id": "j1", "vm_path": "/DC0/vm/x", "api_url": config.hub_urls[0], "targets": {"2000": target}}
        taken = BackupRequest.from_json(body, hub_urls=config.hub_urls, nbd_hosts=config.nbd_hosts)
        assert taken.targets == ((2000, target),), pin
    with pytest.raises(ConfigError, match=r"--nbd-advertise '\[\[2001:db8::1\]\]' must be a host name"):
        HubConfig(repo=str(tmp_path / "r"), nbd_advertise="[[2001:db8::1]]")
    with pytest.raises(ConfigError, match=r"--nbd-bind 'hub_1' must be a host name"):
        HubConfig(repo=str(tmp_path / "r"), nbd_bind="hub_1")
    for bad, why in (("[fe80::1%25]", "zone id is 1-64"), ("[fe80::1%2eth0]", "a zone id follows %25"),
                     ("[10.0.0.1]", "brackets hold an IPv6 address only")):  # fmt: skip
        with pytest.raises(BadRequest, match=why):
            nbd_host(bad)
