"""The IDs and names in the hub's URL paths (the API's and the console's): one that cannot be an ID or a
name is simply unknown (404), never a bad request."""

from __future__ import annotations

from aiohttp import web

from sendense_nbd import fields
from sendense_nbd.errors import BadRequest, UnknownJob, UnknownNode, UnknownPolicy
from sendense_nbd.hub.nodes import node_name


def job_id(request: web.Request, key: str = "job") -> str:
    """The job ID in the path's ``{key}``."""
    raw = request.match_info[key]
    found = fields.identifier(raw)
    if found is None:
        raise UnknownJob(f"no job {raw[:80]!r}")
    return found


def node(request: web.Request, key: str = "name") -> str:
    """The node's name in the path's ``{key}``."""
    raw = request.match_info[key]
    try:
        return node_name(raw)
    except BadRequest:
        raise UnknownNode(f"no node {raw[:80]!r}") from None


def policy(request: web.Request, key: str = "name") -> str:
    """The policy's name in the path's ``{key}``."""
    raw = request.match_info[key]
    found = fields.identifier(raw)
    if found is None:
        raise UnknownPolicy(f"no policy {raw[:80]!r}")
    return found
