"""The node's REST API (aiohttp, default port 8081), per docs/NODE_API.md."""

from __future__ import annotations

from aiohttp import web

from sendense_nbd.errors import VSphereError
from sendense_nbd.http_api import BadRequest, ErrorMap, error_middleware, json_body
from sendense_nbd.node.service import Node

PREFIX = "/api/v1"

_ERRORS: ErrorMap = [(VSphereError, 502, "vsphere")]


def build_app(node: Node, *, token: str | None) -> web.Application:
    routes = web.RouteTableDef()

    @routes.post(PREFIX + "/backups")
    async def start(request: web.Request) -> web.Response:
        job = node.start_backup(await json_body(request))
        return web.json_response(job.to_json(), status=202)

    @routes.get(PREFIX + "/backups")
    async def list_jobs(request: web.Request) -> web.Response:
        return web.json_response({"backups": [job.to_json() for job in node.jobs.values()]})

    @routes.get(PREFIX + "/backups/{job}")
    async def status(request: web.Request) -> web.Response:
        job = node.jobs.get(request.match_info["job"])
        if job is None:
            raise BadRequest(f"no job {request.match_info['job']}", "not_found")
        return web.json_response(job.to_json())

    @routes.delete(PREFIX + "/backups/{job}")
    async def cancel(request: web.Request) -> web.Response:
        return web.json_response((await node.cancel(request.match_info["job"])).to_json())

    @routes.get(PREFIX + "/vms/disks")
    async def disks(request: web.Request) -> web.Response:
        vm_path = request.query.get("vm_path")
        if not vm_path:
            raise BadRequest("give vm_path")
        return web.json_response({"vm_path": vm_path, "disks": await node.disks(vm_path)})

    app = web.Application(middlewares=[error_middleware(token, _ERRORS)], client_max_size=1 << 20)
    app.add_routes(routes)
    return app
