"""The nodes page: ``/nodes`` (the registered nodes with their health, and a form to register one),
``/nodes/{name}/check`` (ask a node for its health now) and ``/nodes/{name}/delete``.

It calls the hub's node registry (:class:`~sendense_nbd.hub.nodes.NodeRegistry`) as the API does, and
parses the form with the API's :func:`~sendense_nbd.hub.nodes.parse_node`. A node's token is never shown
or sent back to the browser, not even into a form that failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sendense_nbd.errors import SendenseError
from sendense_nbd.hub import paths
from sendense_nbd.hub.nodes import BY_COMMAND_LINE, parse_node
from sendense_nbd.hub.service import Hub

from .auth import checked_form, flash
from .render import ERRORS, message_for, render, status_for

#: The register form's fields a failed attempt shows again (never the token).
_ECHOED = ("name", "url", "tunnel_identity")


def routes(hub: Hub) -> list[web.RouteDef]:
    """``/nodes`` (GET: the list, POST: register), ``/nodes/{name}/check`` and ``/nodes/{name}/delete``."""
    page = _Nodes(hub)
    return [
        web.get("/nodes", page.show),
        web.post("/nodes", page.register),
        web.post("/nodes/{name}/check", page.check),
        web.post("/nodes/{name}/delete", page.delete),
    ]


def _optional(form: Mapping[str, str], key: str) -> str | None:
    """A form field as typed, or None when left empty."""
    value = form.get(key, "").strip()
    return value or None


class _Nodes:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def show(self, request: web.Request) -> web.Response:
        """GET /nodes: every node with its health, and the register form."""
        return await self._page(request)

    async def _page(
        self,
        request: web.Request,
        *,
        typed: Mapping[str, str] | None = None,
        error: str | None = None,
        refused: str | None = None,
        status: int = 200,
    ) -> web.Response:
        """The list; ``error``: why the register form was refused; ``refused``: why an action on a node was."""
        records = await self.hub.nodes.records()
        context: dict[str, Any] = {
            "nodes": records,
            "command_line": BY_COMMAND_LINE,
            "typed": {key: (typed or {}).get(key, "") for key in _ECHOED},
            "form_error": error,
            "refused": refused,
        }
        return render(request, "nodes.html", context, status=status)

    async def register(self, request: web.Request) -> web.Response:
        """POST /nodes: register a node (the API's checks); a refusal shows the form again with the sentence."""
        form = await checked_form(request)
        body = {key: _optional(form, key) for key in ("name", "url", "token", "tunnel_identity")}
        try:
            record = await self.hub.nodes.add(parse_node(body))
        except SendenseError as exc:
            status = status_for(exc, request.app[ERRORS])
            return await self._page(request, typed=form, error=message_for(exc), status=status)
        flash(request, f"Node {record.name} registered. Check it to see its health.")
        raise web.HTTPSeeOther(f"/nodes#node-{record.name}")

    async def check(self, request: web.Request) -> web.Response:
        """POST /nodes/{name}/check: ask the node for its health now; says up or down (and why)."""
        record = await self.hub.nodes.check(paths.node(request))
        if record.up:
            version = f" (version {record.version})" if record.version else ""
            flash(request, f"Node {record.name} is up{version}.")
        else:
            why = f": {record.last_error}" if record.last_error else ""
            flash(request, f"Node {record.name} is down{why}", error=True)
        raise web.HTTPSeeOther(f"/nodes#node-{record.name}")

    async def delete(self, request: web.Request) -> web.Response:
        """POST /nodes/{name}/delete: forget the node; one a policy uses is refused (409) with the sentence."""
        name = paths.node(request)
        try:
            await self.hub.nodes.delete(name)
        except SendenseError as exc:
            return await self._page(request, refused=message_for(exc), status=status_for(exc, request.app[ERRORS]))
        flash(request, f"Node {name} removed.")
        raise web.HTTPSeeOther("/nodes")
