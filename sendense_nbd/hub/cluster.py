"""Several hubs on one database: each hub's identity, heartbeat and liveness, and the takeover of a lost one.

Every hub has an ID (``--hub-id``; by default one made at its first start and kept in its directory, file
``hub-id``) and a row in the ``hubs`` table: the API URL peers and nodes use (``--public-url``), the host
its NBD exports are reached at and its port pool, its store, when it started, its heartbeat and its state.
A hub beats every ``heartbeat`` seconds of its clock; one whose heartbeat is older than ``lapse`` seconds
(or that stopped) is lost, and the first live hub to see it takes it over, exactly once (a conditional
UPDATE of its row): the service then fails its jobs, releases its ports and takes its open runs.

Each hub touches only what is its own: its jobs (``jobs.hub``), its leases (keyed by hub and port: each
hub's pool is on its own address), the points of its jobs. A hub with a local directory repository is
alone on its database; hubs that share one share an RBD repository (its UUID is recorded in their rows,
so a hub joining the cluster takes the repository without ``adopt=yes``).

Liveness compares heartbeats written with one machine's clock against another's, so the machines' clocks must
agree (NTP): on PostgreSQL a hub measures its clock against the database server's at join (refused beyond
:func:`skew_bound`: :class:`ClockSkew`) and at every heartbeat (an error logged, the skew shown in its row).

Each process has a token of its own in its row: a second process with a live hub's ID (a reused ``--hub-id``,
a cloned state directory) is refused (:class:`HubIdInUse`), and a hub whose row another process took over
learns it at its next heartbeat (:meth:`Cluster.beat` raises :class:`HubIdInUse`: the hub stops serving).

A cluster lock this process let go of whose row could not be deleted (the database failed over) counts as
released here; the next heartbeat deletes it. A wait for a lock is bounded (:data:`LOCK_WAIT`,
:class:`ClusterLockTimeout`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import enum
import functools
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Collection
from typing import Any
from urllib.parse import urlsplit

import attrs

from sendense_nbd.errors import ClockSkew, ClusterLockTimeout, ConfigError, HubIdInUse, OtherHub
from sendense_nbd.fields import identifier
from sendense_nbd.hub.clock import Clock
from sendense_nbd.hub.db import Connection, Database, rows
from sendense_nbd.storage.files import temporary_name

#: Seconds between heartbeats, and without one before a hub counts as lost (``--heartbeat``, ``--hub-lost``).
HEARTBEAT = 5.0
HUB_LOST = 30.0
#: The file in a hub's directory that keeps its ID.
ID_FILE = "hub-id"
#: Seconds between the first two tries of a cluster lock another live hub holds (:meth:`Cluster.lock`),
#: doubling up to the last.
LOCK_POLL, LOCK_POLL_MAX = 0.25, 2.0
#: Seconds :meth:`Cluster.lock` waits at most, by default, for another live hub to let go of a lock.
LOCK_WAIT = 300.0
#: Seconds a starting hub waits for another hub's start-up recovery (a sweep of a large pool takes long).
RECOVERY_WAIT = 3600.0
#: Seconds a machine's clock may be off the PostgreSQL server's at most (or a quarter of ``--hub-lost``, if
#: less: :func:`skew_bound`); and between two errors logged while a running hub's clock is off by more.
MAX_SKEW = 5.0
SKEW_LOG_EVERY = 300.0
#: Longest API URL a hub registers (``--api-advertise``, else ``--public-url``).
MAX_API_URL = 1024
_VISIBLE_ASCII = re.compile(r"[!-~]+")

log = logging.getLogger(__name__)


class HubState(enum.Enum):
    """A member's row: live (beating), stopped (left cleanly), lost (taken over by another hub)."""

    LIVE = "live"
    STOPPED = "stopped"
    LOST = "lost"


def check_membership(given: str | None, *, heartbeat: float, lapse: float) -> None:
    """Refuse (:class:`ConfigError`) a ``--hub-id`` that is no name, and a lapse not longer than the heartbeat."""
    if given is not None and identifier(given) is None:
        raise ConfigError(f"--hub-id {given[:80]!r}: 1-128 of letters, digits, '.', '_', ':', '-'")
    if lapse <= heartbeat:
        raise ConfigError(f"--hub-lost ({lapse:g} s) must be longer than --heartbeat ({heartbeat:g} s)")


def api_url_fault(url: object) -> str | None:
    """What keeps ``url`` from being a hub's API URL in the cluster (its row, shown by ``GET /hubs`` and sent
    by the other hubs as their 307s' ``Location``), None when nothing does: it is ``http://`` or ``https://``
    with a host, no user name or password, query or fragment, in 1 to MAX_API_URL visible ASCII characters."""
    if not isinstance(url, str) or len(url) > MAX_API_URL or not _VISIBLE_ASCII.fullmatch(url):
        return f"must be 1 to {MAX_API_URL} visible ASCII characters (no spaces or control characters)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.username is not None:
        return "must carry no user name or password (every API client is shown it)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.query or parts.fragment:
        return "must have no query or fragment (the requests' paths are appended to it)"
    return None


def check_api_url(advertise: str | None, public_url: str) -> None:
    """Refuse (:class:`ConfigError`) the API URL a hub would register: ``--api-advertise``, else ``--public-url``
    (the URL itself is not repeated: it may hold a password)."""
    if advertise is not None:
        option, url = "--api-advertise", advertise
    else:
        option, url = "--public-url (the API URL this hub registers without --api-advertise)", public_url
    fault = api_url_fault(url)
    if fault is not None:
        raise ConfigError(f"{option} {fault}: the other hubs send API clients to it")


def hub_id(root: str, given: str | None) -> str:
    """The hub's ID: ``given`` (``--hub-id``, checked by :func:`check_membership`), else the one kept in
    ``root`` (made at the first start)."""
    if given is not None:
        return given
    path = os.path.join(root, ID_FILE)
    try:
        with open(path, encoding="ascii") as f:
            kept = f.read().strip()
    except FileNotFoundError:
        kept = ""
    if identifier(kept) is not None:
        return kept
    made = f"{socket.gethostname().split('.')[0][:40] or 'hub'}-{uuid.uuid4().hex[:8]}"
    if identifier(made) is None:
        made = f"hub-{uuid.uuid4().hex[:8]}"
    temporary = temporary_name(path)
    with open(temporary, "w", encoding="ascii") as f:
        f.write(made + "\n")
    os.replace(temporary, path)
    return made


def real_time() -> float:
    """This machine's real-time clock (``time.time()``), which clock skew is measured with: never the hub's
    injected :class:`Clock` (tests replace that)."""
    return time.time()


def skew_bound(lapse: float) -> float:
    """The most a hub's clock may be off the database server's: :data:`MAX_SKEW`, or a quarter of the lapse
    if less (two hubs off in opposite directions then still see each other's heartbeats as younger than the
    lapse less half of it)."""
    return min(MAX_SKEW, lapse / 4)


def measure_skew(db: Database, connection: Connection) -> float | None:
    """This machine's clock less the database server's, in seconds (the server's reading taken as of the
    middle of the round trip); None where the store has no other clock (SQLite)."""
    before = real_time()
    server = db.engine.server_time(connection)
    after = real_time()
    return None if server is None else (before + after) / 2 - server


def process_token() -> str:
    """A new token for this process's row: random, then this host's name and this process's ID (so that a
    predecessor on this host that died is recognised: :func:`_dead_predecessor`)."""
    return f"{uuid.uuid4().hex} {socket.gethostname()} {os.getpid()}"


def _dead_predecessor(token: str | None) -> bool:
    """Whether ``token`` is a process's of this host that runs no longer (or had this process's ID: a
    restarted container's)."""
    host, _, pid = (token or "").partition(" ")[2].rpartition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, under another user
        return False
    return False


def _stamp(epoch: float) -> str:
    """``epoch`` as UTC ISO 8601, to the second."""
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


@attrs.frozen
class Member:
    """One hub of the cluster as its row says, and whether it is live at the time it was read."""

    id: str
    api_url: str
    nbd_host: str
    ports: range
    store: str
    repository: str | None
    started: float
    heartbeat: float
    state: HubState
    live: bool
    taken_by: str | None = None
    #: The hub's clock less the PostgreSQL server's at its last heartbeat (None: SQLite, or not measured).
    clock_skew: float | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], now: float, lapse: float) -> Member:
        """A member from its row, live when its state is and its heartbeat is younger than ``lapse``."""
        state = HubState(row["state"])
        live = state is HubState.LIVE and now - row["heartbeat"] <= lapse
        ports = range(row["port_first"], row["port_last"] + 1)
        return cls(
            row["id"], row["api_url"], row["nbd_host"], ports, row["store"], row["repository"], row["started"],
            row["heartbeat"], state, live, row["taken_by"], _skew(row.get("clock_skew")),
        )  # fmt: skip

    def to_json(self) -> dict[str, object]:
        """As ``GET /hubs`` shows it."""
        return {
            "id": self.id, "api_url": self.api_url, "nbd_host": self.nbd_host,
            "ports": {"first": self.ports.start, "last": self.ports.stop - 1, "size": len(self.ports)},
            "store": self.store, "started": self.started, "heartbeat": self.heartbeat, "state": self.state.value,
            "live": self.live, "taken_by": self.taken_by, "clock_skew": self.clock_skew,
        }  # fmt: skip


@attrs.frozen(kw_only=True)
class Identity:
    """What a hub registers: its ID, API URL, NBD host and pool, and its store (``local:DIR`` or the RBD URL)
    with the repository's UUID (RBD)."""

    id: str
    api_url: str
    nbd_host: str
    ports: range
    store: str
    local: bool


class Cluster:
    """This hub's membership: join, beat, read the members, take a lost one over, leave."""

    def __init__(self, db: Database, clock: Clock, me: Identity, *, heartbeat: float, lapse: float) -> None:
        self.db = db
        self.clock = clock
        self.me = me
        self.heartbeat = heartbeat
        self.lapse = lapse
        #: This process's token in its row (:func:`process_token`).
        self.token = process_token()
        #: This hub's clock less the database server's as last measured (None: SQLite, or not yet).
        self.skew: float | None = None
        self._skew_logged = -SKEW_LOG_EVERY
        #: The cluster locks this process holds or waits for, by name: how many of its tasks do.
        self._held: collections.Counter[str] = collections.Counter()

    @property
    def id(self) -> str:
        """This hub's ID."""
        return self.me.id

    async def repository(self) -> str | None:
        """The RBD repository's UUID the other members recorded (None: none did)."""

        def read(connection: Any) -> list[dict[str, Any]]:
            sql = "SELECT repository FROM hubs WHERE id != ? AND repository IS NOT NULL ORDER BY started DESC"
            return rows(connection.execute(sql, (self.id,)))

        found = await self.db.run(read)
        return found[0]["repository"] if found else None

    async def join(self, repository: str | None) -> None:
        """Register (or re-register) as live with a new heartbeat. Refused: a local directory repository where
        other hubs are registered, and a store other than theirs (:class:`ConfigError`); a clock too far off
        the database server's (:class:`ClockSkew`); this hub's ID while another process's row of it is live
        (:class:`HubIdInUse`)."""
        now = self.clock.now()
        me = self.me

        def register(connection: Connection) -> float | None:
            skew = measure_skew(self.db, connection)
            self._check_skew(skew)
            others = rows(connection.execute("SELECT id, store FROM hubs WHERE id != ? ORDER BY id", (me.id,)))
            _check_members(me, others)
            self._check_id(connection, now)
            connection.execute("DELETE FROM hubs WHERE id = ?", (me.id,))
            connection.execute("DELETE FROM locks WHERE hub = ?", (me.id,))  # held by this hub's last run
            connection.execute(
                "INSERT INTO hubs (id, api_url, nbd_host, port_first, port_last, store, repository, started, "
                "heartbeat, state, token, clock_skew) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (me.id, me.api_url, me.nbd_host, me.ports.start, me.ports.stop - 1, me.store, repository, now, now,
                 HubState.LIVE.value, self.token, skew),
            )  # fmt: skip
            return skew

        self.skew = await self.db.run(register)

    def _check_skew(self, skew: float | None) -> None:
        """Refuse (:class:`ClockSkew`) a clock off the database server's by more than :func:`skew_bound`."""
        bound = skew_bound(self.lapse)
        if skew is not None and abs(skew) > bound:
            raise ClockSkew(
                f"this machine's clock is {skew:+.1f} s off the database server's ({self.db.name}): hubs of a "
                f"cluster need synchronised clocks (NTP): at most {bound:g} s (the lesser of {MAX_SKEW:g} s and a "
                f"quarter of --hub-lost); synchronise this machine's clock (e.g. chronyc tracking) and start again"
            )

    def _check_id(self, connection: Connection, now: float) -> None:
        """Refuse (:class:`HubIdInUse`) this hub's ID while a live row of it has another process's token (but
        for a predecessor on this host that runs no longer)."""
        found = rows(connection.execute("SELECT state, heartbeat, token FROM hubs WHERE id = ?", (self.id,)))
        if not found or found[0]["token"] == self.token or _dead_predecessor(found[0]["token"]):
            return
        row = found[0]
        age = now - row["heartbeat"]
        if row["state"] != HubState.LIVE.value or age > self.lapse:
            return
        where = (row["token"] or "").partition(" ")[2].rpartition(" ")[0] or "an unknown host"
        raise HubIdInUse(
            f"hub ID {self.id} is in use: another process runs with it (on {where}; its heartbeat is {age:.0f} s "
            f"old); a reused --hub-id or a cloned state directory (its {ID_FILE} file): give this hub an ID of "
            f"its own (--hub-id, or delete the copied {ID_FILE}); if that process is gone, its row lapses within "
            f"{max(0.0, self.lapse - age):.0f} s: start again then"
        )

    async def beat(self) -> bool:
        """Renew the heartbeat (and measure the clock's skew), and delete the rows of cluster locks this process
        let go of but failed to delete; False when this hub had been taken over meanwhile (it is live again
        now). :class:`HubIdInUse` when another process took this hub's ID over (the hub must stop)."""
        now = self.clock.now()
        held = set(self._held)  # taken before the call is queued: a lock taken after is queued after it

        def renew(connection: Connection) -> tuple[bool, float | None, list[str]]:
            found = connection.execute("SELECT token FROM hubs WHERE id = ?", (self.id,)).fetchone()
            if found is not None and found[0] != self.token:
                raise HubIdInUse(
                    f"hub ID {self.id} was taken over by another process (a reused --hub-id or a cloned state "
                    f"directory): this one stops serving; give each hub an ID of its own"
                )
            skew = measure_skew(self.db, connection)
            cursor = connection.execute(
                "UPDATE hubs SET heartbeat = ?, clock_skew = ? WHERE id = ? AND state = ?",
                (now, skew, self.id, HubState.LIVE.value),
            )
            if cursor.rowcount != 1:
                connection.execute(
                    "UPDATE hubs SET heartbeat = ?, started = ?, state = ?, taken_by = NULL, clock_skew = ? "
                    "WHERE id = ?",
                    (now, now, HubState.LIVE.value, skew, self.id),
                )
            return cursor.rowcount == 1, skew, self._drop_released(connection, held)

        live, self.skew, dropped = await self.db.run(renew)
        if dropped:
            log.warning("deleted the rows of cluster locks this hub had released: %s", ", ".join(dropped))
        self._log_skew()
        return live

    def _drop_released(self, connection: Connection, held: Collection[str]) -> list[str]:
        """Delete this hub's lock rows whose names this process does not hold (a release that failed); their
        names."""
        names = [row[0] for row in connection.execute("SELECT name FROM locks WHERE hub = ?", (self.id,))]
        stale = sorted(name for name in names if name not in held)
        if stale:
            connection.executemany("DELETE FROM locks WHERE name = ? AND hub = ?", [(name, self.id) for name in stale])
        return stale

    def _log_skew(self) -> None:
        """Log an error (at most every :data:`SKEW_LOG_EVERY` s) while the clock is off by more than allowed."""
        bound = skew_bound(self.lapse)
        if self.skew is None or abs(self.skew) <= bound or real_time() - self._skew_logged < SKEW_LOG_EVERY:
            return
        self._skew_logged = real_time()
        log.error(
            "this machine's clock is %+.1f s off the database server's (at most %g s): hubs of a cluster need "
            "synchronised clocks (NTP), or they take each other over and hold one cluster lock together",
            self.skew, bound,
        )  # fmt: skip

    async def members(self) -> list[Member]:
        """Every registered hub, by ID, with its liveness now; a row that reads as no member (a state this
        release does not know, a column of the wrong type) is left out, with a warning."""
        now = self.clock.now()
        found = await self.db.run(lambda connection: rows(connection.execute("SELECT * FROM hubs ORDER BY id")))
        return [member for row in found if (member := _member(row, now, self.lapse)) is not None]

    async def others_live(self) -> list[Member]:
        """The other hubs that are live now."""
        return [member for member in await self.members() if member.live and member.id != self.id]

    async def lost(self) -> list[Member]:
        """The other hubs whose heartbeat lapsed or that stopped, not yet taken over."""
        return [
            member for member in await self.members()
            if member.id != self.id and member.state is not HubState.LOST and not member.live
        ]  # fmt: skip

    async def take_over(self, member: Member) -> bool:
        """Mark a lost hub taken over by this one; True for the one hub that did (its row as read still holds)."""
        now = self.clock.now()

        def take(connection: Any) -> bool:
            cursor = connection.execute(
                "UPDATE hubs SET state = ?, taken_by = ?, taken_at = ? WHERE id = ? AND state = ? AND heartbeat = ?",
                (HubState.LOST.value, self.id, now, member.id, member.state.value, member.heartbeat),
            )
            return bool(cursor.rowcount == 1)

        return await self.db.run(take)

    @contextlib.asynccontextmanager
    async def lock(self, name: str, *, wait: float = LOCK_WAIT) -> AsyncIterator[None]:
        """Hold the cluster's lock ``name`` (a row of ``locks``): one hub at a time; the hold of a hub that is
        not live (lost, stopped, or its row unreadable) lapses, so a hub waits only while a live one holds it,
        and ``wait`` seconds at most (:class:`ClusterLockTimeout`, naming the holder). Within a hub, the caller
        keeps its own tasks apart (the row is taken as the hub's). A release whose DELETE fails counts as done
        here: the next heartbeat deletes the row (:meth:`beat`)."""
        self._held[name] += 1  # before the row is taken: a heartbeat queued meanwhile keeps it
        try:
            await self._acquire(name, wait)
        except BaseException:
            self._let_go(name)
            raise
        try:
            yield
        finally:
            await self._release(name)

    async def _acquire(self, name: str, wait: float) -> None:
        """Take the lock ``name``, polling while another live hub holds it, ``wait`` seconds at most."""
        deadline = time.monotonic() + wait
        delay = LOCK_POLL
        while True:
            holder = await self.db.run(functools.partial(self._take_lock, name, self.clock.now()))
            if holder is None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                hub, since = holder
                raise ClusterLockTimeout(
                    f"cluster lock {name!r} is held by hub {hub} since {_stamp(since)}; this hub waited {wait:g} s "
                    f"for it: hub {hub} is live but does not let go (if it is stuck, stop it: its hold lapses "
                    f"once its heartbeat does, {self.lapse:g} s later)"
                )
            await asyncio.sleep(min(delay, left))
            delay = min(2 * delay, LOCK_POLL_MAX)

    def _let_go(self, name: str) -> bool:
        """Count one holder of ``name`` less in this process; whether none is left."""
        self._held[name] -= 1
        if self._held[name] > 0:
            return False
        del self._held[name]
        return True

    async def _release(self, name: str) -> None:
        """Let go of ``name``: its row deleted once no task of this process holds it; a failed DELETE is logged
        and left to the next heartbeat."""
        if not self._let_go(name):
            return
        try:
            await self.db.run(lambda c: c.execute("DELETE FROM locks WHERE name = ? AND hub = ?", (name, self.id)))
        except Exception as exc:  # noqa: BLE001 - released here; beat() deletes the row
            log.warning("releasing the cluster lock %r failed (%s): the next heartbeat deletes its row", name, exc)

    def _take_lock(self, name: str, now: float, connection: Connection) -> tuple[str, float] | None:
        """Take the lock ``name`` unless another live hub holds it: None when it is this hub's now, else its
        holder and since when."""
        found = connection.execute("SELECT hub, since FROM locks WHERE name = ?", (name,)).fetchone()
        if found is None:
            connection.execute("INSERT INTO locks (name, hub, since) VALUES (?, ?, ?)", (name, self.id, now))
            return None
        if found[0] != self.id and self.live(connection, found[0], now):
            return found[0], found[1]
        connection.execute("UPDATE locks SET hub = ?, since = ? WHERE name = ?", (self.id, now, name))
        return None

    def live(self, connection: Any, hub: str, now: float) -> bool:
        """Whether hub ``hub`` is live at ``now`` as its row says, read in the caller's transaction: a hold of a
        hub that is not (lost, stopped, not registered, or its row unreadable) lapses (a cluster lock, the
        upload of an offsite copy)."""
        found = rows(connection.execute("SELECT * FROM hubs WHERE id = ?", (hub,)))
        member = _member(found[0], now, self.lapse) if found else None
        return member is not None and member.live

    async def leave(self) -> None:
        """Mark this hub stopped (a clean stop): the others take its jobs and runs over at once. A row another
        process took over (its token) is left as it is."""
        await self.db.run(
            lambda c: c.execute("UPDATE hubs SET state = ? WHERE id = ? AND state = ? AND token = ?",
                                (HubState.STOPPED.value, self.id, HubState.LIVE.value, self.token))
        )  # fmt: skip

    async def still_taken(self, hub: str) -> bool:
        """Whether hub ``hub`` is still lost and taken over by this hub (it has not come back meanwhile)."""
        found = await self.db.run(
            lambda c: c.execute(
                "SELECT 1 FROM hubs WHERE id = ? AND state = ? AND taken_by = ?", (hub, HubState.LOST.value, self.id)
            ).fetchone()
        )
        return found is not None

    async def unfinished(self) -> list[Member]:
        """Hubs taken over whose takeover left work behind (a job not ended, a port lease, an open run): the
        taking hub failed, stopped or was lost midway. Those this hub took, and those whose taker is no longer
        live, which this hub takes now (in the same transaction: one hub does); their takeover is to do again."""
        now = self.clock.now()

        def read(connection: Any) -> list[Member]:
            mine = []
            for row in rows(connection.execute(_UNFINISHED, (HubState.LOST.value, self.id))):
                taker = row["taken_by"]
                if taker != self.id and taker is not None and self.live(connection, taker, now):
                    continue
                if taker != self.id:
                    connection.execute(
                        "UPDATE hubs SET taken_by = ?, taken_at = ? WHERE id = ?", (self.id, now, row["id"])
                    )
                if (member := _member(row, now, self.lapse)) is not None:
                    mine.append(member)
            return mine

        return await self.db.run(read)

    async def owner(self, hub: str | None) -> Member | None:
        """The member that owns a job (None: this hub, a job from before hub IDs, or a hub not registered);
        :class:`OtherHub` without a URL when that hub's row reads as no member (see :meth:`members`)."""
        if hub is None or hub == self.id:
            return None
        now = self.clock.now()
        found = await self.db.run(lambda c: rows(c.execute("SELECT * FROM hubs WHERE id = ?", (hub,))))
        if not found:
            return None
        member = _member(found[0], now, self.lapse)
        if member is None:
            raise OtherHub(
                f"the job runs on hub {hub}, whose row in the hubs table is unreadable (this hub's log says why)", None
            )
        return member


#: The hubs taken over that still have work of theirs: a job not ended, a port lease, an open run.
_UNFINISHED = (
    "SELECT * FROM hubs WHERE state = ? AND id != ? AND ("
    "EXISTS (SELECT 1 FROM jobs WHERE jobs.hub = hubs.id AND jobs.state IN ('pending', 'running')) "
    "OR EXISTS (SELECT 1 FROM leases WHERE leases.hub = hubs.id) "
    "OR EXISTS (SELECT 1 FROM runs WHERE runs.owner = hubs.id AND runs.state = 'open')) ORDER BY id"
)


def _skew(value: object) -> float | None:
    """A row's ``clock_skew`` (None when there is none); a value of another type reads as no member."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"clock_skew {value!r} is no number")
    return float(value)


def _member(row: dict[str, Any], now: float, lapse: float) -> Member | None:
    """The member a row reads as, None (and a warning) when it reads as none."""
    try:
        return Member.from_row(row, now, lapse)
    except (ValueError, TypeError) as exc:
        log.warning("hub %.80r: its row in the hubs table reads as no member (left out): %s", row.get("id"), exc)
        return None


def _check_members(me: Identity, others: list[dict[str, Any]]) -> None:
    """A local directory repository serves one hub alone; hubs sharing a database share its RBD store."""
    if not others:
        return
    names = ", ".join(row["id"] for row in others[:5])
    if me.local:
        raise ConfigError(
            f"the database already has hubs ({names}): a hub with a local directory repository runs alone on its "
            f"database; several hubs share one RBD repository (--repo rbd://... --state-dir DIR) and one database"
        )
    foreign = [row for row in others if row["store"] != me.store]
    if foreign:
        raise ConfigError(
            f"hub {foreign[0]['id']} of this database uses the repository {foreign[0]['store']}, this hub "
            f"{me.store}: hubs sharing a database share one repository"
        )
