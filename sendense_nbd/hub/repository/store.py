"""What a repository needs of the store that keeps its points' data: the protocol each store implements.

The common :class:`~sendense_nbd.hub.repository.core.Repository` keeps the
points table, the GFS selection, the locks and the life cycle; a store only
makes, opens, seals, drops and checks the data of one point at a time. Its
methods block (files, librados): the repository calls them in worker
threads, under the disk's lock where the chain must not change meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from sendense_nbd.hub.repository.points import Point
    from sendense_nbd.storage.base import BlockDevice


@attrs.frozen
class Space:
    """A store's room in bytes: ``free`` is what the hub may still write."""

    total: int
    used: int
    free: int


class Store(Protocol):
    """Where the points' data lives: the local qcow2 files (the default) or RBD images and snapshots."""

    #: What the repository is, as ``GET /repository`` and the start-up line show it (no secrets).
    location: str
    #: Whether a point's data reads nothing of the points below it (RBD snapshots): retention then
    #: drops a point without touching the one above, and a restore protects only its own point.
    independent: bool

    def create(self, vm_path: str, disk_key: int, point_id: str, *, base: Point | None, capacity: int) -> str:
        """Make a new point's writable data: a full of ``capacity`` bytes, or an incremental on
        ``base`` (whose view it starts from); its ``path``."""

    def opener(self, point: Point, *, readonly: bool) -> Callable[[], BlockDevice]:
        """What opens the point as a block device (writable while it is pending, else read-only): a picklable
        value (:mod:`~sendense_nbd.hub.openers`), so an export worker process can open it."""

    def source(self, point: Point) -> str:
        """A file name the copy library opens to read the point's whole view (its chain)."""

    def reclaim(self, disks: Collection[tuple[str, int]] | None = None) -> list[str]:
        """At start, before anything else: take back what a killed predecessor still holds (RBD: the images'
        exclusive locks); what was taken back. ``disks`` (VM path, disk key): only theirs (a lost hub's jobs'
        disks, or this hub's own where other hubs are live)."""

    def seal(self, point: Point) -> None:
        """Make a pending point's data a restore point, once its export flushed and closed."""

    def discard(self, point: Point, *, latest: Point | None) -> None:
        """Remove a pending point's data (its job failed); ``latest``: the disk's newest completed
        point, whose view the next job starts from. Safe to repeat."""

    def close(self) -> None:
        """Let go of what the store holds open (its cluster connection); at the hub's end."""

    def blocked(self, point: Point) -> str | None:
        """Why :meth:`drop` cannot remove the point's data now (an RBD snapshot that is protected or has
        clones), or None; retention then keeps the point."""

    def drop(self, base: Point, top: Point) -> None:
        """Retention drops ``base``; ``top``, the point above it, keeps its view and takes ``base``'s
        place in the chain. Safe to repeat after a crash at any step."""

    def share_digests(self, point: Point) -> None:
        """Make the point's digest sidecar (written at :meth:`digest_path`) readable by every hub of the
        repository (RBD: an object in the pool); local files: nothing."""

    def fetch_digests(self, point: Point) -> None:
        """Bring the point's shared digests to :meth:`digest_path` when this hub has no sidecar there (another
        hub recorded them); nothing when none are shared."""

    def digest_path(self, point: Point) -> str:
        """The local file holding the point's chunk digests (:mod:`sendense_nbd.copy.digests`)."""

    def changes(self, above: Sequence[Point], base: Point) -> list[tuple[int, int]]:
        """The ``(offset, length)`` ranges where the view of ``above[0]`` may differ from ``base``'s;
        ``above``: the points over ``base`` in its chain, top first (a superset is allowed)."""

    def own_file(self, point: Point, base: Point | None) -> str | None:
        """The point's own qcow2 file when it is exactly the point over ``base`` (None: a full), with its
        backing named ``<base-id>.qcow2``; None when the store has no such file."""

    def clone_target(self, name: str) -> str:
        """The name of the new image :meth:`clone` would make (:class:`RepositoryError` when the store
        cannot clone, or ``name`` is not allowed)."""

    def clone(self, point: Point, name: str) -> None:
        """A new standalone image ``name`` holding the point's view (a hypervisor boots it)."""

    def check(self, chain: Sequence[Point]) -> str | None:
        """The structure check of a chain (top first): the first finding, or None when it is sound."""

    def sweep(self, known: Callable[[], Sequence[tuple[str, str]]]) -> tuple[list[str], list[str]]:
        """Remove the data no point knows (``known`` reads every point's ``(path, id)`` now) and that a crash
        left; ``(removed, unexpected)``, the latter left alone."""

    def space(self) -> Space:
        """The store's total, used and free bytes now."""

    def allocated(self, points: Sequence[Point]) -> dict[str, int | None]:
        """The bytes each point's own data takes, by ID (None: gone meanwhile)."""
