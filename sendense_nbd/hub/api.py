"""The hub's REST API (aiohttp), versioned under ``/api/v1``; errors are JSON with a code.

Bearer-token auth is required whenever the API listens on a non-loopback
address. See README "Hub" for curl examples and docs/HUB_API.md for the
calls the backup client makes.
"""

from __future__ import annotations

from aiohttp import web

from sendense_nbd import fields
from sendense_nbd.errors import (
    BadRequest,
    JobStateError,
    NodeError,
    NodeNotFound,
    PortError,
    RepositoryError,
    UnknownJob,
    UnknownPoint,
)
from sendense_nbd.http_api import MAX_BODY, ErrorMap, error, error_middleware, json_body
from sendense_nbd.hub import requests as req
from sendense_nbd.hub.jobs import Job
from sendense_nbd.hub.service import Hub

PREFIX = "/api/v1"

_ERRORS: ErrorMap = [
    (UnknownJob, 404, "not_found"),
    (UnknownPoint, 404, "not_found"),
    (NodeNotFound, 404, "not_found"),
    (JobStateError, 409, "conflict"),
    (PortError, 503, "ports_exhausted"),
    (NodeError, 502, "node_unavailable"),
    (RepositoryError, 409, "repository"),
]


def build_app(hub: Hub, *, token: str | None) -> web.Application:
    """The API over ``hub``; every body and query is parsed by :mod:`~sendense_nbd.hub.requests` first."""
    routes = web.RouteTableDef()

    @routes.post(PREFIX + "/backups")
    async def create_backup(request: web.Request) -> web.Response:
        job = await hub.create_backup(req.BackupRequest.from_json(await json_body(request)))
        return web.json_response(_backup(job), status=201)

    @routes.get(PREFIX + "/backups")
    async def list_backups(request: web.Request) -> web.Response:
        vm_path = None if request.query.get("vm_path") is None else _query_vm_path(request)
        jobs = await hub.jobs.list(vm_path=vm_path, kind="backup")
        return web.json_response({"backups": [_backup(job) for job in jobs]})

    @routes.get(PREFIX + "/backups/changeid")
    async def change_id(request: web.Request) -> web.Response:
        vm_path = _query_vm_path(request)
        key = req.disk_key_query(request.query.get("disk_key"))
        found = await hub.change_id(vm_path, key)
        if found is None:
            return error(404, "not_found", f"no completed backup of {vm_path} disk {key}")
        return web.json_response(found)

    @routes.get(PREFIX + "/backups/{job}")
    async def get_backup(request: web.Request) -> web.Response:
        return web.json_response(_backup(await hub.jobs.get(_job_id(request))))

    @routes.post(PREFIX + "/backups/{job}/progress")
    async def post_progress(request: web.Request) -> web.Response:
        job_id = _job_id(request)
        job = await hub.progress(job_id, req.parse_progress(await json_body(request)))
        return web.json_response({"job_id": job.id, "state": job.state})

    @routes.get(PREFIX + "/backups/{job}/progress")
    async def get_progress(request: web.Request) -> web.Response:
        job = await hub.jobs.get(_job_id(request))
        return web.json_response({"job_id": job.id, "state": job.state, "progress": job.progress})

    @routes.post(PREFIX + "/backups/{job}/complete")
    async def complete(request: web.Request) -> web.Response:
        job_id = _job_id(request)
        completion = req.Completion.from_json(await json_body(request))
        return web.json_response(_backup(await hub.complete(job_id, completion)))

    @routes.delete(PREFIX + "/backups/{job}")
    async def cancel(request: web.Request) -> web.Response:
        return web.json_response(_backup(await hub.cancel(_job_id(request))))

    @routes.get(PREFIX + "/points")
    async def points(request: web.Request) -> web.Response:
        vm_path = _query_vm_path(request)
        return web.json_response({"points": [p.to_json() for p in await hub.repository.points(vm_path)]})

    @routes.post(PREFIX + "/restores")
    async def restore(request: web.Request) -> web.Response:
        job = await hub.restore(req.RestoreRequest.from_json(await json_body(request)))
        return web.json_response(job.to_json(), status=201)

    @routes.delete(PREFIX + "/restores/{job}")
    async def stop_restore(request: web.Request) -> web.Response:
        return web.json_response((await hub.stop_restore(_job_id(request))).to_json())

    @routes.get(PREFIX + "/ports")
    async def ports(request: web.Request) -> web.Response:
        status = await hub.ports.status()
        status["exports"] = hub.exports.list()
        return web.json_response(status)

    app = web.Application(middlewares=[error_middleware(token, _ERRORS)], client_max_size=MAX_BODY)
    app.add_routes(routes)
    return app


def _job_id(request: web.Request) -> str:
    """The ``{job}`` of the path; a string that cannot be a job ID is an unknown job (404)."""
    raw = request.match_info["job"]
    job_id = fields.identifier(raw)
    if job_id is None:
        raise UnknownJob(f"no job {raw[:80]!r}")
    return job_id


def _query_vm_path(request: web.Request) -> str:
    value = request.query.get("vm_path")
    if value is None:
        raise BadRequest("give vm_path")
    return fields.vm_path(value)


def _backup(job: Job) -> dict[str, object]:
    out = job.to_json()
    out["job_id"] = out.pop("id")
    return out
