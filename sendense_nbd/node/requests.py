"""Node API requests, parsed at the edge into frozen values before a job starts.

The hub is the node's only caller, and ``POST /backups`` is what it sends
(docs/NODE_API.md); unknown fields are refused. Targets must be NBD URIs (a
local file would let a caller write a VM's disk anywhere the node can).
With ``[node] hub_url`` set (one URL or several), the job's ``api_url`` must be
one of them and every target must be on that hub's host (or on its ``[node]
nbd_host`` when set: the hub's NBD address as this node dials it, when it is not
the API's), so a caller cannot send a VM's disks, progress or the node's hub
token anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs

from sendense_nbd.backup import Mode
from sendense_nbd.client.uri import normal_host, parse_uri
from sendense_nbd.errors import BadRequest, URIError
from sendense_nbd.fields import (
    IDENTIFIER,
    MAX_DISK_KEY,
    MAX_DISKS,
    choice,
    json_object,
    text,
    vm_path,
)
from sendense_nbd.node.config import hub_host

_MAX_URL = 2048


@attrs.frozen
class BackupRequest:
    """``POST /api/v1/backups``: ``{"job_id", "vm_path", "mode"?, "targets", "api_url"}``."""

    job_id: str
    vm_path: str
    mode: Mode
    #: (disk key, NBD URI), by disk key.
    targets: tuple[tuple[int, str], ...]
    api_url: str

    @classmethod
    def from_json(
        cls, body: Mapping[str, Any], *, hub_urls: tuple[str, ...] = (), nbd_hosts: Mapping[str, str] | None = None
    ) -> BackupRequest:
        """Parse and check the body (:class:`BadRequest` names the field at fault); ``hub_urls`` pin the hubs a
        job may report to (none: any), and its targets to its hub's host, or to the hub's ``nbd_hosts`` entry
        (by hub URL without a trailing ``/``) when it has one."""
        json_object(body, "the body", frozenset({"job_id", "vm_path", "mode", "targets", "api_url"}))
        job_id = body.get("job_id")
        if not isinstance(job_id, str) or not IDENTIFIER.fullmatch(job_id):
            raise BadRequest("job_id must be 1 to 128 letters, digits, '.', '_', ':' or '-'")
        api_url = http_url(body.get("api_url"), "api_url")
        target_host = _target_host(api_url, hub_urls, nbd_hosts or {})
        return cls(
            job_id,
            vm_path(body.get("vm_path")),
            choice(body.get("mode", "auto"), "mode", Mode),
            _targets(body.get("targets"), target_host),
            api_url,
        )


def _target_host(api_url: str, hub_urls: tuple[str, ...], nbd_hosts: Mapping[str, str]) -> tuple[str, str] | None:
    """The host every target of a job reporting to ``api_url`` must be on, in normal form
    (:func:`~sendense_nbd.client.uri.normal_host`), and the setting that says so (None: any host);
    :class:`BadRequest` when ``api_url`` is none of the pinned hubs (a trailing ``/`` makes no difference)."""
    if not hub_urls:
        return None
    hub = next((url for url in hub_urls if url.rstrip("/") == api_url.rstrip("/")), None)
    if hub is None:
        pinned = "this node's hub" if len(hub_urls) == 1 else f"one of this node's {len(hub_urls)} hubs"
        raise BadRequest(f"api_url is not {pinned} ([node] hub_url)")
    nbd_host = nbd_hosts.get(hub.rstrip("/"))
    if nbd_host is not None:
        return normal_host(nbd_host), "[node] nbd_host"
    return hub_host(hub), "[node] hub_url"


def _same_host(host: str | None, pinned: str) -> bool:
    """Whether a target's host is the pinned one (both in normal form: a name without case or trailing dot,
    an address as :mod:`ipaddress` values, zone included)."""
    try:
        return host is not None and normal_host(host) == pinned
    except URIError:
        return False


def http_url(value: object, name: str) -> str:
    """An ``http://`` or ``https://`` URL with a host."""
    url = text(value, name, limit=_MAX_URL)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError:
        raise BadRequest(f"{name} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"{name} must be an http:// or https:// URL")
    return url


#: Query parameters of an nbds:// URI that choose how TLS is checked: the node's own ``[tls]`` decides
#: them, never the caller (a path to local keys, or verification off, would be the caller's to choose).
_TLS_SETTINGS = frozenset({"tls-certificates", "tls-verify-peer", "tls-hostname", "tls-fingerprint", "tls-type"})


def _targets(value: object, hub_host: tuple[str, str] | None) -> tuple[tuple[int, str], ...]:
    targets = json_object(value, "targets")
    if not 0 < len(targets) <= MAX_DISKS:
        raise BadRequest(f"targets maps 1 to {MAX_DISKS} disk keys to NBD URIs")
    out = []
    for key, uri in targets.items():
        if not key.isascii() or not key.isdigit() or len(key) > 10 or int(key) > MAX_DISK_KEY:
            raise BadRequest(f"target keys are VMware disk keys (0 to {MAX_DISK_KEY})")
        uri = text(uri, f"targets[{key}]", limit=_MAX_URL)
        try:
            address = parse_uri(uri)
        except URIError as exc:
            raise BadRequest(f"targets[{key}]: {exc}") from None
        if hub_host is not None and not _same_host(address.host, hub_host[0]):
            raise BadRequest(f"targets[{key}] is not on this node's hub ({hub_host[0]}, from {hub_host[1]})")
        if _TLS_SETTINGS & set(parse_qs(urlsplit(uri).query)):
            raise BadRequest(f"targets[{key}]: a target names no TLS settings; the node's own [tls] applies")
        out.append((int(key), uri))
    if len({key for key, _ in out}) != len(out):
        raise BadRequest("a disk key is given twice in targets")
    return tuple(sorted(out))
