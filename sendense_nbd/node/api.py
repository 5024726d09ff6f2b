"""The node's REST API (aiohttp, default port 8081), per docs/NODE_API.md.

Handlers parse requests into typed values at the edge and call the
:class:`~sendense_nbd.node.service.Node`; its domain errors become HTTP
answers through :data:`ERRORS`.
"""

from __future__ import annotations

from aiohttp import web

from sendense_nbd import fields
from sendense_nbd.errors import NodeBusy, UnknownJob, VSphereError
from sendense_nbd.http_api import MAX_BODY, ErrorMap, error_middleware, json_body
from sendense_nbd.node.requests import BackupRequest
from sendense_nbd.node.service import Node

PREFIX = "/api/v1"

#: The node's domain errors as HTTP answers (a Conflict answers 409 with its code, as in every API).
ERRORS: ErrorMap = [
    (UnknownJob, 404, "not_found"),
    (VSphereError, 502, "vsphere"),
    (NodeBusy, 503, "busy"),
]


def build_app(node: Node, *, token: str | None) -> web.Application:
    """The node API's aiohttp application (bearer auth when ``token`` is set)."""
    routes = web.RouteTableDef()

    @routes.post(PREFIX + "/backups")
    async def start(request: web.Request) -> web.Response:
        config = node.config
        body = BackupRequest.from_json(await json_body(request), hub_urls=config.hub_urls, nbd_hosts=config.nbd_hosts)
        return web.json_response(node.start_backup(body).to_json(), status=202)

    @routes.get(PREFIX + "/backups")
    async def list_jobs(request: web.Request) -> web.Response:
        return web.json_response({"backups": [job.to_json() for job in node.jobs()]})

    @routes.get(PREFIX + "/backups/{job}")
    async def status(request: web.Request) -> web.Response:
        return web.json_response(node.job(request.match_info["job"]).to_json())

    @routes.delete(PREFIX + "/backups/{job}")
    async def cancel(request: web.Request) -> web.Response:
        return web.json_response((await node.cancel(request.match_info["job"])).to_json())

    @routes.get(PREFIX + "/vms/disks")
    async def disks(request: web.Request) -> web.Response:
        vm_path = fields.vm_path(request.query.get("vm_path"))
        found = [
            {"key": disk.key, "capacity": disk.capacity, "label": disk.label, "uuid": disk.uuid}
            for disk in await node.disks(vm_path)
        ]
        return web.json_response({"vm_path": vm_path, "disks": found})

    @routes.get(PREFIX + "/vms")
    async def vms(request: web.Request) -> web.Response:
        return web.json_response({"vms": [vm.to_json() for vm in await node.vms()]})

    @routes.get(PREFIX + "/health")
    async def health(request: web.Request) -> web.Response:
        return web.json_response(node.health())

    app = web.Application(middlewares=[error_middleware(token, ERRORS)], client_max_size=MAX_BODY)
    app.add_routes(routes)
    return app
