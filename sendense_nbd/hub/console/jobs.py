"""The jobs: a filterable list (``/jobs``), each job's page (``/jobs/{id}``) and its live progress
(``/jobs/{id}/live``, an htmx fragment polled every 2 s while the job runs).

The list is :meth:`Hub.jobs` with a :class:`~sendense_nbd.hub.jobs.JobQuery` parsed from the filter
form by the API's own parser, newest first, with an "Older" link (``before=`` the last row's time).
A job's page shows its stages and their durations, the bytes it changed and sent, why it was a full
copy, its disks or verdicts, its error, and its throughput over time as an SVG drawn here
(:func:`~.charts.line_chart` over :meth:`Hub.job_samples`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from sendense_nbd.backup.records import FullReason
from sendense_nbd.errors import BadRequest, SendenseError, UnknownJob
from sendense_nbd.hub import paths
from sendense_nbd.hub.jobs import Job, JobKind, JobQuery, JobState
from sendense_nbd.hub.service import Hub

from . import charts
from .auth import checked_form, flash
from .render import human_duration, human_rate, message_for, render

#: The filter form's fields, as ``GET /api/v1/jobs`` names them.
FILTERS = ("kind", "state", "vm_path", "policy", "node", "since", "before", "limit")
#: Live progress is polled this often while a job runs.
POLL = "every 2s"
#: Suggestions the filter form offers per field at most.
MAX_CHOICES = 500

#: Why a job was a full copy, for an operator.
REASONS: dict[FullReason, str] = {
    FullReason.REQUESTED: "A full copy was asked for (mode full).",
    FullReason.FIRST_BACKUP: "It was the disk's first backup: there was no earlier point to build on.",
    FullReason.CBT_RESET: "Changed block tracking could not say what changed (its change ID was refused, "
    "CBT was just enabled, or the disk's identity or size changed).",
    FullReason.CHAIN_CAP: "The policy's chain limit (full_every) was reached, so a new chain began.",
    FullReason.BASE_MISSING: "The disk had points, but none could be the base of an incremental "
    "(deleted, or without a change ID).",
    FullReason.VERIFY_FAILED: "The disk's latest point was found damaged by a verify job.",
}


def routes(hub: Hub) -> list[web.RouteDef]:
    """``/jobs``, ``/jobs/{id}``, ``/jobs/{id}/live`` and ``/jobs/{id}/cancel``."""
    page = _Jobs(hub)
    return [
        web.get("/jobs", page.index),
        web.get("/jobs/{id}", page.detail),
        web.get("/jobs/{id}/live", page.live),
        web.post("/jobs/{id}/cancel", page.cancel),
    ]


def reason_sentence(reason: FullReason | None) -> str | None:
    """Why a job was full, as a sentence (None: it was not)."""
    return None if reason is None else REASONS.get(reason, reason.value)


def older_link(query: JobQuery, jobs: list[Job]) -> str | None:
    """The next page's URL: the same filters, before the last job shown; None when this page was the last."""
    if len(jobs) < query.limit or not jobs:
        return None
    return "/jobs?" + urlencode({**query.to_query(), "before": repr(jobs[-1].created)})


def throughput_plot(samples: list[tuple[float, float]]) -> Any:
    """The job's throughput over time (bytes/s between samples) as an SVG, ``id="throughput-plot"``."""
    points = charts.rates(samples)
    span = points[-1][0] - samples[0][0] if points else 0.0
    return charts.line_chart(
        points,
        element_id="throughput-plot",
        title="Throughput over time",
        y_label=human_rate,
        x_labels=("start", f"+{human_duration(span)}"),
    )


class _Jobs:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def index(self, request: web.Request) -> web.Response:
        """GET /jobs[?kind=&state=&vm_path=&policy=&node=&before=&limit=]: jobs newest first; a bad filter
        is the page again with the reason (400)."""
        given = {name: request.query[name] for name in FILTERS if name in request.query}
        context = {"values": filter_values(given), **await self._choices()}
        try:
            query = JobQuery.from_query(given)
        except BadRequest as exc:
            failed = {**context, "error": message_for(exc), "jobs": [], "older": None}
            return render(request, "jobs.html", failed, status=400)
        jobs = await self.hub.jobs(query)
        return render(request, "jobs.html", {**context, "error": None, "jobs": jobs, "older": older_link(query, jobs)})

    async def _choices(self) -> dict[str, Any]:
        """What the filter form offers: the kinds and states, and the known VMs, policies and nodes."""
        return {
            "kinds": [kind.value for kind in JobKind],
            "states": [state.value for state in JobState],
            "vm_choices": sorted(await self.hub.stored_vms())[:MAX_CHOICES],
            "policy_choices": [stored.policy.name for stored in await self.hub.scheduler.store.all()],
            "node_choices": [node.name for node in await self.hub.nodes.records()],
        }

    async def detail(self, request: web.Request) -> web.Response:
        """GET /jobs/{id}: everything about one job."""
        job = await self.hub.job(paths.job_id(request, "id"))
        samples = [(sample.t, float(sample.bytes)) for sample in await self.hub.job_samples(job.id)]
        context = {
            "job": job,
            "reason": reason_sentence(job.full_reason),
            "plot": throughput_plot(samples),
            "samples": len(samples),
            "poll": POLL,
        }
        return render(request, "jobs_detail.html", context)

    async def live(self, request: web.Request) -> web.Response:
        """GET /jobs/{id}/live: the progress fragment (polling itself again only while the job runs)."""
        job = await self.hub.job(paths.job_id(request, "id"))
        return render(request, "jobs_live.html", {"job": job, "poll": POLL})

    async def cancel(self, request: web.Request) -> web.Response:
        """POST /jobs/{id}/cancel: cancel a job that has not ended."""
        await checked_form(request)
        job_id = paths.job_id(request, "id")
        try:
            await self.hub.cancel(job_id)
        except UnknownJob:
            raise
        except SendenseError as exc:
            flash(request, message_for(exc), error=True)
        else:
            flash(request, f"Job {job_id} is cancelled.")
        raise web.HTTPSeeOther(f"/jobs/{job_id}")


def filter_values(given: Mapping[str, str]) -> dict[str, str]:
    """The filter form's values as typed (blank for a field not given)."""
    return {name: given.get(name, "") for name in FILTERS}
