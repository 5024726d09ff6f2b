"""The hub API's offsite copies: ``/copies`` (list, show, serve from the bucket, download, verify, delete).

Handlers call :class:`~sendense_nbd.hub.copies.Copies`; its errors are answered by the API's middleware
(``404 not_found`` for an unknown copy, ``409 locked`` for a delete Object Lock refuses, ``502 offsite``
when the bucket fails). docs/HUB_API.md, "Offsite copies".
"""

from __future__ import annotations

from aiohttp import web

from sendense_nbd import fields
from sendense_nbd.errors import BadRequest, UnknownCopy
from sendense_nbd.http_api import json_body
from sendense_nbd.hub.requests import RESTORE_NAME, reader
from sendense_nbd.hub.service import Hub


def copy_routes(prefix: str, hub: Hub) -> list[web.RouteDef]:
    """The routes of offsite copies under ``prefix``."""
    api = _CopyHandlers(hub)
    return [
        web.get(prefix + "/copies", api.list),
        web.get(prefix + "/copies/{copy}", api.show),
        web.delete(prefix + "/copies/{copy}", api.delete),
        web.post(prefix + "/copies/{copy}/export", api.serve),
        web.delete(prefix + "/copies/{copy}/export", api.stop),
        web.post(prefix + "/copies/{copy}/download", api.download),
        web.post(prefix + "/copies/{copy}/verify", api.verify),
    ]


def _copy_id(request: web.Request) -> str:
    found = fields.identifier(request.match_info["copy"])
    if found is None:
        raise UnknownCopy(f"no offsite copy {request.match_info['copy'][:80]!r}")
    return found


class _CopyHandlers:
    def __init__(self, hub: Hub) -> None:
        self.copies = hub.copies

    async def list(self, request: web.Request) -> web.Response:
        """GET /copies[?vm_path=]: every copy not deleted, oldest first."""
        unknown = set(request.query) - {"vm_path"}
        if unknown:
            raise BadRequest(f"unknown parameter {sorted(unknown)[0][:40]!r}")
        vm_path = fields.vm_path(request.query["vm_path"]) if "vm_path" in request.query else None
        return web.json_response({"copies": [c.to_json() for c in await self.copies.records(vm_path)]})

    async def show(self, request: web.Request) -> web.Response:
        """GET /copies/{copy}: one copy with its manifest."""
        return web.json_response((await self.copies.show(_copy_id(request))).to_json())

    async def delete(self, request: web.Request) -> web.Response:
        """DELETE /copies/{copy}: the copy and the copies above it in its chain (409 locked while S3 refuses)."""
        return web.json_response({"deleted": await self.copies.delete(_copy_id(request))})

    async def serve(self, request: web.Request) -> web.Response:
        """POST /copies/{copy}/export {"reader"?}: serve the copy read-only over NBD straight from the bucket
        (201), with client certificates to ``reader``'s alone."""
        copy_id = _copy_id(request)
        body = await json_body(request) if await request.read() else {}  # no body: no reader
        fields.json_object(body, "the body", frozenset({"reader"}))
        return web.json_response(await self.copies.serve(copy_id, reader(body.get("reader"))), status=201)

    async def stop(self, request: web.Request) -> web.Response:
        """DELETE /copies/{copy}/export: stop serving it."""
        return web.json_response(await self.copies.stop_serving(_copy_id(request)))

    async def download(self, request: web.Request) -> web.Response:
        """POST /copies/{copy}/download {"path": NAME}: the chain into a new folder of the restore directory."""
        copy_id = _copy_id(request)
        body = fields.json_object(await json_body(request), "the body", frozenset({"path"}))
        name = body.get("path")
        if not isinstance(name, str) or not RESTORE_NAME.fullmatch(name):
            raise BadRequest("path must be a plain folder name (letters, digits, '.', '_', '-'; at most 128)")
        return web.json_response(await self.copies.download(copy_id, name))

    async def verify(self, request: web.Request) -> web.Response:
        """POST /copies/{copy}/verify: the copy read from the bucket against its digests."""
        return web.json_response(await self.copies.verify(_copy_id(request)))
