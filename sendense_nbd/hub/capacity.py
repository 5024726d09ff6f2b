"""Room in the repository: how much a backup is expected to write, and what its store has free.

Before a backup job starts, the hub adds up what each disk's new point is
expected to take: a full point its disk's capacity; an incremental the
largest ``bytes_changed`` of the disk's last :data:`HISTORY` points, or
:data:`INCREMENTAL_SHARE` of its capacity when none was reported. With the
reserve (``HubConfig.min_free``) on top, that must fit in the free space
the store reports (``statvfs`` of a local repository's filesystem; the pool's
room in an RBD cluster), less what the backup jobs pending or running are still
expected to write (:func:`reserved`: each job's expected bytes, stored when it
was created, less what its points take so far), or the job is refused
(:class:`InsufficientSpace`) before any port is leased or image made. The hub
checks and creates jobs one at a time (hubs sharing a repository: one at a time
in the cluster), so jobs starting together cannot all count the same free space.
``GET /repository`` and the metrics show the same :func:`usage`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from sendense_nbd.errors import InsufficientSpace
from sendense_nbd.hub.db import Connection, rows
from sendense_nbd.hub.repository import Point, PointStatus, Repository

#: The free space a backup must leave (bytes), unless configured (``--min-free``).
DEFAULT_MIN_FREE = 1 << 30
#: An incremental with no reported history is expected to change this share of its disk.
INCREMENTAL_SHARE = 0.10
#: How many of a disk's latest points the incremental estimate looks at.
HISTORY = 5


@attrs.frozen
class DiskNeed:
    """One disk of a planned backup: a full or incremental point, and the bytes it is expected to take."""

    key: int
    full: bool
    expected: int


def expected_bytes(capacity: int, *, full: bool, recent_changed: Sequence[int | None] = ()) -> int:
    """What a disk's new point is expected to take: its capacity (full), else the largest of the
    ``bytes_changed`` reported by its recent points, else :data:`INCREMENTAL_SHARE` of its capacity."""
    if full:
        return capacity
    known = [changed for changed in recent_changed if changed is not None]
    return max(known) if known else int(capacity * INCREMENTAL_SHARE)


async def disk_need(repo: Repository, vm_path: str, key: int, capacity: int, *, full: bool) -> DiskNeed:
    """:func:`expected_bytes` of one disk, its recent points read from the store."""
    recent = [] if full else [p.bytes_changed for p in (await repo.points(vm_path, key))[-HISTORY:]]
    return DiskNeed(key, full, expected_bytes(capacity, full=full, recent_changed=recent))


@attrs.frozen
class Usage:
    """The repository's store (bytes; ``path``: where it is) and its completed points."""

    path: str
    total: int
    used: int
    free: int
    min_free: int
    points: int
    points_bytes: int

    def to_json(self) -> dict[str, object]:
        """``{"path", "total", "used", "free", "min_free", "points", "points_bytes"}``."""
        return attrs.asdict(self)


async def usage(repo: Repository, *, min_free: int = DEFAULT_MIN_FREE) -> Usage:
    """The repository's space now: the store's totals and what its completed points take."""

    def read(connection: Connection) -> list[Point]:
        found = connection.execute("SELECT * FROM points WHERE status = ?", (PointStatus.COMPLETED.value,))
        return [Point.from_row(row) for row in rows(found)]

    points = await repo.db.run(read)
    space = await repo.space()
    sizes = await repo.allocated(points)
    points_bytes = sum(size or 0 for size in sizes.values())
    return Usage(repo.store.location, space.total, space.used, space.free, min_free, len(points), points_bytes)


async def reserved(repo: Repository, expected: Mapping[str, int]) -> int:
    """What the jobs in ``expected`` (job ID to expected bytes) are still expected to write: each job's
    figure less what its points take in the store so far (never below 0)."""

    def read(connection: Connection) -> dict[str, list[Point]]:
        points: dict[str, list[Point]] = {}
        for job_id in expected:
            found = connection.execute("SELECT * FROM points WHERE job_id = ?", (job_id,))
            points[job_id] = [Point.from_row(row) for row in rows(found)]
        return points

    points = await repo.db.run(read)
    written = {}
    for job_id, of_job in points.items():
        written[job_id] = sum(size or 0 for size in (await repo.allocated(of_job)).values())
    return sum(max(0, size - written[job_id]) for job_id, size in expected.items())


async def check_space(
    repo: Repository, vm_path: str, needs: Sequence[DiskNeed], *, min_free: int, held: int = 0, jobs: int = 0
) -> None:
    """Refuse (:class:`InsufficientSpace`) a backup whose expected size, the reserve and what ``jobs``
    other backups still expect to write (``held`` bytes) exceed the free space."""
    need = sum(disk.expected for disk in needs)
    free = (await repo.space()).free
    if need + min_free + held <= free:
        return
    others = f", {gib(held)} of it held for {jobs} backup(s) pending or running" if held else ""
    raise InsufficientSpace(
        f"need {gib(need)} for {vm_path} ({_what(needs)}), the repository has {gib(free)} free{others} "
        f"(keeping a reserve of {gib(min_free)})"
    )


def _what(needs: Sequence[DiskNeed]) -> str:
    """``full of disks 2000, 2001; incremental of disk 2002``."""
    parts = []
    for full, kind in ((True, "full"), (False, "incremental")):
        keys = [str(disk.key) for disk in needs if disk.full is full]
        if keys:
            parts.append(f"{kind} of disk{'s' if len(keys) > 1 else ''} {', '.join(keys)}")
    return "; ".join(parts)


def gib(size: int) -> str:
    """A byte count for a message: ``1.50 GiB``, or ``16.0 MiB`` below 1 GiB."""
    return f"{size / (1 << 30):.2f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"
