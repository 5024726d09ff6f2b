"""An in-process hub with its console, and an HTTP client that logs in like a browser (no script).

For the console's HTTP-level tests: the real Hub, SQLite store and repository in a temporary
directory, the real aiohttp application on a real socket.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from sendense_nbd.hub.api import build_app
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.service import Hub, HubConfig
from tests.hub.conftest import free_port_range

TOKEN = "console-test-token"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class ConsoleClient:
    """A cookie-keeping client of one hub's console: ``login()``, ``get()``, ``post()`` (with the page's CSRF token)."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url, self.session = url, session
        self.csrf: str | None = None

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str]:
        """GET ``path`` (redirects not followed); remembers the page's CSRF token."""
        async with self.session.get(self.url + path, allow_redirects=False, **kwargs) as response:
            text = await response.text()
        found = _CSRF.search(text)
        if found and path != "/login" and not path.startswith("/login?"):
            self.csrf = found.group(1)
        return response.status, text

    async def post(self, path: str, data: dict[str, str] | None = None, *, csrf: bool = True) -> aiohttp.ClientResponse:
        """POST a form to ``path`` with the session's CSRF token (unless ``csrf=False``); the response, read."""
        fields = dict(data or {})
        if csrf:
            assert self.csrf is not None, "GET a console page first: it carries the CSRF token"
            fields.setdefault("csrf", self.csrf)
        async with self.session.post(self.url + path, data=fields, allow_redirects=False) as response:
            await response.read()
            return response

    async def login(self, token: str = TOKEN) -> aiohttp.ClientResponse:
        """Fill in the login form; the response (303 to the dashboard when the token is right)."""
        status, page = await self.get("/login")
        assert status == 200, page
        found = _CSRF.search(page)
        assert found is not None, page
        async with self.session.post(
            self.url + "/login", data={"csrf": found.group(1), "token": token, "next": "/"}, allow_redirects=False
        ) as response:
            await response.read()
        if response.status == 303:
            await self.get("/")
        return response


@contextlib.asynccontextmanager
async def console_hub(repo: Path, *, token: str | None = TOKEN, **config: Any) -> AsyncIterator[tuple[Hub, str]]:
    """A hub on ``repo`` with its API and console on 127.0.0.1 until the block ends: (hub, base URL)."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    hub = Hub(HubConfig(repo=str(repo), nbd_ports=free_port_range(8), public_url=url, **config))
    await hub.start()
    runner = web.AppRunner(build_app(hub, token=token), access_log=None)
    await runner.setup()
    await web.SockSite(runner, listener).start()
    try:
        yield hub, url
    finally:
        await runner.cleanup()
        hub.close()
        await hub.wait_closed()


@contextlib.asynccontextmanager
async def console_client(url: str) -> AsyncIterator[ConsoleClient]:
    """A fresh browser-like client (its own cookie jar) of the console at ``url``."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield ConsoleClient(url, session)


@attrs.frozen
class Console:
    """A logged-in client (``client``) of an in-process ``hub`` on ``clock``, with its ``node`` stand-in
    (None: the hub has no node); ``page()`` and ``post()`` assert the status they expect."""

    hub: Hub
    clock: ManualClock
    client: ConsoleClient
    node: Any = None

    async def page(self, path: str, status: int = 200) -> str:
        """GET ``path``; its body."""
        got, text = await self.client.get(path)
        assert got == status, (path, got, text[:2000])
        return text

    async def post(self, path: str, data: dict[str, str], status: int = 303) -> tuple[str, str]:
        """POST a form; (its Location or "", its body)."""
        response = await self.client.post(path, data)
        text = await response.text()
        assert response.status == status, (path, response.status, text[:2000])
        return response.headers.get("Location", ""), text


@contextlib.asynccontextmanager
async def logged_in(repo: Path, *, clock: ManualClock, node: Any = None, **config: Any) -> AsyncIterator[Console]:
    """A hub on ``repo`` (its node ``node``, whose ``url`` it calls) and a client logged in to its console."""
    if node is not None:
        config["node_url"] = node.url
    async with console_hub(repo, clock=clock, **config) as (hub, url), console_client(url) as client:
        assert (await client.login()).status == 303
        yield Console(hub, clock, client, node)
