"""A node API that accepts every job and runs none, over real HTTP: what the hub sent is kept to be read."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import attrs
from aiohttp import web


@attrs.define
class AcceptingNode:
    """Where it listens, and the bodies of the ``POST /api/v1/backups`` it accepted, in order."""

    url: str
    received: list[dict[str, Any]] = attrs.Factory(list)


@contextlib.asynccontextmanager
async def accepting_node() -> AsyncIterator[AcceptingNode]:
    """A node on 127.0.0.1 that answers ``POST /backups`` 202 (and ``GET /health``) until the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    node = AcceptingNode(f"http://127.0.0.1:{listener.getsockname()[1]}")

    async def accept(request: web.Request) -> web.Response:
        body = await request.json()
        node.received.append(body)
        return web.json_response({"job_id": body["job_id"], "state": "queued"}, status=202)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"version": "accepting", "running_jobs": 0, "queued_jobs": 0, "max_jobs": 8})

    app = web.Application()
    app.router.add_post("/api/v1/backups", accept)
    app.router.add_get("/api/v1/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, listener).start()
    try:
        yield node
    finally:
        await runner.cleanup()
