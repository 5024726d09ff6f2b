"""The nodes page over HTTP, as a browser without script uses it: a real in-process hub (its ``--node-url``
node and those registered through the page), nodes on real sockets, a logged-in session."""

from __future__ import annotations

import html
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sendense_nbd.errors import UnknownNode
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.policy.model import Policy
from tests.console.inprocess import Console, logged_in
from tests.console.listing_node import VERSION, ListingNode

TOKEN_VALUE = "node-secret-token-42"
IDENTITY = "SHA256:" + "A" * 43


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    node = await ListingNode(["/DC0/vm/web01"]).start()
    try:
        async with logged_in(tmp_path / "repo", clock=ManualClock(time.time()), node=node) as console:
            yield console
    finally:
        await node.close()


def flashes(page: str) -> str:
    found = re.search(r'<div id="flash" class="flashes">(.*?)</div>', page, re.S)
    assert found is not None, page
    return html.unescape(found.group(1))


def refused(page: str) -> str:
    """The sentence of a refused action."""
    found = re.search(r'<p class="flash error" role="alert" id="refused">(.*?)</p>', page, re.S)
    assert found is not None, page
    return found.group(1)


def row(page: str, name: str) -> str:
    """The table row of node ``name``."""
    start = page.index(f'<tr id="node-{name}">')
    return page[start : page.index("</tr>", start)]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_node_is_registered_checked_and_removed(console: Console) -> None:
    page = await console.page("/nodes")
    default = row(page, "default")
    assert "not checked yet" in default or "health-up" in default
    assert "from the hub's --node-url" in default and "/delete" not in default  # only its command line changes it
    for label, control in (("Name", "node-name"), ("URL", "node-url"), ("Token (optional)", "node-token"),
                           ("Tunnel identity (optional)", "node-tunnel")):  # fmt: skip
        assert f'<label for="{control}">{label}</label>' in page
    assert '<input id="node-token" name="token" type="password"' in page

    second = await ListingNode([]).start()
    try:
        body = {"name": "site-b", "url": second.url + "/", "token": TOKEN_VALUE, "tunnel_identity": IDENTITY}
        location, _ = await console.post("/nodes", body)
        assert location == "/nodes#node-site-b"
        record = await console.hub.nodes.get("site-b")
        assert (record.url, record.token, record.tunnel_identity) == (second.url, TOKEN_VALUE, IDENTITY)
        page = await console.page("/nodes")
        assert "Node site-b registered." in flashes(page) and TOKEN_VALUE not in page
        assert "not checked yet" in row(page, "site-b") and "token set" in row(page, "site-b")

        location, _ = await console.post("/nodes/site-b/check", {})
        assert location == "/nodes#node-site-b"
        page = await console.page("/nodes")
        assert f"Node site-b is up (version {VERSION})." in flashes(page)
        checked = row(page, "site-b")
        assert '<span class="health-up">up</span>' in checked and VERSION in checked
        assert "1 running" in checked and "2 queued" in checked and "<time datetime=" in checked
    finally:
        await second.close()

    await console.post("/nodes/site-b/check", {})
    page = await console.page("/nodes")
    assert "Node site-b is down:" in flashes(page) and 'role="alert"' in page
    assert '<span class="health-down">down</span>' in row(page, "site-b") and 'class="node-error"' in row(
        page, "site-b"
    )

    location, _ = await console.post("/nodes/site-b/delete", {})
    assert location == "/nodes"
    assert "Node site-b removed." in flashes(await console.page("/nodes"))
    with pytest.raises(UnknownNode):
        await console.hub.nodes.get("site-b")


async def test_a_refused_registration_shows_the_sentence_and_never_the_token(console: Console) -> None:
    script_url = "http://127.0.0.1:1/<script>alert(1)</script>"
    typed = {"name": "bad", "url": "ftp://example.org", "token": TOKEN_VALUE, "tunnel_identity": ""}
    _, page = await console.post("/nodes", typed, status=400)
    error = re.search(r'id="register-error">(.*?)</p>', page, re.S)
    assert error is not None and "must be an http:// or https:// URL" in error.group(1) and "{" not in error.group(1)
    assert 'value="bad"' in page and 'value="ftp://example.org"' in page and TOKEN_VALUE not in page

    _, page = await console.post("/nodes", {**typed, "url": script_url, "tunnel_identity": "nope"}, status=400)
    assert "unnel_identity must be an SSH key fingerprint" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    _, page = await console.post("/nodes", {"name": "default", "url": "http://127.0.0.1:1"}, status=409)
    assert "a node named &#39;default&#39; is registered already" in page.lower()

    await console.post("/nodes", {"name": "scripted", "url": script_url})
    page = await console.page("/nodes")
    assert "<code>http://127.0.0.1:1/&lt;script&gt;alert(1)&lt;/script&gt;</code>" in row(page, "scripted")
    assert "token none" in row(page, "scripted") and "<script>alert" not in page


async def test_removing_a_node_a_policy_uses_is_refused_with_the_sentence(console: Console) -> None:
    await console.post("/nodes", {"name": "site-c", "url": f"http://127.0.0.1:{closed_port()}"})
    spec = {"name": "uses-c", "node": "site-c", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 3600}}
    await console.hub.scheduler.add(Policy.from_json(spec))
    _, page = await console.post("/nodes/site-c/delete", {}, status=409)
    assert "ode &#39;site-c&#39; is used by the policies uses-c" in refused(page) and 'id="node-site-c"' in page
    await console.hub.nodes.get("site-c")
    _, page = await console.post("/nodes/default/delete", {}, status=409)
    assert "comes from the hub&#39;s --node-url" in refused(page)
    _, page = await console.post("/nodes/nobody/check", {}, status=404)
    assert "o node &#39;nobody&#39; is registered" in page


async def test_every_change_needs_the_csrf_token(console: Console) -> None:
    await console.page("/nodes")
    for path in ("/nodes", "/nodes/default/check", "/nodes/default/delete"):
        response = await console.client.post(path, {"name": "x", "url": "http://127.0.0.1:1"}, csrf=False)
        assert response.status == 403, path
        assert "CSRF token is missing" in await response.text()
    assert [record.name for record in await console.hub.nodes.records()] == ["default"]
