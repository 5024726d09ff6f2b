"""The hub's REST API (aiohttp), versioned under ``/api/v1``; errors are JSON with a code.

Handlers parse every body and query with :mod:`~sendense_nbd.hub.requests`,
call one :class:`~sendense_nbd.hub.service.Hub` method, and turn its typed
answer into JSON; domain errors become HTTP answers through :data:`_ERRORS`.
A change of a job another live hub of the cluster runs (progress, completion,
cancel, a restore's stop) answers 307 to that hub's API, same path and query.
Bearer-token auth is required whenever the API listens on a non-loopback
address. See README "Hub" for curl examples and docs/HUB_API.md for the
calls the backup client makes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sendense_nbd import fields
from sendense_nbd.errors import (
    BadRequest,
    ClusterLockTimeout,
    CompletionMismatch,
    CopyDamaged,
    CopyLocked,
    InsufficientSpace,
    InvalidBackup,
    JobStateError,
    NodeError,
    NodeNotFound,
    OffsiteError,
    OtherHub,
    PortError,
    RepositoryError,
    StoreUnavailable,
    UnknownCopy,
    UnknownJob,
    UnknownNode,
    UnknownPoint,
    UnknownPolicy,
)
from sendense_nbd.http_api import MAX_BODY, ErrorMap, error, error_middleware, json_body
from sendense_nbd.hub import paths
from sendense_nbd.hub import requests as req
from sendense_nbd.hub.alerts import AlertQuery
from sendense_nbd.hub.console.app import is_api, setup_console
from sendense_nbd.hub.copy_api import copy_routes
from sendense_nbd.hub.jobs import Job, JobKind, JobQuery
from sendense_nbd.hub.nodes import parse_edit, parse_node
from sendense_nbd.hub.policy_api import policy_routes
from sendense_nbd.hub.repository import Point
from sendense_nbd.hub.service import Hub
from sendense_nbd.hub.space_history import history_hours
from sendense_nbd.hub.verify import VerifyRequest

PREFIX = "/api/v1"

_ERRORS: ErrorMap = [
    (UnknownJob, 404, "not_found"),
    (UnknownPoint, 404, "not_found"),
    (NodeNotFound, 404, "not_found"),
    (UnknownNode, 404, "not_found"),
    (UnknownPolicy, 404, "not_found"),
    (UnknownCopy, 404, "not_found"),
    (CopyLocked, 409, "locked"),
    (CopyDamaged, 502, "damaged"),
    (OffsiteError, 502, "offsite"),
    (JobStateError, 409, "conflict"),
    (PortError, 503, "ports_exhausted"),
    (NodeError, 502, "node_unavailable"),
    (InsufficientSpace, 507, "insufficient_space"),
    (RepositoryError, 409, "repository"),
    (InvalidBackup, 400, "bad_request"),
    (CompletionMismatch, 400, "bad_request"),
    (OtherHub, 409, "other_hub"),
    (StoreUnavailable, 503, "store_unavailable"),  # the API's routes answer 307 (_to_owner); the console's 409
    (ClusterLockTimeout, 503, "cluster_lock"),  # another live hub holds the admission lock: try again later
]


def build_app(hub: Hub, *, token: str | None) -> web.Application:
    """The API over ``hub`` (every body and query is parsed by :mod:`~sendense_nbd.hub.requests` first),
    and the web console on the same application (:mod:`~sendense_nbd.hub.console`)."""
    api = _Handlers(hub)
    routes = [  # in matching order: /backups/changeid before /backups/{job}
        web.post(PREFIX + "/backups", api.create_backup),
        web.get(PREFIX + "/backups", api.list_backups),
        web.get(PREFIX + "/backups/changeid", api.change_id),
        web.get(PREFIX + "/backups/{job}", api.get_backup),
        web.get(PREFIX + "/backups/{job}/samples", api.samples),
        web.post(PREFIX + "/backups/{job}/progress", api.post_progress),
        web.get(PREFIX + "/backups/{job}/progress", api.get_progress),
        web.post(PREFIX + "/backups/{job}/complete", api.complete),
        web.delete(PREFIX + "/backups/{job}", api.cancel),
        web.get(PREFIX + "/jobs", api.list_jobs),
        web.get(PREFIX + "/points", api.points),
        web.post(PREFIX + "/restores", api.restore),
        web.delete(PREFIX + "/restores/{job}", api.stop_restore),
        web.get(PREFIX + "/ports", api.ports),
        web.get(PREFIX + "/repository", api.repository),
        web.get(PREFIX + "/repository/history", api.repository_history),
        web.get(PREFIX + "/nodes", api.list_nodes),
        web.post(PREFIX + "/nodes", api.add_node),
        web.get(PREFIX + "/nodes/{name}", api.get_node),
        web.patch(PREFIX + "/nodes/{name}", api.edit_node),
        web.delete(PREFIX + "/nodes/{name}", api.delete_node),
        web.get(PREFIX + "/nodes/{name}/vms", api.node_vms),
        web.post(PREFIX + "/verify", api.verify),
        web.get(PREFIX + "/verify/{job}", api.get_verify),
        web.get(PREFIX + "/alerts", api.alerts),
        web.get(PREFIX + "/hubs", api.hubs),
        web.get("/metrics", api.metrics),
    ]
    middlewares = [error_middleware(token, _ERRORS, scope=is_api), _to_owner]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app.add_routes(routes + policy_routes(PREFIX, hub) + copy_routes(PREFIX, hub))
    setup_console(app, hub, token=token, errors=_ERRORS)
    return app


class _Handlers:
    """One handler per route: parse, call the hub, answer JSON."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def create_backup(self, request: web.Request) -> web.Response:
        """POST /backups: start a backup job (201)."""
        job = await self.hub.create_backup(req.BackupRequest.from_json(await json_body(request)))
        return web.json_response(_backup(job), status=201)

    async def list_backups(self, request: web.Request) -> web.Response:
        """GET /backups[?vm_path=]: the backup jobs, oldest first."""
        vm_path = None if request.query.get("vm_path") is None else _query_vm_path(request)
        return web.json_response({"backups": [_backup(job) for job in await self.hub.backups(vm_path)]})

    async def list_jobs(self, request: web.Request) -> web.Response:
        """GET /jobs[?kind=&state=&vm_path=&policy=&node=&since=&before=&limit=]: jobs of every kind, newest first."""
        jobs = await self.hub.jobs(JobQuery.from_query(request.query))
        return web.json_response({"jobs": [_backup(job) for job in jobs]})

    async def samples(self, request: web.Request) -> web.Response:
        """GET /backups/{job}/samples: the job's bytes sent over time, ``[[t, bytes], ...]`` oldest first."""
        found = await self.hub.job_samples(paths.job_id(request))
        return web.json_response({"samples": [sample.to_json() for sample in found]})

    async def change_id(self, request: web.Request) -> web.Response:
        """GET /backups/changeid?vm_path=&disk_key=: where the disk's next incremental starts (404: none)."""
        vm_path = _query_vm_path(request)
        key = req.disk_key_query(request.query.get("disk_key"))
        point = await self.hub.last_backup(vm_path, key)
        if point is None:
            return error(404, "not_found", f"no completed backup of {vm_path} disk {key}")
        return web.json_response(_change_id(point))

    async def get_backup(self, request: web.Request) -> web.Response:
        """GET /backups/{job}: one job."""
        return web.json_response(_backup(await self.hub.job(paths.job_id(request))))

    async def post_progress(self, request: web.Request) -> web.Response:
        """POST /backups/{job}/progress: a node's progress report."""
        job_id = paths.job_id(request)
        job = await self.hub.progress(job_id, req.Progress.from_json(await json_body(request)))
        return web.json_response({"job_id": job.id, "state": job.state.value})

    async def get_progress(self, request: web.Request) -> web.Response:
        """GET /backups/{job}/progress: the job's state and latest report."""
        job = await self.hub.job(paths.job_id(request))
        progress = None if job.progress is None else job.progress.to_json()
        return web.json_response({"job_id": job.id, "state": job.state.value, "progress": progress})

    async def complete(self, request: web.Request) -> web.Response:
        """POST /backups/{job}/complete: a node's completion (or failure) report."""
        job_id = paths.job_id(request)
        completion = req.Completion.from_json(await json_body(request))
        return web.json_response(_backup(await self.hub.complete(job_id, completion)))

    async def cancel(self, request: web.Request) -> web.Response:
        """DELETE /backups/{job}: cancel a job that has not ended."""
        return web.json_response(_backup(await self.hub.cancel(paths.job_id(request))))

    async def points(self, request: web.Request) -> web.Response:
        """GET /points?vm_path=: a VM's completed restore points."""
        points = await self.hub.points(_query_vm_path(request))
        return web.json_response({"points": [point.to_json() for point in points]})

    async def restore(self, request: web.Request) -> web.Response:
        """POST /restores: serve a point over NBD, or convert it to a file (201)."""
        job = await self.hub.restore(req.RestoreRequest.from_json(await json_body(request)))
        return web.json_response(job.to_json(), status=201)

    async def stop_restore(self, request: web.Request) -> web.Response:
        """DELETE /restores/{job}: stop a restore job's export."""
        return web.json_response((await self.hub.stop_restore(paths.job_id(request))).to_json())

    async def alerts(self, request: web.Request) -> web.Response:
        """GET /alerts[?active=1][&kind=][&limit=]: the newest alerts first (active: conditions not cleared)."""
        found = await self.hub.alerts.list(AlertQuery.from_query(request.query))
        return web.json_response({"alerts": [alert.to_json() for alert in found]})

    async def verify(self, request: web.Request) -> web.Response:
        """POST /verify {"vm_path"} | {"point_id"}: start a verify job (202); it runs in the background."""
        job = await self.hub.verify(VerifyRequest.from_json(await json_body(request)))
        return web.json_response(_backup(job), status=202)

    async def get_verify(self, request: web.Request) -> web.Response:
        """GET /verify/{job}: a verify job with each point's verdict so far."""
        job = await self.hub.job(paths.job_id(request))
        if job.kind is not JobKind.VERIFY:
            raise UnknownJob(f"{job.id} is not a verify job")
        return web.json_response(_backup(job))

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics (at the root, not under /api/v1): Prometheus text, behind the same bearer token."""
        return web.Response(body=await self.hub.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_nodes(self, request: web.Request) -> web.Response:
        """GET /nodes[?check=1]: every node with its health (``check=1``: asked now, else as last seen)."""
        nodes = self.hub.nodes
        found = await (nodes.check_all() if request.query.get("check") == "1" else nodes.records())
        return web.json_response({"nodes": [node.to_json() for node in found]})

    async def add_node(self, request: web.Request) -> web.Response:
        """POST /nodes: register a node (201)."""
        node = await self.hub.nodes.add(parse_node(await json_body(request)))
        return web.json_response(node.to_json(), status=201)

    async def get_node(self, request: web.Request) -> web.Response:
        """GET /nodes/{name}[?check=1]: one node with its health."""
        name = paths.node(request)
        node = await (self.hub.nodes.check(name) if request.query.get("check") == "1" else self.hub.nodes.get(name))
        return web.json_response(node.to_json())

    async def edit_node(self, request: web.Request) -> web.Response:
        """PATCH /nodes/{name}: change its url, token, tunnel identity, transport, nbd_host or hub_url (null
        clears all but url and transport)."""
        name = paths.node(request)
        node = await self.hub.nodes.edit(name, parse_edit(await json_body(request)))
        return web.json_response(node.to_json())

    async def delete_node(self, request: web.Request) -> web.Response:
        """DELETE /nodes/{name}: forget a node (409 in_use while a policy names it)."""
        name = paths.node(request)
        await self.hub.nodes.delete(name)
        return web.json_response({"deleted": name})

    async def node_vms(self, request: web.Request) -> web.Response:
        """GET /nodes/{name}/vms: the inventory paths of the node's VMs (asked now)."""
        return web.json_response({"vms": await self.hub.nodes.list_vms(paths.node(request))})

    async def hubs(self, request: web.Request) -> web.Response:
        """GET /hubs: the hubs of the cluster (this one's ID too), each with its liveness."""
        members = await self.hub.cluster.members()
        return web.json_response({"hub": self.hub.id, "hubs": [member.to_json() for member in members]})

    async def ports(self, request: web.Request) -> web.Response:
        """GET /ports: this hub's port pool, its leases and its running exports."""
        return web.json_response((await self.hub.port_status()).to_json())

    async def repository(self, request: web.Request) -> web.Response:
        """GET /repository: the repository's space (bytes) and its completed points."""
        return web.json_response((await self.hub.repository_usage()).to_json())

    async def repository_history(self, request: web.Request) -> web.Response:
        """GET /repository/history[?hours=N]: the space samples of the last N hours (default 168), oldest first."""
        since = self.hub.clock.now() - history_hours(request.query) * 3600.0
        samples = await self.hub.space_history(since)
        return web.json_response({"since": since, "samples": [sample.to_json() for sample in samples]})


@web.middleware
async def _to_owner(request: web.Request, handler: Any) -> web.StreamResponse:
    """A change of a job that another live hub runs: 307 to the same path and query on that hub's API (a
    client that follows it repeats its method and body there); 409 ``other_hub`` when there is no URL to
    send it to."""
    try:
        response: web.StreamResponse = await handler(request)
    except OtherHub as exc:
        if exc.api_url is None:
            raise
        location = exc.api_url.rstrip("/") + request.path_qs
        body = {"error": {"code": "other_hub", "message": str(exc)}, "location": location}
        return web.json_response(body, status=307, headers={"Location": location})
    return response


def _query_vm_path(request: web.Request) -> str:
    value = request.query.get("vm_path")
    if value is None:
        raise BadRequest("give vm_path")
    return fields.vm_path(value)


def _backup(job: Job) -> dict[str, object]:
    """A job as the ``/backups`` calls show it: ``job_id`` in place of ``id``, last."""
    out = job.to_json()
    out["job_id"] = out.pop("id")
    return out


def _change_id(point: Point) -> dict[str, object]:
    """Where the next incremental of a disk starts (docs/HUB_API.md §1)."""
    return {"change_id": point.change_id, "disk_uuid": point.disk_uuid, "capacity": point.size, "point_id": point.id}
