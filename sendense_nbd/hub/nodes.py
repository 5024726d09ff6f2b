"""The hub's nodes: a registry over the store's ``nodes`` table, one client per node, and health checks.

A node is registered by name with its API URL, an optional bearer token (kept in the hub's 0600 store,
never shown: the API shows ``"token": true/false``), an optional tunnel identity (the SSH key
fingerprint its tunnel uses, shown), its NBD transport (``tunnel``: plaintext ``nbd://`` through its
SSH tunnel, the default; ``tls``: ``nbds://`` straight to the hub's exports, which then require TLS),
optionally ``nbd_host``, the hub's address as that node dials the exports, and optionally ``hub_url``,
the hub API as that node reaches it (else the hub's ``--public-url``). What the hub's TLS allows of a
node is :class:`~sendense_nbd.hub.transport.ExportTLS`'s to say. The hub's ``--node-url`` (with its
``--node-*`` options, one per field) is the node named :data:`DEFAULT`, written whole at every start
(``"configured": "command line"``) and changed only there; a request or policy that names no node goes
to it. Every answer of a node (health, disks, VMs, a job start) records its last contact; a health check
every :data:`HEALTH_INTERVAL` seconds, through the hub's clock, records its version and load, or why it
did not answer. After each round the hub fails the running jobs of nodes that are lost (:data:`NODE_LOST`)
or no longer know them (:meth:`NodeRegistry.knows_job`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from sendense_nbd import fields
from sendense_nbd.client.uri import normal_host
from sendense_nbd.errors import BadRequest, Conflict, NodeError, NodeNotFound, UnknownNode, URIError
from sendense_nbd.http_api import check_token
from sendense_nbd.hub.clock import Clock
from sendense_nbd.hub.db import STORE_ERRORS, Connection, Database, rows
from sendense_nbd.hub.node_client import NodeClient
from sendense_nbd.hub.transport import TRANSPORT_TUNNEL, TRANSPORTS, ExportTLS

log = logging.getLogger(__name__)

#: The node a request or policy without a node goes to; ``--node-url`` registers it.
DEFAULT = "default"
#: Seconds between health checks, and the time a node has to answer one.
HEALTH_INTERVAL = 30.0
HEALTH_TIMEOUT = 5.0
#: Nodes asked at once in one round of checks.
HEALTH_CONCURRENCY = 32
#: Seconds a node may go without answering before its running jobs fail ``node_unavailable``
#: (``HubConfig.node_lost``).
NODE_LOST = 120.0
#: Seconds after a job was queued before a node that does not know it fails it (the node
#: registers a job when it accepts it).
JOB_GRACE = 60.0
#: Most nodes one hub registers.
MAX_NODES = 1000
MAX_URL = 2048
MAX_TOKEN = 4096
#: A node's last error is cut to this many characters.
MAX_ERROR = 1024
#: How a node came to be: the API, or the hub's command line (``--node-url``).
BY_API, BY_COMMAND_LINE = "api", "command line"
#: An OpenSSH key fingerprint, as ``ssh-keygen -l`` prints it.
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_FIELDS = frozenset({"name", "url", "token", "tunnel_identity", "transport", "nbd_host", "hub_url", "tls_pinned"})
#: The fields the hub's TLS checks a node's exports by (:meth:`ExportTLS.check_node`).
_ROUTE_FIELDS = frozenset({"transport", "nbd_host", "tls_pinned"})
#: Forget a node's health (its URL changed).
_UNSEEN = ", ".join(
    f"{column} = NULL"
    for column in (
        "last_contact",
        "last_check",
        "up",
        "version",
        "running_jobs",
        "queued_jobs",
        "max_jobs",
        "last_error",
    )
)


@attrs.frozen(kw_only=True)
class NodeRecord:
    """A registered node and its health as last seen (None: not known yet)."""

    name: str
    url: str
    token: str | None = attrs.field(default=None, repr=False)
    tunnel_identity: str | None = None
    #: :data:`TRANSPORT_TUNNEL` or :data:`TRANSPORT_TLS`.
    transport: str = TRANSPORT_TUNNEL
    #: The hub's address as this node dials the NBD exports (None: the hub's ``--nbd-advertise``).
    nbd_host: str | None = None
    #: The hub API as this node reaches it, sent with each job (None: the hub's ``--public-url``).
    hub_url: str | None = None
    #: The node pins the hub's certificate by its fingerprint (``[tls] fingerprint``), which checks no host
    #: name: the hub does not check ``nbd_host`` against its certificate's names for it.
    tls_pinned: bool = False
    configured: str = BY_API
    added: float
    last_contact: float | None = None
    last_check: float | None = None
    up: bool | None = None
    version: str | None = None
    running_jobs: int | None = None
    queued_jobs: int | None = None
    max_jobs: int | None = None
    last_error: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> NodeRecord:
        """A node from its row in the store."""
        values = dict(row)
        values["up"] = None if values["up"] is None else bool(values["up"])
        values["transport"] = values.get("transport") or TRANSPORT_TUNNEL
        values["tls_pinned"] = bool(values.get("tls_pinned"))
        return cls(**values)

    def to_json(self) -> dict[str, object]:
        """The node as the API shows it: the token as ``true``/``false`` only."""
        out = attrs.asdict(self)
        out["token"] = self.token is not None
        return out


def node_name(value: object, name: str = "name") -> str:
    """A node's name: 1-128 of ``A-Z a-z 0-9 . _ : -``, starting with a letter or digit."""
    checked = fields.identifier(value)
    if checked is None:
        raise BadRequest(
            f"{name} must be 1-128 of letters, digits, '.', '_', ':', '-' (starting with a letter or digit)"
        )
    return checked


def node_url(value: object, name: str = "url", what: str = "the node's API") -> str:
    """An ``http://`` or ``https://`` URL with a host, no credentials, query or fragment (trailing ``/`` cut)."""
    url = fields.text(value, name, limit=MAX_URL)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"{name} {url[:80]!r} is not a URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"{name} {url[:80]!r} must be an http:// or https:// URL with a host ({what})")
    if parts.username is not None or parts.query or parts.fragment or port == 0:
        raise BadRequest(f"{name} must have no user name, query or fragment (give a token for the node's auth)")
    return url.rstrip("/")


def hub_url(value: object) -> str | None:
    """The hub API as a node reaches it (``http://`` or ``https://``, as :func:`node_url`), or None."""
    return None if value is None else node_url(value, "hub_url", "the hub's API as this node reaches it")


def _token(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TOKEN or not check_token(value):
        raise BadRequest(f"token must be 1-{MAX_TOKEN} visible ASCII characters without spaces, or null")
    return value


def _identity(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not FINGERPRINT.fullmatch(value):
        raise BadRequest("tunnel_identity must be an SSH key fingerprint such as SHA256:<43 base64 characters>")
    return value


def _transport(value: object) -> str:
    if value not in TRANSPORTS:
        raise BadRequest("transport must be tunnel (NBD through the node's SSH tunnel) or tls (NBD over TLS)")
    assert isinstance(value, str)
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("tls_pinned must be true or false")
    return value


def nbd_host(value: object, name: str = "nbd_host") -> str | None:
    """The hub's address as a node dials it, a DNS name or an IP address (no port), in the normal form the
    node compares it in (:func:`~sendense_nbd.client.uri.normal_host`), or None."""
    if value is None:
        return None
    try:
        return normal_host(fields.text(value, name, limit=256), name)
    except URIError as exc:
        raise BadRequest(f"{exc} (each export has its own port)") from None


_CHECKS: dict[str, Callable[[object], Any]] = {
    "url": node_url, "token": _token, "tunnel_identity": _identity, "transport": _transport, "nbd_host": nbd_host,
    "hub_url": hub_url, "tls_pinned": _flag,
}  # fmt: skip


def parse_node(body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /nodes``: ``{"name", "url", "token"?, "tunnel_identity"?, "transport"?, "nbd_host"?,
    "hub_url"?, "tls_pinned"?}`` as columns; unknown fields refused."""
    fields.json_object(body, "the body", _FIELDS)
    return {
        "name": node_name(body.get("name")),
        "url": node_url(body.get("url")),
        "token": _token(body.get("token")),
        "tunnel_identity": _identity(body.get("tunnel_identity")),
        "transport": _transport(body.get("transport", TRANSPORT_TUNNEL)),
        "nbd_host": nbd_host(body.get("nbd_host")),
        "hub_url": hub_url(body.get("hub_url")),
        "tls_pinned": _flag(body.get("tls_pinned", False)),
    }


def parse_edit(body: Mapping[str, Any]) -> dict[str, Any]:
    """``PATCH /nodes/{name}``: the fields given (null clears ``token``, ``tunnel_identity``, ``nbd_host``
    or ``hub_url``) as columns."""
    fields.json_object(body, "the body", _FIELDS - {"name"})
    if not body:
        raise BadRequest("give at least one of url, token, tunnel_identity, transport, nbd_host, hub_url, tls_pinned")
    return {column: _CHECKS[column](value) for column, value in body.items()}


#: What a column of a node is when nothing sets it (None for the others).
_DEFAULTS: dict[str, object] = {"transport": TRANSPORT_TUNNEL, "tls_pinned": False}
#: The hub's options of its default node (``--node-url`` and the rest), by the column each sets.
DEFAULT_OPTIONS = {
    "url": "--node-url", "token": "--node-token-file", "tunnel_identity": "--node-tunnel-identity",
    "transport": "--node-transport", "nbd_host": "--node-nbd-host", "hub_url": "--node-hub-url",
    "tls_pinned": "--node-tls-pinned",
}  # fmt: skip


def default_node(values: Mapping[str, object]) -> dict[str, Any]:
    """The default node's columns from the hub's options: every column, each checked as the API checks
    it (:class:`BadRequest` names the option); ``transport`` defaults to tunnel, ``tls_pinned`` to false,
    the others to None."""
    columns: dict[str, Any] = {"name": DEFAULT}
    for column, option in DEFAULT_OPTIONS.items():
        value = values.get(column, _DEFAULTS.get(column))
        try:
            columns[column] = _CHECKS[column](value)
        except BadRequest as exc:
            raise BadRequest(f"{option}: {exc}") from None
    return columns


class NodeRegistry:
    """The registered nodes (table ``nodes``), a client per node, and their health checks.

    ``default`` (:func:`default_node`'s columns, from ``--node-url`` and its options) is written whole as
    the node :data:`DEFAULT` when the registry opens, over whatever a node of that name had; a
    command-line default left by an earlier start without it is removed. ``tls`` says what the hub's NBD
    TLS allows of a node's transport and ``nbd_host`` (:meth:`ExportTLS.check_node`), checked at every
    add and edit.
    """

    def __init__(
        self, db: Database, *, clock: Clock, default: Mapping[str, Any] | None = None, tls: ExportTLS | None = None
    ) -> None:
        self._db = db
        self.clock = clock
        self.tls = tls if tls is not None else ExportTLS()
        self._clients: dict[str, NodeClient] = {}
        db.call(lambda connection: self._configure_default(connection, default))

    def _configure_default(self, connection: Connection, default: Mapping[str, Any] | None) -> None:
        """Write the command line's default node, every column (nothing of an earlier node of that name
        stays but its health, which is forgotten too when the URL changed)."""
        if default is None:
            connection.execute("DELETE FROM nodes WHERE name = ? AND configured = ?", (DEFAULT, BY_COMMAND_LINE))
            return
        before = connection.execute("SELECT url FROM nodes WHERE name = ?", (DEFAULT,)).fetchone()
        columns = [column for column in _FIELDS if column != "name"]
        connection.execute(
            f"INSERT INTO nodes (name, {', '.join(columns)}, configured, added) "
            f"VALUES (?, {', '.join('?' for _ in columns)}, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            + ", ".join(f"{column} = excluded.{column}" for column in [*columns, "configured"]),
            (DEFAULT, *(default[column] for column in columns), BY_COMMAND_LINE, self.clock.now()),
        )  # columns from _FIELDS only
        if before is not None and before["url"] != default["url"]:
            connection.execute(f"UPDATE nodes SET {_UNSEEN} WHERE name = ?", (DEFAULT,))

    # -- the registry ------------------------------------------------------------

    async def records(self) -> list[NodeRecord]:
        """Every node with its health as last seen, by name."""
        found = await self._db.run(lambda c: rows(c.execute("SELECT * FROM nodes ORDER BY name")))
        return [NodeRecord.from_row(row) for row in found]

    async def health(self) -> list[NodeRecord]:
        """The nodes' health as last seen (:meth:`records`; no node is called)."""
        return await self.records()

    async def get(self, name: str | None) -> NodeRecord:
        """The node ``name`` (None: the default node); :class:`UnknownNode` if there is none."""
        wanted = DEFAULT if name is None else name
        found = await self._db.run(lambda c: rows(c.execute("SELECT * FROM nodes WHERE name = ?", (wanted,))))
        if not found:
            if name is None:
                raise UnknownNode("no default node: start the hub with --node-url, or register a node named default")
            raise UnknownNode(f"no node {wanted[:128]!r} is registered (see GET /api/v1/nodes)")
        return NodeRecord.from_row(found[0])

    async def find(self, name: str | None) -> NodeRecord | None:
        """:meth:`get`, or None when there is no such node."""
        try:
            return await self.get(name)
        except UnknownNode:
            return None

    async def add(self, spec: Mapping[str, Any]) -> NodeRecord:
        """Register a node (:func:`parse_node`'s columns); :class:`Conflict` ``exists`` if the name is taken,
        :class:`BadRequest` when the hub's TLS cannot serve its transport at its host."""
        self.tls.check_node(spec["name"], spec["transport"], spec["nbd_host"], pinned=spec["tls_pinned"])

        def insert(connection: Connection) -> None:
            if connection.execute("SELECT 1 FROM nodes WHERE name = ?", (spec["name"],)).fetchone():
                raise Conflict(f"a node named {spec['name']!r} is registered already", "exists")
            if connection.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] >= MAX_NODES:
                raise Conflict(f"{MAX_NODES} nodes are registered already: delete one first", "too_many")
            connection.execute(
                "INSERT INTO nodes (name, url, token, tunnel_identity, transport, nbd_host, hub_url, tls_pinned, "
                "configured, added) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    spec["name"], spec["url"], spec["token"], spec["tunnel_identity"], spec["transport"],
                    spec["nbd_host"], spec["hub_url"], spec["tls_pinned"], BY_API, self.clock.now(),
                ),
            )  # fmt: skip

        await self._db.run(insert)
        return await self.get(spec["name"])

    async def edit(self, name: str, changes: Mapping[str, Any]) -> NodeRecord:
        """Change a node's url, token, tunnel identity, transport, NBD host or hub URL (:func:`parse_edit`'s
        columns); its client is renewed, and a new URL forgets its health. A change of what its exports
        depend on (transport, NBD host) is checked against the hub's TLS (:meth:`ExportTLS.check_node`)
        before anything is written; other changes are not, so a token can be rotated even while the stored
        host is one the hub's current certificate does not name (its backups are refused ``tls_host``)."""

        def update(connection: Connection) -> None:
            self._changeable(connection, name)
            now = NodeRecord.from_row(rows(connection.execute("SELECT * FROM nodes WHERE name = ?", (name,)))[0])
            changed = attrs.evolve(now, **changes)
            if _ROUTE_FIELDS & changes.keys():
                self.tls.check_node(name, changed.transport, changed.nbd_host, pinned=changed.tls_pinned)
            assignments = ", ".join(f"{column} = ?" for column in changes)  # columns from parse_edit only
            connection.execute(f"UPDATE nodes SET {assignments} WHERE name = ?", (*changes.values(), name))
            if "url" in changes:  # another node, maybe: what was seen of the old one no longer holds
                connection.execute(f"UPDATE nodes SET {_UNSEEN} WHERE name = ?", (name,))

        await self._db.run(update)
        await self._drop_client(name)
        return await self.get(name)

    async def delete(self, name: str) -> None:
        """Forget a node; :class:`Conflict` ``in_use`` while a policy names it."""

        def remove(connection: Connection) -> None:
            self._changeable(connection, name)
            users = _policies_using(connection, name)
            if users:
                raise Conflict(f"node {name!r} is used by the policies {', '.join(users[:10])}", "in_use")
            connection.execute("DELETE FROM nodes WHERE name = ?", (name,))

        await self._db.run(remove)
        await self._drop_client(name)

    @staticmethod
    def _changeable(connection: Connection, name: str) -> None:
        found = rows(connection.execute("SELECT configured FROM nodes WHERE name = ?", (name,)))
        if not found:
            raise UnknownNode(f"no node {name[:128]!r} is registered (see GET /api/v1/nodes)")
        if found[0]["configured"] == BY_COMMAND_LINE:
            raise Conflict(f"node {name!r} comes from the hub's --node-url: change it there", "configured")

    # -- calls to nodes ----------------------------------------------------------

    async def client(self, name: str | None) -> NodeClient:
        """The client of node ``name`` (None: the default node), made on first use."""
        record = await self.get(name)
        client = self._clients.get(record.name)
        if client is None:
            client = NodeClient(
                record.url, token=record.token, on_answer=lambda error: self._answered(record.name, error)
            )
            self._clients[record.name] = client
        return client

    async def list_vms(self, name: str | None) -> list[str]:
        """The inventory paths of the VMs of node ``name`` (None: the default node)."""
        return await (await self.client(name)).vms()

    async def check(self, name: str) -> NodeRecord:
        """Ask one node for its health (within :data:`HEALTH_TIMEOUT` seconds) and record the answer."""
        client = await self.client(name)
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                answer = await client.health()
        except TimeoutError:
            await self._answered(name, f"no health answer within {HEALTH_TIMEOUT:.0f} s")
        except NodeError:
            pass  # the client recorded it
        else:
            await self._record_health(name, answer)
        return await self.get(name)

    async def check_all(self) -> list[NodeRecord]:
        """Check every node, :data:`HEALTH_CONCURRENCY` at a time; returns them all with their new health."""
        slots = asyncio.Semaphore(HEALTH_CONCURRENCY)

        async def check(name: str) -> None:
            async with slots:
                await self.check(name)

        names = [record.name for record in await self.records()]
        await asyncio.gather(*(check(name) for name in names), return_exceptions=True)
        return await self.records()

    async def knows_job(self, name: str, job_id: str) -> bool | None:
        """Whether node ``name`` knows the job (``GET /backups/{job}``, within :data:`HEALTH_TIMEOUT`
        seconds): False when it answers 404, None when it gives no usable answer."""
        try:
            client = await self.client(name)
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await client.job(job_id)
        except NodeNotFound:
            return False
        except (NodeError, UnknownNode, TimeoutError):
            return None
        return True

    async def watch(self, *, then: Callable[[], Awaitable[None]] | None = None) -> None:
        """Check every node every :data:`HEALTH_INTERVAL` seconds of the hub's clock, and after each round
        await ``then`` (the hub's watch of its nodes' jobs), until cancelled."""
        while True:
            for work, what in ((self.check_all, "checking the nodes' health"), (then, "watching the nodes' jobs")):
                if work is None:
                    continue
                try:
                    await work()
                except Exception as exc:  # noqa: BLE001 - a failed round is logged, the next runs
                    log.error("%s failed: %s", what, exc)
            await self.clock.sleep(HEALTH_INTERVAL)

    async def close(self) -> None:
        """Close every node's HTTP session."""
        for name in list(self._clients):
            await self._drop_client(name)

    async def _drop_client(self, name: str) -> None:
        client = self._clients.pop(name, None)
        if client is not None:
            await client.close()

    async def _answered(self, name: str, error: str | None) -> None:
        """Record that a node answered (``error`` None) or did not (why); a store that cannot record it
        (closing) is logged, never the caller's failure."""
        now = self.clock.now()
        args: tuple[object, ...]
        if error is None:
            sql, args = "UPDATE nodes SET last_contact = ?, up = 1, last_error = NULL WHERE name = ?", (now, name)
        else:
            sql = "UPDATE nodes SET last_check = ?, up = 0, last_error = ? WHERE name = ?"
            args = (now, error[:MAX_ERROR], name)
        try:
            await self._db.run(lambda connection: connection.execute(sql, args))
        except STORE_ERRORS + (RuntimeError,) as exc:
            log.warning("recording the answer of node %s failed: %s", name, exc)

    async def _record_health(self, name: str, answer: Mapping[str, Any]) -> None:
        def count(key: str) -> int | None:
            value = answer.get(key)
            return value if type(value) is int and 0 <= value < 1 << 31 else None

        version = answer.get("version")
        values = (
            self.clock.now(),
            version[:64] if isinstance(version, str) else None,
            count("running_jobs"),
            count("queued_jobs"),
            count("max_jobs"),
            name,
        )
        await self._db.run(
            lambda connection: connection.execute(
                "UPDATE nodes SET last_check = ?, version = ?, running_jobs = ?, queued_jobs = ?, max_jobs = ? "
                "WHERE name = ?",
                values,
            )
        )


def _policies_using(connection: Connection, name: str) -> list[str]:
    """The policies whose node is ``name`` (a policy without one uses :data:`DEFAULT`)."""
    users = []
    for row in rows(connection.execute("SELECT name, spec FROM policies ORDER BY name")):
        try:
            node = json.loads(row["spec"]).get("node")
        except (ValueError, AttributeError):
            continue
        if (node or DEFAULT) == name:
            users.append(str(row["name"]))
    return users
