"""The NBD port pool: leases in the hub's store, and bind-and-hold sockets.

A port is handed out only after the allocator has bound it; the bound socket
goes with the lease to whoever serves on it, so no other process can take
the port between the check and the listen. Ports another process holds are
skipped. Leases carry their holder and expire unless renewed, so a crashed
holder's ports come back; a restarted hub releases its predecessor's leases
(:meth:`PortAllocator.release_stale`). Several hubs on one database each have
their own pool on their own address: leases are keyed by hub and port, and a
hub sees, takes and releases only its own (a lost hub's go with its takeover,
:func:`release_hub`).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import attrs

from sendense_nbd.errors import PortError
from sendense_nbd.hub.db import Connection, Database, rows
from sendense_nbd.hub.jobs import JobKind

DEFAULT_POOL = range(10100, 10201)


def parse_range(text: str) -> range:
    """``10100-10200`` (inclusive) or a single port."""
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise PortError(f"{text!r} is not a port range such as 10100-10200") from None
    if not 0 < low <= high < 65536:
        raise PortError(f"{text!r} is not a port range within 1-65535")
    return range(low, high + 1)


@attrs.frozen
class Lease:
    """A port of hub ``hub``'s pool held by a job's disk until ``expires`` unless renewed; ``purpose`` is the
    job's kind."""

    hub: str
    port: int
    holder: str
    job_id: str
    disk_key: int | None
    purpose: JobKind
    since: float
    expires: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Lease:
        """A lease from its row in the store (which holds the kind's value)."""
        return cls(**{**row, "purpose": JobKind(row["purpose"])})

    def to_json(self) -> dict[str, object]:
        """The lease as the API shows it (and the store holds it)."""
        return {**attrs.asdict(self), "purpose": self.purpose.value}


@attrs.frozen
class PoolStatus:
    """The pool's range and its live leases."""

    pool: range
    used: tuple[Lease, ...]

    @property
    def free(self) -> int:
        """Ports without a live lease (some may be held by other processes)."""
        return len(self.pool) - len(self.used)

    def to_json(self) -> dict[str, object]:
        """``{"pool": {"first", "last", "size"}, "used": [...], "free"}``."""
        return {
            "pool": {"first": self.pool.start, "last": self.pool.stop - 1, "size": len(self.pool)},
            "used": [lease.to_json() for lease in self.used],
            "free": self.free,
        }


@attrs.define
class Allocation:
    """A lease and the socket bound to its port (the caller listens on it, or closes it)."""

    lease: Lease
    socket: socket.socket


class PortAllocator:
    """Leases ports of hub ``hub``'s ``pool`` in the hub's store, each with its socket already bound."""

    def __init__(
        self, db: Database, pool: range = DEFAULT_POOL, *, bind_address: str = "127.0.0.1", ttl: float = 600.0,
        hub: str = "local",
    ) -> None:  # fmt: skip
        if not pool:
            raise PortError("the port pool is empty")
        self.db = db
        self.hub = hub
        self.pool = pool
        self.bind_address = bind_address
        self.ttl = ttl

    def _bind(self, port: int) -> socket.socket | None:
        family = socket.AF_INET6 if ":" in self.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.bind_address, port))
        except OSError:
            sock.close()
            return None
        return sock

    async def allocate(
        self, holder: str, job_id: str, disk_key: int | None, *, purpose: JobKind = JobKind.BACKUP
    ) -> Allocation:
        """Lease the lowest free port that binds; :class:`PortError` when none is left."""

        def take(connection: Connection) -> Allocation:
            now = time.time()
            connection.execute("DELETE FROM leases WHERE hub = ? AND expires < ?", (self.hub, now))
            used = {row[0] for row in connection.execute("SELECT port FROM leases WHERE hub = ?", (self.hub,))}
            busy = 0
            for port in self.pool:
                if port in used:
                    continue
                sock = self._bind(port)
                if sock is None:
                    busy += 1
                    continue
                lease = Lease(self.hub, port, holder, job_id, disk_key, purpose, now, now + self.ttl)
                row = lease.to_json()
                names, marks = ", ".join(row), ", ".join("?" * len(row))
                connection.execute(f"INSERT INTO leases ({names}) VALUES ({marks})", tuple(row.values()))
                return Allocation(lease, sock)
            raise PortError(
                f"no free NBD port in {self.pool.start}-{self.pool.stop - 1}: {len(used)} leased, "
                f"{busy} taken by other processes"
            )

        return await self.db.run(take)

    async def release(self, *, port: int | None = None, job_id: str | None = None) -> list[int]:
        """Release one port of this hub's pool, or every port of a job (whichever hub leased it); the ports
        released."""

        def free(connection: Connection) -> list[int]:
            if port is not None:
                where = (self.hub, port)
                found = [r[0] for r in connection.execute("SELECT port FROM leases WHERE hub = ? AND port = ?", where)]
                connection.execute("DELETE FROM leases WHERE hub = ? AND port = ?", where)
            else:
                found = [r[0] for r in connection.execute("SELECT port FROM leases WHERE job_id = ?", (job_id,))]
                connection.execute("DELETE FROM leases WHERE job_id = ?", (job_id,))
            return sorted(found)

        return await self.db.run(free)

    async def renew(self, holder: str) -> int:
        """Extend every lease of ``holder`` by the TTL; how many."""

        def extend(connection: Connection) -> int:
            cursor = connection.execute(
                "UPDATE leases SET expires = ? WHERE holder = ?", (time.time() + self.ttl, holder)
            )
            return cursor.rowcount

        return await self.db.run(extend)

    async def release_stale(self, holder: str) -> list[Lease]:
        """Release this hub's leases of every holder but ``holder`` (a previous instance of this hub); those leases."""
        where = (self.hub, holder)

        def free(connection: Connection) -> list[Lease]:
            found = connection.execute("SELECT * FROM leases WHERE hub = ? AND holder != ?", where)
            stale = [Lease.from_row(r) for r in rows(found)]
            connection.execute("DELETE FROM leases WHERE hub = ? AND holder != ?", where)
            return stale

        return await self.db.run(free)

    async def status(self) -> PoolStatus:
        """This hub's pool: every live lease (by whom, since when) and the free count."""

        def read(connection: Connection) -> list[Lease]:
            sql = "SELECT * FROM leases WHERE hub = ? AND expires >= ? ORDER BY port"
            return [Lease.from_row(r) for r in rows(connection.execute(sql, (self.hub, time.time())))]

        leases = await self.db.run(read)
        return PoolStatus(self.pool, tuple(leases))


async def release_hub(db: Database, hub: str) -> list[int]:
    """Release every lease of hub ``hub`` (taken over: its exports are gone); the ports."""

    def free(connection: Connection) -> list[int]:
        ports = sorted(r[0] for r in connection.execute("SELECT port FROM leases WHERE hub = ?", (hub,)))
        connection.execute("DELETE FROM leases WHERE hub = ?", (hub,))
        return ports

    return await db.run(free)
