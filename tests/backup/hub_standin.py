"""A recording stand-in for the hub's backup API (docs/HUB_API.md), over real HTTP.

The hub itself is a later issue; until it lands this server keeps the client honest about the
contract: it answers change-ID reads from its own records, records every progress report, and only
stores change IDs posted with a completion. ``fail_complete`` makes completions answer 503.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web


class HubStandin:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.change_ids: dict[tuple[str, int], dict[str, Any]] = {}
        self.progress: list[dict[str, Any]] = []
        self.completions: list[dict[str, Any]] = []
        self.fail_complete = False
        self.unauthorized = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        @web.middleware
        async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
            if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
                self.unauthorized += 1
                return web.json_response({"error": {"code": "unauthorized"}}, status=401)
            return await handler(request)

        app = web.Application(middlewares=[auth])
        app.router.add_get("/api/v1/backups/changeid", self._changeid)
        app.router.add_post("/api/v1/backups/{job}/progress", self._progress)
        app.router.add_post("/api/v1/backups/{job}/complete", self._complete)
        return app

    async def _changeid(self, request: web.Request) -> web.Response:
        key = (request.query["vm_path"], int(request.query["disk_key"]))
        record = self.change_ids.get(key)
        if record is None:
            return web.json_response({"error": {"code": "not_found"}}, status=404)
        return web.json_response(record)

    async def _progress(self, request: web.Request) -> web.Response:
        self.progress.append({"job": request.match_info["job"], **await request.json()})
        return web.json_response({"ok": True})

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.completions.append({"job": request.match_info["job"], **body})
        if self.fail_complete:
            return web.json_response({"error": {"code": "unavailable"}}, status=503)
        if body["status"] == "completed":
            for disk in body["disks"]:
                self.change_ids[(body["vm_path"], disk["disk_key"])] = {
                    "change_id": disk["change_id"],
                    "disk_uuid": disk["disk_uuid"],
                    "capacity": disk["capacity"],
                }
        return web.json_response({"ok": True})

    def start(self) -> HubStandin:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._runner = web.AppRunner(self._app(), access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the hub stand-in did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
