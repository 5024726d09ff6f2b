"""The repository's space over time: samples of ``GET /repository``'s total, used and free bytes.

The hub records one when it starts, every :data:`INTERVAL` seconds on its
clock, and after each backup's retention (at most one a minute:
:data:`MIN_GAP`), and keeps :data:`KEEP` seconds of them in its store
(table ``space_samples``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping

import attrs

from sendense_nbd.errors import BadRequest
from sendense_nbd.hub.capacity import Usage
from sendense_nbd.hub.clock import Clock
from sendense_nbd.hub.db import Connection, Database

log = logging.getLogger(__name__)

#: Seconds between two periodic samples.
INTERVAL = 600.0
#: A backup adds a sample only when the newest is at least this old (seconds).
MIN_GAP = 60.0
#: Seconds of samples kept (35 days).
KEEP = 35 * 86400.0
#: ``GET /repository/history?hours=``: its default and largest value.
DEFAULT_HOURS, MAX_HOURS = 168, int(KEEP // 3600)
_HOURS = re.compile(r"[0-9]{1,4}")


@attrs.frozen
class SpaceSample:
    """The repository's filesystem at time ``t`` (epoch seconds, the hub's clock): bytes in all, used, free."""

    t: float
    total: int
    used: int
    free: int

    def to_json(self) -> dict[str, float | int]:
        """``{"t", "total", "used", "free"}``."""
        return attrs.asdict(self)


def history_hours(query: Mapping[str, str]) -> int:
    """``hours`` of a ``GET /repository/history`` query (1 to :data:`MAX_HOURS`, default :data:`DEFAULT_HOURS`)."""
    unknown = sorted(set(query) - {"hours"})
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0][:40]!r} (known: hours)")
    hours = query.get("hours", str(DEFAULT_HOURS))
    if not _HOURS.fullmatch(hours) or not 1 <= int(hours) <= MAX_HOURS:
        raise BadRequest(f"hours must be an integer from 1 to {MAX_HOURS}")
    return int(hours)


class SpaceHistory:
    """Record and read the repository's space samples; :meth:`run` records them periodically."""

    def __init__(self, db: Database, clock: Clock, usage: Callable[[], Awaitable[Usage]]) -> None:
        self.db = db
        self.clock = clock
        #: Reads the repository's space now (the numbers ``GET /repository`` shows).
        self._usage = usage

    async def record(self, *, min_gap: float = 0.0) -> SpaceSample | None:
        """Sample the space now, unless the newest sample is less than ``min_gap`` seconds old (then None);
        samples older than :data:`KEEP` go."""
        usage = await self._usage()
        sample = SpaceSample(self.clock.now(), usage.total, usage.used, usage.free)

        def write(connection: Connection) -> bool:
            if min_gap > 0:
                newest = connection.execute("SELECT MAX(t) FROM space_samples").fetchone()[0]
                if newest is not None and sample.t - newest < min_gap:
                    return False
            connection.execute(
                "INSERT INTO space_samples (t, total, used, free) VALUES (?, ?, ?, ?)", attrs.astuple(sample)
            )
            connection.execute("DELETE FROM space_samples WHERE t < ?", (sample.t - KEEP,))
            return True

        return sample if await self.db.run(write) else None

    async def after_backup(self) -> None:
        """A sample after a backup's retention, at most one a minute; a failure is logged, never raised."""
        try:
            await self.record(min_gap=MIN_GAP)
        except Exception as exc:  # noqa: BLE001 - the backup is done; the next sample comes anyway
            log.error("sampling the repository's space failed: %s", exc)

    async def run(self) -> None:
        """Record a sample now and every :data:`INTERVAL` seconds on the clock, until cancelled; a failed
        sample is logged and the next one comes."""
        while True:
            try:
                await self.record()
            except Exception as exc:  # noqa: BLE001 - keep going
                log.error("sampling the repository's space failed: %s", exc)
            await self.clock.sleep(INTERVAL)

    async def since(self, since: float) -> list[SpaceSample]:
        """The samples taken at ``since`` or later, oldest first."""

        def read(connection: Connection) -> list[SpaceSample]:
            found = connection.execute(
                "SELECT t, total, used, free FROM space_samples WHERE t >= ? ORDER BY t, seq", (since,)
            )
            return [SpaceSample(float(row[0]), int(row[1]), int(row[2]), int(row[3])) for row in found]

        return await self.db.run(read)
