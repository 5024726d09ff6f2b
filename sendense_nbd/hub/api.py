"""The hub's REST API (aiohttp), versioned under ``/api/v1``; errors are JSON with a code.

Bearer-token auth is required whenever the API listens on a non-loopback
address. See README "Hub" for curl examples and docs/HUB_API.md for the
calls the backup client makes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from sendense_nbd.http_api import BadRequest, ErrorMap, error, error_middleware, json_body
from sendense_nbd.hub.jobs import Job, JobStateError, UnknownJob
from sendense_nbd.hub.node_client import NodeError
from sendense_nbd.hub.ports import PortError
from sendense_nbd.hub.repository import RepositoryError
from sendense_nbd.hub.service import Hub

PREFIX = "/api/v1"

_ERRORS: ErrorMap = [
    (UnknownJob, 404, "not_found"),
    (JobStateError, 409, "conflict"),
    (PortError, 503, "ports_exhausted"),
    (NodeError, 502, "node_unavailable"),
    (RepositoryError, 409, "repository"),
]


def build_app(hub: Hub, *, token: str | None) -> web.Application:
    routes = web.RouteTableDef()

    @routes.post(PREFIX + "/backups")
    async def create_backup(request: web.Request) -> web.Response:
        body = await json_body(request)
        job = await hub.create_backup(
            _field(body, "vm_path", str), _field(body, "mode", str, "auto"), body.get("disks")
        )
        return web.json_response(_backup(job), status=201)

    @routes.get(PREFIX + "/backups")
    async def list_backups(request: web.Request) -> web.Response:
        jobs = await hub.jobs.list(vm_path=request.query.get("vm_path"), kind="backup")
        return web.json_response({"backups": [_backup(job) for job in jobs]})

    @routes.get(PREFIX + "/backups/changeid")
    async def change_id(request: web.Request) -> web.Response:
        vm_path, key = request.query.get("vm_path"), request.query.get("disk_key", "")
        if not vm_path or not key.isdigit():
            raise BadRequest("give vm_path and disk_key")
        found = await hub.change_id(vm_path, int(key))
        if found is None:
            return error(404, "not_found", f"no completed backup of {vm_path} disk {key}")
        return web.json_response(found)

    @routes.get(PREFIX + "/backups/{job}")
    async def get_backup(request: web.Request) -> web.Response:
        return web.json_response(_backup(await hub.jobs.get(request.match_info["job"])))

    @routes.post(PREFIX + "/backups/{job}/progress")
    async def post_progress(request: web.Request) -> web.Response:
        job = await hub.progress(request.match_info["job"], await json_body(request))
        return web.json_response({"job_id": job.id, "state": job.state})

    @routes.get(PREFIX + "/backups/{job}/progress")
    async def get_progress(request: web.Request) -> web.Response:
        job = await hub.jobs.get(request.match_info["job"])
        return web.json_response({"job_id": job.id, "state": job.state, "progress": job.progress})

    @routes.post(PREFIX + "/backups/{job}/complete")
    async def complete(request: web.Request) -> web.Response:
        return web.json_response(_backup(await hub.complete(request.match_info["job"], await json_body(request))))

    @routes.delete(PREFIX + "/backups/{job}")
    async def cancel(request: web.Request) -> web.Response:
        return web.json_response(_backup(await hub.cancel(request.match_info["job"])))

    @routes.get(PREFIX + "/points")
    async def points(request: web.Request) -> web.Response:
        vm_path = request.query.get("vm_path")
        if not vm_path:
            raise BadRequest("give vm_path")
        return web.json_response({"points": [p.to_json() for p in await hub.repository.points(vm_path)]})

    @routes.post(PREFIX + "/restores")
    async def restore(request: web.Request) -> web.Response:
        body = await json_body(request)
        job = await hub.restore(
            _field(body, "point_id", str),
            _field(body, "action", str, "export"),
            fmt=_field(body, "format", str, "raw"),
            path=body.get("path") if isinstance(body.get("path"), str) else None,
        )
        return web.json_response(job.to_json(), status=201)

    @routes.delete(PREFIX + "/restores/{job}")
    async def stop_restore(request: web.Request) -> web.Response:
        return web.json_response((await hub.stop_restore(request.match_info["job"])).to_json())

    @routes.get(PREFIX + "/ports")
    async def ports(request: web.Request) -> web.Response:
        status = await hub.ports.status()
        status["exports"] = hub.exports.list()
        return web.json_response(status)

    app = web.Application(middlewares=[error_middleware(token, _ERRORS)], client_max_size=1 << 20)
    app.add_routes(routes)
    return app


def _field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name, default)
    if not isinstance(value, kind):
        raise BadRequest(f"{name} is required and must be a {kind.__name__}")
    return value


def _backup(job: Job) -> dict[str, object]:
    out = job.to_json()
    out["job_id"] = out.pop("id")
    return out
