"""The node's REST API (aiohttp, default port 8081), per docs/NODE_API.md."""

from __future__ import annotations

from aiohttp import web

from sendense_nbd import fields
from sendense_nbd.errors import BadRequest, NodeBusy, VSphereError
from sendense_nbd.http_api import MAX_BODY, ErrorMap, error_middleware, json_body
from sendense_nbd.node.requests import BackupRequest
from sendense_nbd.node.service import Node

PREFIX = "/api/v1"

_ERRORS: ErrorMap = [(VSphereError, 502, "vsphere"), (NodeBusy, 503, "busy")]


def build_app(node: Node, *, token: str | None) -> web.Application:
    routes = web.RouteTableDef()

    @routes.post(PREFIX + "/backups")
    async def start(request: web.Request) -> web.Response:
        body = BackupRequest.from_json(await json_body(request), hub_url=node.config.hub_url)
        job = node.start_backup(body)
        return web.json_response(job.to_json(), status=202)

    @routes.get(PREFIX + "/backups")
    async def list_jobs(request: web.Request) -> web.Response:
        return web.json_response({"backups": [job.to_json() for job in node.jobs.values()]})

    @routes.get(PREFIX + "/backups/{job}")
    async def status(request: web.Request) -> web.Response:
        job = node.jobs.get(request.match_info["job"])
        if job is None:
            raise BadRequest(f"no job {request.match_info['job'][:80]!r}", "not_found")
        return web.json_response(job.to_json())

    @routes.delete(PREFIX + "/backups/{job}")
    async def cancel(request: web.Request) -> web.Response:
        return web.json_response((await node.cancel(request.match_info["job"])).to_json())

    @routes.get(PREFIX + "/vms/disks")
    async def disks(request: web.Request) -> web.Response:
        vm_path = fields.vm_path(request.query.get("vm_path"))
        return web.json_response({"vm_path": vm_path, "disks": await node.disks(vm_path)})

    app = web.Application(middlewares=[error_middleware(token, _ERRORS)], client_max_size=MAX_BODY)
    app.add_routes(routes)
    return app
