"""The policies pages: the list (``/policies``), one policy (``/policies/{name}``), the form that
creates (``/policies/new``) or edits (``/policies/{name}/edit``) one, run now, delete (with a
confirmation step), and the retention preview (``/policies/preview``, an htmx fragment or a page).

The form's fields become the policy's JSON (:func:`policy_json`), which the API's own parser
(:meth:`Policy.from_json <sendense_nbd.policy.model.Policy.from_json>`) and the hub's scheduler
check: a refusal is shown as its sentence next to the values typed. The pages call the scheduler
and :meth:`Hub.retention_preview <sendense_nbd.hub.service.Hub.retention_preview>`, as the API does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sendense_nbd import fields
from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import BadRequest, Conflict, SendenseError
from sendense_nbd.hub import paths
from sendense_nbd.hub.service import Hub
from sendense_nbd.policy.model import Policy

from .auth import checked_form, flash
from .render import ERRORS, human_duration, message_for, render, status_for

#: The retention rules, in the order the form and the pages show them.
KEEP_RULES = (
    ("keep_last", "Keep last", "the newest N points"),
    ("keep_daily", "Keep daily", "the newest point of each of the last N days"),
    ("keep_weekly", "Keep weekly", "the newest point of each of the last N weeks"),
    ("keep_monthly", "Keep monthly", "the newest point of each of the last N months"),
    ("keep_yearly", "Keep yearly", "the newest point of each of the last N years"),
)
#: The name a policy not named yet is previewed under.
PREVIEW_NAME = "preview"
#: What a new policy's form starts with.
NEW_VALUES: dict[str, str] = {
    "name": "",
    "node": "",
    "include": "",
    "exclude": "",
    "schedule_kind": "cron",
    "schedule_cron": "0 22 * * *",
    "schedule_every": "",
    "schedule_timezone": "UTC",
    "schedule_window": "",
    "verify_kind": "none",
    "verify_cron": "",
    "verify_every": "",
    "verify_timezone": "UTC",
    "verify_window": "",
    "per_policy": "1",
    "per_node": "4",
    "mode": Mode.AUTO.value,
    "full_every": "",
    **{key: "0" for key, _, _ in KEEP_RULES},
    "enabled": "on",
}


def routes(hub: Hub) -> list[web.RouteDef]:
    """The policies pages (``/policies/new`` and ``/policies/preview`` before ``/policies/{name}``)."""
    page = _Policies(hub)
    return [
        web.get("/policies", page.list),
        web.get("/policies/new", page.new),
        web.post("/policies/new", page.create),
        web.post("/policies/preview", page.preview),
        web.get("/policies/{name}", page.show),
        web.get("/policies/{name}/edit", page.edit_form),
        web.post("/policies/{name}/edit", page.save),
        web.post("/policies/{name}/run", page.run_now),
        web.post("/policies/{name}/delete", page.delete),
    ]


# -- the form and the policy's JSON ------------------------------------------------


def _number(form: Mapping[str, str], key: str, label: str) -> int | float | None:
    """A number field as typed (None when empty); text that is no number is refused naming the field."""
    text = form.get(key, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BadRequest(f"{label} must be a number, not {text[:40]!r}")
    return value


def _lines(text: str) -> list[str]:
    """A textarea's non-empty lines, trimmed."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _schedule(form: Mapping[str, str], prefix: str, label: str) -> dict[str, Any] | None:
    """A schedule's JSON from its fields (every key present, null where unset), or None for ``none``."""
    kind = form.get(f"{prefix}_kind", "cron")
    if kind == "none":
        return None
    if kind not in ("cron", "every"):
        raise BadRequest(f"{label}: choose a cron expression or every N seconds")
    expression = form.get(f"{prefix}_cron", "").strip() or None
    every = _number(form, f"{prefix}_every", f"{label}: every")
    if kind == "cron" and expression is None:
        raise BadRequest(f"{label}: give a cron expression, or choose every N seconds")
    if kind == "every" and every is None:
        raise BadRequest(f"{label}: give the seconds between runs, or choose a cron expression")
    return {
        "cron": expression if kind == "cron" else None,
        "every": every if kind == "every" else None,
        "timezone": form.get(f"{prefix}_timezone", "").strip() or None,
        "window": _number(form, f"{prefix}_window", f"{label}: window"),
    }


def policy_json(form: Mapping[str, str], name: str | None = None) -> dict[str, Any]:
    """The policy's JSON from the form's fields, every key present (null for unset): what
    :meth:`Policy.from_json` reads and, for an edit, a merge patch that sets the whole spec.
    ``name`` (an edit's) wins over the form's."""
    mode = form.get("mode", "").strip()
    return {
        "name": name if name is not None else form.get("name", "").strip(),
        "node": form.get("node", "").strip() or None,
        "vms": {"include": _lines(form.get("include", "")), "exclude": _lines(form.get("exclude", ""))},
        "schedule": _schedule(form, "schedule", "Schedule"),
        "verify": _schedule(form, "verify", "Verify schedule"),
        "per_policy": _number(form, "per_policy", "VMs at once"),
        "per_node": _number(form, "per_node", "Jobs at once on the node"),
        "mode": mode or None,
        "full_every": _number(form, "full_every", "Full backup after"),
        "retention": {key: _number(form, key, label) for key, label, _ in KEEP_RULES},
        "enabled": form.get("enabled") == "on",
    }


def _text(value: object) -> str:
    """A number as a form shows it: ``3600``, not ``3600.0``; None as empty."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _schedule_values(schedule: Mapping[str, Any] | None, prefix: str) -> dict[str, str]:
    if schedule is None:
        return {f"{prefix}_kind": "none", f"{prefix}_timezone": "UTC"}
    return {
        f"{prefix}_kind": "cron" if schedule.get("cron") is not None else "every",
        f"{prefix}_cron": _text(schedule.get("cron")),
        f"{prefix}_every": _text(schedule.get("every")),
        f"{prefix}_timezone": _text(schedule.get("timezone")) or "UTC",
        f"{prefix}_window": _text(schedule.get("window")),
    }


def form_values(policy: Policy) -> dict[str, str]:
    """A stored policy as the form's fields (the edit form starts with these)."""
    spec = policy.to_json()
    values = dict(NEW_VALUES)
    values.update(
        name=policy.name,
        node=policy.node or "",
        include="\n".join(policy.vms.include),
        exclude="\n".join(policy.vms.exclude),
        per_policy=str(policy.per_policy),
        per_node=str(policy.per_node),
        mode=policy.mode.value,
        full_every=_text(policy.full_every),
        enabled="on" if policy.enabled else "",
        **{key: str(value) for key, value in policy.retention.to_json().items()},
    )
    values.update(_schedule_values(spec["schedule"], "schedule"))
    values.update(_schedule_values(spec["verify"], "verify"))
    return values


# -- the spec in words ---------------------------------------------------------------


def describe_schedule(schedule: Mapping[str, Any] | None) -> str:
    """A schedule's JSON in words: ``cron 0 22 * * * (Europe/Berlin), window 4 h 00 min``."""
    if schedule is None:
        return "none"
    if schedule.get("cron") is not None:
        text = f"cron {schedule['cron']} ({schedule.get('timezone') or 'UTC'})"
    else:
        text = f"every {human_duration(schedule.get('every'))}"
    if schedule.get("window") is not None:
        text += f", jobs start within {human_duration(schedule['window'])} of each slot"
    return text


def describe_retention(retention: Mapping[str, Any]) -> str:
    """A policy's retention rules in words (``keep the last 3, 7 daily``), or that every point stays."""
    parts = []
    for key, label, _ in KEEP_RULES:
        count = retention.get(key) or 0
        if count:
            parts.append(f"the last {count}" if key == "keep_last" else f"{count} {label.split()[-1]}")
    return "keep " + ", ".join(parts) if parts else "keep every point (no rule set)"


def _helpers() -> dict[str, Any]:
    """What the policies' templates call."""
    return {
        "describe_schedule": describe_schedule,
        "describe_retention": describe_retention,
        "keep_rules": KEEP_RULES,
        "modes": [mode.value for mode in Mode],
    }


class _Policies:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def list(self, request: web.Request) -> web.Response:
        """GET /policies: every policy with its schedule, next run and last run."""
        scheduler = self.hub.scheduler
        views = [await scheduler.view(stored, runs=1) for stored in await scheduler.store.all()]
        return render(request, "policies.html", {"policies": views, **_helpers()})

    async def show(self, request: web.Request) -> web.Response:
        """GET /policies/{name}: the policy in words, its next runs, its last runs and its retention preview."""
        return await self._detail(request, paths.policy(request))

    async def _detail(
        self, request: web.Request, name: str, *, refused: str | None = None, status: int = 200
    ) -> web.Response:
        """The policy's page; ``refused``: why an action on it was refused."""
        scheduler = self.hub.scheduler
        stored = await scheduler.store.get(name)
        context = {
            "policy": await scheduler.view(stored, runs=20),
            "preview": await self.hub.retention_preview(stored.policy),
            "preview_error": None,
            "refused": refused,
            **_helpers(),
        }
        return render(request, "policies_detail.html", context, status=status)

    async def new(self, request: web.Request) -> web.Response:
        """GET /policies/new: the form for a new policy."""
        return await self._form(request, NEW_VALUES, editing=None)

    async def edit_form(self, request: web.Request) -> web.Response:
        """GET /policies/{name}/edit: the form with the policy's values (its name cannot change)."""
        stored = await self.hub.scheduler.store.get(paths.policy(request))
        return await self._form(request, form_values(stored.policy), editing=stored.policy.name)

    async def _form(
        self,
        request: web.Request,
        values: Mapping[str, str],
        *,
        editing: str | None,
        error: str | None = None,
        status: int = 200,
        preview: dict[str, Any] | None = None,
    ) -> web.Response:
        nodes = [record.name for record in await self.hub.nodes.records()]
        context = {
            "values": {key: values.get(key, default) for key, default in NEW_VALUES.items()},
            "editing": editing,
            "error": error,
            "nodes": nodes,
            "preview_shown": preview is not None,
            **(preview or {"preview": [], "preview_error": None}),
            **_helpers(),
        }
        return render(request, "policy_form.html", context, status=status)

    async def create(self, request: web.Request) -> web.Response:
        """POST /policies/new: add the policy; a refusal shows the form again with the sentence."""
        form = await checked_form(request)
        try:
            view = await self.hub.scheduler.add(Policy.from_json(policy_json(form)))
        except SendenseError as exc:
            status = status_for(exc, request.app[ERRORS])
            return await self._form(request, form, editing=None, error=message_for(exc), status=status)
        flash(request, f"Policy {view['name']} created.")
        raise web.HTTPSeeOther(f"/policies/{view['name']}")

    async def save(self, request: web.Request) -> web.Response:
        """POST /policies/{name}/edit: the form's spec as a merge patch of the policy."""
        name = paths.policy(request)
        await self.hub.scheduler.store.get(name)  # an unknown policy is a 404 page, not a form
        form = await checked_form(request)
        try:
            await self.hub.scheduler.edit(name, policy_json(form, name))
        except SendenseError as exc:
            status = status_for(exc, request.app[ERRORS])
            return await self._form(request, form, editing=name, error=message_for(exc), status=status)
        flash(request, f"Policy {name} saved.")
        raise web.HTTPSeeOther(f"/policies/{name}")

    async def preview(self, request: web.Request) -> web.Response:
        """POST /policies/preview: which points the form's rules keep; for htmx the fragment, else the form
        with the preview under it. A policy that does not parse shows its sentence in the preview."""
        form = await checked_form(request)
        editing = fields.identifier(form.get("editing", "").strip())
        result: dict[str, Any] = {"preview": [], "preview_error": None}
        try:
            spec = policy_json(form, editing)
            spec["name"] = spec["name"] or PREVIEW_NAME
            result["preview"] = await self.hub.retention_preview(Policy.from_json(spec))
        except SendenseError as exc:
            result["preview_error"] = message_for(exc)
        if request.headers.get("HX-Request"):
            return render(request, "_preview.html", {**result, "preview_shown": True})
        status = 200 if result["preview_error"] is None else 400
        return await self._form(request, form, editing=editing, status=status, preview=result)

    async def run_now(self, request: web.Request) -> web.Response:
        """POST /policies/{name}/run: open a backup run now; an open run already is refused (409) with the sentence."""
        name = paths.policy(request)
        try:
            run = await self.hub.scheduler.run_now(name)
        except Conflict as exc:  # a run is open already: the page shows it
            status = status_for(exc, request.app[ERRORS])
            return await self._detail(request, name, refused=message_for(exc), status=status)
        flash(request, f"Run {run.id} of policy {name} started for {len(run.items)} VM(s).")
        raise web.HTTPSeeOther(f"/policies/{name}")

    async def delete(self, request: web.Request) -> web.Response:
        """POST /policies/{name}/delete: first a confirmation page; its form (``confirm=yes``) deletes.
        The policy's jobs and restore points stay."""
        name = paths.policy(request)
        stored = await self.hub.scheduler.store.get(name)
        form = await checked_form(request)
        if form.get("confirm") != "yes":
            return render(request, "policies_delete.html", {"policy": stored.policy})
        await self.hub.scheduler.store.delete(name)
        flash(request, f"Policy {name} deleted. Its jobs and restore points stay.")
        raise web.HTTPSeeOther("/policies")
