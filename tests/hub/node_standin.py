"""A stand-in node (the VMware side) speaking the node API the hub calls, over real HTTP.

The real node is a later issue. This one answers ``GET /vms/disks``, ``GET /vms`` and ``GET /health``
from vcsim's JSON line and, on ``POST /backups``, runs the real backup client (``sendense-backup
migrate``) against vcsim and the targets the hub gave, reporting to the hub's API. ``hold`` makes it
accept jobs without running them (for crash tests).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.vmware.vsphere import STANDIN_PLUGIN


class NodeStandin:
    def __init__(self, vcsim: dict[str, Any], workdir: Path) -> None:
        self.vcsim = vcsim
        self.workdir = workdir
        self.hold = False
        self.received: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        #: The job IDs ``GET /backups/{job}`` asked for.
        self.asked: list[str] = []
        self.results: dict[str, tuple[int, str, str]] = {}
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        password = workdir / "node-password"
        password.write_text(vcsim["password"] + "\n")
        password.chmod(0o600)
        self.password_file = password

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        routes = web.RouteTableDef()

        @routes.get("/api/v1/vms/disks")
        async def disks(request: web.Request) -> web.Response:
            vm = next((v for v in self.vcsim["vms"] if v["path"] == request.query["vm_path"]), None)
            if vm is None:
                return web.json_response({"error": {"code": "not_found"}}, status=404)
            return web.json_response(
                {"disks": [{"key": d["key"], "capacity": d["capacityInBytes"]} for d in vm["disks"]]}
            )

        @routes.get("/api/v1/vms")
        async def vms(request: web.Request) -> web.Response:
            listed = [{"path": v["path"], "name": v["name"], "uuid": v["uuid"]} for v in self.vcsim["vms"]]
            return web.json_response({"vms": sorted(listed, key=lambda vm: vm["path"])})

        @routes.get("/api/v1/health")
        async def health(request: web.Request) -> web.Response:
            running = sum(1 for task in self._running.values() if not task.done())
            return web.json_response({"version": "standin", "running_jobs": running, "queued_jobs": 0, "max_jobs": 4})

        @routes.post("/api/v1/backups")
        async def backup(request: web.Request) -> web.Response:
            body = await request.json()
            self.received.append(body)
            if not self.hold:
                self._running[body["job_id"]] = asyncio.ensure_future(self._run(body))
            return web.json_response({"job_id": body["job_id"]}, status=202)

        @routes.get("/api/v1/backups/{job}")
        async def status(request: web.Request) -> web.Response:
            job = request.match_info["job"]
            self.asked.append(job)
            if job not in {received["job_id"] for received in self.received}:
                return web.json_response({"error": {"code": "not_found", "message": f"no job {job!r}"}}, status=404)
            task = self._running.get(job)
            state = "running" if task is None or not task.done() else "ended"
            return web.json_response({"job_id": job, "state": state})

        @routes.delete("/api/v1/backups/{job}")
        async def cancel(request: web.Request) -> web.Response:
            job = request.match_info["job"]
            self.cancelled.append(job)
            task = self._running.get(job)
            if task is not None:
                task.cancel()
            return web.json_response({"job_id": job})

        app = web.Application()
        app.add_routes(routes)
        return app

    async def _run(self, body: dict[str, Any]) -> None:
        targets = ",".join(f"{key}={uri}" for key, uri in body["targets"].items())
        command = [
            str(Path(sys.executable).parent / "sendense-backup"), "migrate",
            "--vmware-endpoint", f"127.0.0.1:{self.vcsim['port']}",
            "--vmware-username", self.vcsim["username"],
            "--vmware-password-file", str(self.password_file),
            "--vmware-thumbprint", self.vcsim["thumbprintSha256"],
            "--vmware-path", body["vm_path"], "--nbd-targets", targets, "--job-id", body["job_id"],
            "--mode", body["mode"], "--api-url", body["api_url"], "--api-retries", "1",
            "--vddk-plugin", f"python {STANDIN_PLUGIN}", "--connections", "2", "--json",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("OMA_API_URL", "VMWARE_PASSWORD")}
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
        )
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            proc.terminate()
            await proc.wait()
            raise
        self.results[body["job_id"]] = (proc.returncode or 0, out.decode(), err.decode())

    def start(self, port: int = 0) -> NodeStandin:
        """Serve on 127.0.0.1 (``port``: 0 for any free one, or a dead node's port to stand in for its restart)."""
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            runner = web.AppRunner(self._app(), access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", port)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
            ready.set()
            loop.run_forever()
            for task in self._running.values():
                task.cancel()
            loop.run_until_complete(asyncio.gather(*self._running.values(), return_exceptions=True))
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the node stand-in did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop = None  # stopped: a second stop does nothing
