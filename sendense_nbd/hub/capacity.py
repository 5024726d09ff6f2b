"""Room in the repository: how much a backup is expected to write, and what the filesystem has free.

Before a backup job starts, the hub adds up what each disk's new point is
expected to take: a full point its disk's capacity; an incremental the
largest ``bytes_changed`` of the disk's last :data:`HISTORY` points, or
:data:`INCREMENTAL_SHARE` of its capacity when none was reported. With the
reserve (``HubConfig.min_free``) on top, that must fit in the free space
``statvfs`` reports, less what the backup jobs pending or running are still
expected to write (:func:`reserved`: each job's expected bytes, stored when it
was created, less what its points take so far), or the job is refused
(:class:`InsufficientSpace`) before any port is leased or image made. The hub
checks and creates jobs one at a time, so jobs starting together cannot all
count the same free space. ``GET /repository`` and the metrics show the same
:func:`usage`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Mapping, Sequence

import attrs

from sendense_nbd.errors import InsufficientSpace, RepositoryError
from sendense_nbd.hub.repository import PointStatus, Repository

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
    """The repository's filesystem (bytes) and its completed points."""

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


def _statvfs(path: str) -> tuple[int, int, int]:
    """(total, used, free) bytes of the filesystem holding ``path``; free is what an unprivileged writer gets."""
    try:
        stat = os.statvfs(path)
    except OSError as exc:
        raise RepositoryError(f"cannot read the free space of {path}: {exc.strerror or exc}") from exc
    total = stat.f_blocks * stat.f_frsize
    return total, total - stat.f_bfree * stat.f_frsize, stat.f_bavail * stat.f_frsize


def _allocated(paths: list[str]) -> int:
    """The bytes the files take on disk (a file gone meanwhile counts 0)."""
    size = 0
    for path in paths:
        try:
            size += os.stat(path).st_blocks * 512
        except OSError:
            continue
    return size


async def usage(repo: Repository, *, min_free: int = DEFAULT_MIN_FREE) -> Usage:
    """The repository's space now: the filesystem's totals and what its completed points take."""

    def read(connection: sqlite3.Connection) -> list[str]:
        found = connection.execute("SELECT path FROM points WHERE status = ?", (PointStatus.COMPLETED.value,))
        return [row[0] for row in found]

    paths = await repo.db.run(read)
    (total, used, free), points_bytes = await asyncio.gather(
        asyncio.to_thread(_statvfs, repo.root), asyncio.to_thread(_allocated, paths)
    )
    return Usage(repo.root, total, used, free, min_free, len(paths), points_bytes)


async def reserved(repo: Repository, expected: Mapping[str, int]) -> int:
    """What the jobs in ``expected`` (job ID to expected bytes) are still expected to write: each job's
    figure less what its points take on disk so far (never below 0)."""

    def read(connection: sqlite3.Connection) -> dict[str, list[str]]:
        paths: dict[str, list[str]] = {}
        for job_id in expected:
            found = connection.execute("SELECT path FROM points WHERE job_id = ?", (job_id,))
            paths[job_id] = [row[0] for row in found]
        return paths

    paths = await repo.db.run(read)
    written = await asyncio.to_thread(lambda: {job_id: _allocated(files) for job_id, files in paths.items()})
    return sum(max(0, size - written[job_id]) for job_id, size in expected.items())


async def check_space(
    repo: Repository, vm_path: str, needs: Sequence[DiskNeed], *, min_free: int, held: int = 0, jobs: int = 0
) -> None:
    """Refuse (:class:`InsufficientSpace`) a backup whose expected size, the reserve and what ``jobs``
    other backups still expect to write (``held`` bytes) exceed the free space."""
    need = sum(disk.expected for disk in needs)
    _, _, free = await asyncio.to_thread(_statvfs, repo.root)
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
