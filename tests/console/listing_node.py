"""A node API on a real socket for the console's page tests: it lists VMs (one disk each), accepts every
backup the hub starts (the test plays the rest through the hub's own calls) and answers its health."""

from __future__ import annotations

from aiohttp import web

#: Each VM's one disk: its key and its size (bytes).
DISK = 2000
SIZE = 4 << 20
VERSION = "listing-node 1.0"


class ListingNode:
    """``vms``: the inventory paths it lists; ``url`` once :meth:`start` ran; ``started``: backup bodies."""

    def __init__(self, vms: list[str]) -> None:
        self.vms = vms
        self.url = ""
        self.started: list[dict[str, object]] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> ListingNode:
        async def vms(request: web.Request) -> web.Response:
            return web.json_response({"vms": [{"path": path, "name": path.rsplit("/", 1)[-1]} for path in self.vms]})

        async def disks(request: web.Request) -> web.Response:
            return web.json_response({"disks": [{"key": DISK, "capacity": SIZE}]})

        async def backup(request: web.Request) -> web.Response:
            self.started.append(await request.json())
            return web.json_response({}, status=202)

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"version": VERSION, "running_jobs": 1, "queued_jobs": 2, "max_jobs": 4})

        app = web.Application()
        app.add_routes(
            [
                web.get("/api/v1/vms", vms),
                web.get("/api/v1/vms/disks", disks),
                web.post("/api/v1/backups", backup),
                web.get("/api/v1/health", health),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
