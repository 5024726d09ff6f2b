"""The dashboard (``/``) and its live feed (``/events``, Server-Sent Events).

The page shows :meth:`Hub.status` (running jobs, VMs at risk, space, ports, nodes, next runs,
alerts), the last 24 hours' jobs and the space trend. ``/events`` sends the running jobs' fragment
(``_running.html``) once a second; htmx's SSE extension swaps it in. Streams are bounded in number
and length (the browser reconnects).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from aiohttp_sse import sse_response

from sendense_nbd.hub.jobs import Job, JobQuery, JobState
from sendense_nbd.hub.service import Hub

from . import auth, charts
from .render import human_age, human_bytes, render

#: Live feeds open at once, over all browsers and per session; one more answers 503 (htmx retries).
MAX_STREAMS = 32
MAX_SESSION_STREAMS = 4
#: A feed ends after this many seconds; the browser opens a new one.
STREAM_SECONDS = 600.0
TICK = 1.0
#: Jobs the last-24-hours panel counts at most (the newest).
RECENT_LIMIT = 1000
DAY = 86400.0
TREND_DAYS = 7


def routes(hub: Hub) -> list[web.RouteDef]:
    """``/`` and ``/events``."""
    page = _Dashboard(hub)
    return [web.get("/", page.show), web.get("/events", page.events)]


async def running_jobs(hub: Hub) -> list[Job]:
    """Jobs pending or running, oldest first."""
    found = await hub.jobs(JobQuery(state=JobState.RUNNING, limit=1000))
    found += await hub.jobs(JobQuery(state=JobState.PENDING, limit=1000))
    return sorted(found, key=lambda job: job.created)


class _Dashboard:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.streams = 0

    async def show(self, request: web.Request) -> web.Response:
        """GET /: the hub at a glance."""
        status = await self.hub.status()
        now = self.hub.clock.now()
        recent = await self.hub.jobs(JobQuery(since=now - DAY, limit=RECENT_LIMIT))
        history = await self.hub.space_history(now - TREND_DAYS * DAY)
        used = [(sample.t, float(sample.used)) for sample in history]
        used.append((now, float((await self.hub.repository_usage()).used)))  # the trend ends now
        trend = charts.line_chart(
            used,
            element_id="space-trend",
            title=f"Repository space used, last {TREND_DAYS} days",
            y_label=human_bytes,
            x_labels=(human_age(used[0][0], now), "now"),
        )
        context = {
            "status": status,
            "running": await running_jobs(self.hub),
            "recent": [job for job in recent if job.state.terminal],
            "counts": _counts(recent),
            "trend": trend,
            "ports": (await self.hub.port_status()).to_json(),
        }
        return render(request, "dashboard.html", context)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """GET /events: the running jobs' fragment every second (event ``running``), while the session lives."""
        session = auth.session_of(request)
        if self.streams >= MAX_STREAMS or session.streams >= MAX_SESSION_STREAMS:
            raise web.HTTPServiceUnavailable(reason="too many live views are open; close some and reload")
        self.streams += 1
        session.streams += 1
        try:
            async with sse_response(request) as stream:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + STREAM_SECONDS
                while stream.is_connected() and loop.time() < deadline and not session.ended:
                    context = {"running": await running_jobs(self.hub), "now": self.hub.clock.now()}
                    html = aiohttp_jinja2.render_string("_running.html", request, context)
                    try:
                        await stream.send(html, event="running")
                    except ConnectionResetError:  # the browser left the page
                        break
                    await asyncio.sleep(TICK)
            return stream
        finally:
            self.streams -= 1
            session.streams -= 1


def _counts(jobs: list[Job]) -> dict[str, Any]:
    """How many of the jobs ended in each state; ``capped``: there may be more than were counted."""
    ended = Counter(job.state.value for job in jobs if job.state.terminal)
    counts: dict[str, Any] = {state: ended[state] for state in ("completed", "failed", "cancelled")}
    counts["capped"] = len(jobs) >= RECENT_LIMIT
    return counts
