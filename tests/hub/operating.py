"""An in-process hub on a hand-moved clock, with its API on a real socket, for the operating-layer tests.

The hub is the real :class:`~sendense_nbd.hub.service.Hub` and its aiohttp API; nodes, vcsim and the
backup client are real processes. Only the schedule's time is injected (:class:`ManualClock`): tests
move it with :func:`pump`, which also lets the real jobs run in real time meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sendense_nbd.hub.api import build_app
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.service import Hub, HubConfig
from tests.hub.conftest import free_port_range, retained

#: 2026-03-02T08:00:00Z, a Monday.
START = 1_772_438_400.0


class LocalHub:
    """A running in-process hub: ``hub``, ``clock``, ``url``, and ``call()`` for its API."""

    def __init__(self, hub: Hub, clock: ManualClock, url: str, session: aiohttp.ClientSession) -> None:
        self.hub, self.clock, self.url, self.session = hub, clock, url, session

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + "/api/v1" + path, json=body) as response:
            return response.status, await response.json(content_type=None)

    async def ok(self, method: str, path: str, body: object = None) -> Any:
        status, answer = await self.call(method, path, body)
        assert status < 300, (method, path, status, answer)
        return answer


@contextlib.asynccontextmanager
async def local_hub(repo: Path, *, clock: ManualClock, **config: Any) -> AsyncIterator[LocalHub]:
    """A hub on ``repo`` (its API on 127.0.0.1, its NBD ports from a free range) until the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    hub = Hub(HubConfig(repo=str(repo), nbd_ports=free_port_range(16), public_url=url, clock=clock, **config))
    await hub.start()
    runner = web.AppRunner(build_app(hub, token=None), access_log=None)
    await runner.setup()
    await web.SockSite(runner, listener).start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            yield LocalHub(hub, clock, url, session)
    finally:
        await runner.cleanup()
        hub.close()
        await hub.wait_closed()


async def pump(hub: LocalHub, until: Callable[[], Awaitable[bool]], *, step: float = 1.0, limit: float = 180.0) -> None:
    """Move the hub's clock ``step`` seconds at a time (so the scheduler ticks) until ``until()`` holds;
    real jobs run in real time meanwhile. Fails after ``limit`` real seconds."""
    deadline = time.monotonic() + limit
    while not await until():
        assert time.monotonic() < deadline, "the hub did not get there in time"
        await hub.clock.advance(step)
        await asyncio.sleep(0.1)


async def jobs_ended(hub: LocalHub, count: int) -> bool:
    """At least ``count`` backup jobs exist, none is pending or running, and each completed one's retention
    (which runs after its completion's answer) has run."""
    jobs = (await hub.ok("GET", "/backups"))["backups"]
    return len(jobs) >= count and all(
        job["state"] in ("failed", "cancelled") or (job["state"] == "completed" and retained(job)) for job in jobs
    )
