"""The hub API's operating calls: ``/policies`` (with run-now, their runs and a retention preview) and ``/status``.

Handlers parse with :mod:`sendense_nbd.policy.model` and call the hub's
:class:`~sendense_nbd.hub.scheduler.Scheduler` and :class:`~sendense_nbd.hub.service.Hub`;
their errors are answered by the API's middleware like every other call.
"""

from __future__ import annotations

from aiohttp import web

from sendense_nbd.http_api import json_body
from sendense_nbd.hub import paths
from sendense_nbd.hub.service import Hub
from sendense_nbd.policy.model import Policy


def policy_routes(prefix: str, hub: Hub) -> list[web.RouteDef]:
    """The routes of policies and status under ``prefix``."""
    api = _PolicyHandlers(hub)
    return [
        web.get(prefix + "/policies", api.list),
        web.post(prefix + "/policies", api.add),
        web.post(prefix + "/policies/preview", api.preview),
        web.get(prefix + "/policies/{name}", api.show),
        web.patch(prefix + "/policies/{name}", api.edit),
        web.delete(prefix + "/policies/{name}", api.delete),
        web.post(prefix + "/policies/{name}/run", api.run_now),
        web.get(prefix + "/policies/{name}/preview", api.preview_stored),
        web.get(prefix + "/status", api.status),
    ]


class _PolicyHandlers:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def list(self, request: web.Request) -> web.Response:
        """GET /policies: every policy with its schedules' state."""
        return web.json_response({"policies": await self.hub.scheduler.views()})

    async def add(self, request: web.Request) -> web.Response:
        """POST /policies: a new policy (201); its node must be registered."""
        policy = Policy.from_json(await json_body(request))
        if policy.copy is not None:  # its secret file and bucket, before it is stored
            await self.hub.copies.check_target(policy.copy)
        return web.json_response(await self.hub.scheduler.add(policy), status=201)

    async def show(self, request: web.Request) -> web.Response:
        """GET /policies/{name}: the policy, its schedules' state and its last runs."""
        scheduler = self.hub.scheduler
        return web.json_response(await scheduler.view(await scheduler.store.get(paths.policy(request)), runs=20))

    async def edit(self, request: web.Request) -> web.Response:
        """PATCH /policies/{name}: a JSON merge patch of the policy (the name cannot change)."""
        name, patch = paths.policy(request), await json_body(request)
        if isinstance(patch, dict) and patch.get("copy") is not None:  # the edited target, before it is stored
            edited = (await self.hub.scheduler.store.get(name)).policy.edited(patch)
            if edited.copy is not None:
                await self.hub.copies.check_target(edited.copy)
        return web.json_response(await self.hub.scheduler.edit(name, patch))

    async def delete(self, request: web.Request) -> web.Response:
        """DELETE /policies/{name}: the policy goes; its jobs and points stay."""
        name = paths.policy(request)
        await self.hub.scheduler.store.delete(name)
        return web.json_response({"deleted": name})

    async def run_now(self, request: web.Request) -> web.Response:
        """POST /policies/{name}/run: back its VMs up now (202, the run)."""
        run = await self.hub.scheduler.run_now(paths.policy(request))
        return web.json_response(run.to_json(), status=202)

    async def preview(self, request: web.Request) -> web.Response:
        """POST /policies/preview: what a policy's retention rules (the body, as for POST /policies) would
        keep of the points of the VMs it covers; nothing is stored, and its node need not be registered."""
        return await self._preview(Policy.from_json(await json_body(request)))

    async def preview_stored(self, request: web.Request) -> web.Response:
        """GET /policies/{name}/preview: the retention preview of a stored policy."""
        return await self._preview((await self.hub.scheduler.store.get(paths.policy(request))).policy)

    async def _preview(self, policy: Policy) -> web.Response:
        found = await self.hub.retention_preview(policy)
        return web.json_response({"policy": policy.name, "vms": [vm.to_json() for vm in found]})

    async def status(self, request: web.Request) -> web.Response:
        """GET /status: running jobs, VMs at risk, space, ports, nodes and next runs."""
        return web.json_response(await self.hub.status())
