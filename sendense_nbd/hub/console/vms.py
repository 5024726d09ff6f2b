"""The VMs in the repository (``/vms``), one VM's restore points drawn as chains (``/vms/view?path=``),
and what an operator does with a point: export it over NBD, convert it to a file, verify it.

Every action calls the same :class:`~sendense_nbd.hub.service.Hub` method the REST API calls, with a
request built by that API's ``from_json`` from the form's values (so the checks are the API's). A
restore job has a page (``/restores/{job}``): an export's ``nbd://`` URI with ready ``nbdinfo`` and
``qemu-img`` command lines, and its stop button; a convert's file.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import attrs
from aiohttp import web

from sendense_nbd import fields
from sendense_nbd.errors import BadRequest, SendenseError, UnknownJob
from sendense_nbd.hub import paths
from sendense_nbd.hub.jobs import ConvertDetail, ExportDetail, Job, JobKind, JobQuery, JobState
from sendense_nbd.hub.repository import Point, VerifyState
from sendense_nbd.hub.requests import RestoreRequest
from sendense_nbd.hub.service import Hub
from sendense_nbd.hub.verify import VerifyRequest

from .auth import checked_form, flash
from .render import message_for, render

#: Jobs of a VM listed on its page.
RECENT_JOBS = 20
#: VMs per page of the list (each reads its points and stats their files).
VMS_PER_PAGE = 100
#: Worst first: a VM's verify state is its worst point's.
_SEVERITY = (VerifyState.DAMAGED, VerifyState.UNVERIFIED, VerifyState.VERIFIED)


def routes(hub: Hub) -> list[web.RouteDef]:
    """``/vms``, ``/vms/view``, ``/vms/verify``, the point actions and the restore job pages."""
    page = _Vms(hub)
    return [
        web.get("/vms", page.index),
        web.get("/vms/view", page.view),
        web.post("/vms/verify", page.verify_vm),
        web.post("/points/{id}/export", page.export),
        web.post("/points/{id}/convert", page.convert),
        web.post("/points/{id}/verify", page.verify_point),
        web.get("/restores/{job}", page.restore),
        web.post("/restores/{job}/stop", page.stop),
    ]


def view_url(vm_path: str, point_id: str | None = None) -> str:
    """The console's page of a VM (its path in the query), at one point's place in its chain if given."""
    return f"/vms/view?path={quote(vm_path, safe='')}" + ("" if point_id is None else f"#point-{point_id}")


@attrs.frozen
class VmSummary:
    """One VM of the repository as ``/vms`` lists it."""

    vm_path: str
    points: int
    newest: float | None
    stored: int
    verify: VerifyState


def chains(points: Iterable[Point]) -> dict[int, list[list[Point]]]:
    """Each disk's chains, oldest first: a point with no backing (a full), then the overlays on it in order."""
    disks: dict[int, list[list[Point]]] = {}
    chain_of: dict[str, list[Point]] = {}
    for point in sorted(points, key=lambda p: (p.disk_key, p.created, p.id)):
        chain = None if point.backing is None else chain_of.get(point.backing)
        if chain is None:
            chain = []
            disks.setdefault(point.disk_key, []).append(chain)
        chain.append(point)
        chain_of[point.id] = chain
    return disks


def _start(value: str | None, total: int) -> int:
    """Where a page of the VM list starts (``start=``, from 0); anything else starts at the first VM."""
    if value is None or not value.isdigit() or len(value) > 9:
        return 0
    return min(int(value), max(0, total - 1)) // VMS_PER_PAGE * VMS_PER_PAGE


def worst(states: Iterable[VerifyState]) -> VerifyState:
    """The worst of the points' verify states (damaged, then unverified); verified when there is none."""
    found = set(states)
    return next((state for state in _SEVERITY if state in found), VerifyState.VERIFIED)


def commands(uri: str) -> dict[str, str]:
    """Ready command lines that read an export: ``nbdinfo`` and a ``qemu-img`` copy to a local file."""
    quoted = shlex.quote(uri)
    return {"nbdinfo": f"nbdinfo {quoted}", "qemu_img": f"qemu-img convert -p -O qcow2 {quoted} restored.qcow2"}


def _vm_path(value: str | None) -> str:
    """A VM path from a query or form (:class:`BadRequest` for a missing or malformed one)."""
    if value is None or value == "":
        raise BadRequest("give the VM's inventory path (path=/DC/vm/name)")
    return fields.vm_path(value, "the VM path")


def _back(form: Any) -> str:
    """Where an action goes back to: the VM's page the form came from, else the list of VMs."""
    try:
        return view_url(_vm_path(form.get("path")))
    except BadRequest:
        return "/vms"


class _Vms:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def index(self, request: web.Request) -> web.Response:
        """GET /vms: every VM with completed points, with its count, newest point, size and worst verify state."""
        every = sorted(await self.hub.stored_vms())
        start = _start(request.query.get("start"), len(every))
        summaries = []
        for vm_path in every[start : start + VMS_PER_PAGE]:
            points = await self.hub.points(vm_path)
            stored = await self.hub.stored_bytes(points)
            times = [point.completed or point.created for point in points]
            summaries.append(
                VmSummary(
                    vm_path, len(points), max(times, default=None), sum(size or 0 for size in stored.values()),
                    worst(point.verify_state for point in points),
                )
            )  # fmt: skip
        pages = {
            "total": len(every), "first": start + 1, "last": start + len(summaries),
            "previous": max(0, start - VMS_PER_PAGE) if start else None,
            "next": start + VMS_PER_PAGE if start + VMS_PER_PAGE < len(every) else None,
        }  # fmt: skip
        return render(request, "vms.html", {"vms": summaries, "view_url": view_url, "pages": pages})

    async def view(self, request: web.Request) -> web.Response:
        """GET /vms/view?path=: the VM's points per disk as chains, with their actions, and its recent jobs."""
        vm_path = _vm_path(request.query.get("path"))
        points = await self.hub.points(vm_path)
        jobs = await self.hub.jobs(JobQuery(vm_path=vm_path, limit=RECENT_JOBS))
        if not points and not jobs:
            message = f"The repository has no restore point and no job of {vm_path}."
            return render(request, "error.html", {"status": 404, "message": message}, status=404)
        context = {
            "vm_path": vm_path,
            "disks": chains(points),
            "stored": await self.hub.stored_bytes(points),
            "jobs": jobs,
            "verify_state": worst(point.verify_state for point in points),
            "view_url": view_url,
            "needs_reader": self.hub.restores_need_reader,
        }
        return render(request, "vms_view.html", context)

    async def export(self, request: web.Request) -> web.Response:
        """POST /points/{id}/export: serve the point over NBD (read-only), then its restore page."""
        form = await checked_form(request)
        point_id = request.match_info["id"]
        try:
            body = {"point_id": point_id, "action": "export"}
            if form.get("reader"):  # the client certificate the export admits (with client certificates)
                body["reader"] = form["reader"]
            job = await self.hub.restore(RestoreRequest.from_json(body))
        except SendenseError as exc:
            flash(request, message_for(exc), error=True)
            raise web.HTTPSeeOther(_back(form)) from None
        flash(request, f"Point {point_id} is served over NBD until you stop the export.")
        raise web.HTTPSeeOther(f"/restores/{job.id}")

    async def convert(self, request: web.Request) -> web.Response:
        """POST /points/{id}/convert: write the point to a file in the hub's restore directory."""
        form = await checked_form(request)
        point_id = request.match_info["id"]
        body = {"point_id": point_id, "action": "convert", "format": form.get("format", ""), "path": form.get("name")}
        try:
            job = await self.hub.restore(RestoreRequest.from_json(body))
        except SendenseError as exc:
            flash(request, message_for(exc), error=True)
            raise web.HTTPSeeOther(_back(form)) from None
        if job.state is JobState.COMPLETED and isinstance(job.detail, ConvertDetail):
            flash(request, f"Point {point_id} was written to {job.detail.path}.")
        else:
            why = "" if job.error is None else f": {job.error.message}"
            flash(request, f"Converting point {point_id} failed{why}", error=True)
        raise web.HTTPSeeOther(f"/restores/{job.id}")

    async def verify_point(self, request: web.Request) -> web.Response:
        """POST /points/{id}/verify: a verify job of the point's chain, then its page."""
        form = await checked_form(request)
        return await self._verify(request, form, {"point_id": request.match_info["id"]})

    async def verify_vm(self, request: web.Request) -> web.Response:
        """POST /vms/verify (field ``path``): a verify job of every point of the VM, then its page."""
        form = await checked_form(request)
        return await self._verify(request, form, {"vm_path": form.get("path", "")})

    async def _verify(self, request: web.Request, form: Any, body: dict[str, str]) -> web.Response:
        try:
            job = await self.hub.verify(VerifyRequest.from_json(body))
        except SendenseError as exc:
            flash(request, message_for(exc), error=True)
            raise web.HTTPSeeOther(_back(form)) from None
        flash(request, f"Verify job {job.id} started.")
        raise web.HTTPSeeOther(f"/jobs/{job.id}")

    async def restore(self, request: web.Request) -> web.Response:
        """GET /restores/{job}: an export's URI and command lines (and its stop button), or a convert's file."""
        job = await self._restore_job(request)
        detail = job.detail
        context: dict[str, Any] = {"job": job, "export": None, "convert": None, "commands": None}
        if isinstance(detail, ExportDetail):
            context.update(export=detail, commands=commands(detail.uri))
        elif isinstance(detail, ConvertDetail):
            context["convert"] = detail
        point_id = detail.point_id if isinstance(detail, ExportDetail | ConvertDetail) else None
        context["point_url"] = view_url(job.vm_path, point_id)
        return render(request, "restore.html", context)

    async def stop(self, request: web.Request) -> web.Response:
        """POST /restores/{job}/stop: stop serving the export."""
        await checked_form(request)
        job = await self._restore_job(request)
        try:
            stopped = await self.hub.stop_restore(job.id)
        except SendenseError as exc:
            flash(request, message_for(exc), error=True)
        else:
            flash(request, f"The export of restore job {stopped.id} is stopped.")
        raise web.HTTPSeeOther(f"/restores/{job.id}")

    async def _restore_job(self, request: web.Request) -> Job:
        """The restore job of the path's ``{job}`` (:class:`UnknownJob`, a 404 page, for anything else)."""
        job = await self.hub.job(paths.job_id(request))
        if job.kind is not JobKind.RESTORE:
            raise UnknownJob(f"Job {job.id} is a {job.kind.value} job, not a restore.")
        return job
