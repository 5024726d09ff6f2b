"""The local store (the default): per VM and disk, a full qcow2 and incremental overlays on it.

Layout::

    ROOT/vms/<vm-slug>/<disk-key>/<point-id>.qcow2     backing files named relative to their folder
    ROOT/vms/<vm-slug>/<disk-key>/<point-id>.digests   the point's chunk digests

A point's file is ``<point-id>.qcow2`` and an overlay names its backing point's file, so
retention drops a point by merging: the dropped point's successor overlay is committed into it,
its image takes the successor's file name, and the result is checked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from sendense_nbd.errors import ImageError, RepositoryError
from sendense_nbd.hub.openers import ImageOpener
from sendense_nbd.hub.repository.points import Point, vm_slug
from sendense_nbd.hub.repository.store import Space
from sendense_nbd.storage.files import is_temporary, remove_quietly, sync_directory
from sendense_nbd.storage.modes import ImageFormat

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class LocalStore:
    """Points as qcow2 files under ``root`` (see the module's layout)."""

    independent = False

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = self.root

    def disk_dir(self, vm_path: str, disk_key: int) -> str:
        """The folder of one disk's images."""
        return os.path.join(self.root, "vms", vm_slug(vm_path), str(disk_key))

    def create(self, vm_path: str, disk_key: int, point_id: str, *, base: Point | None, capacity: int) -> str:
        """A new qcow2 file: a full of ``capacity`` bytes, or an overlay on ``base``'s file."""
        from sendense_nbd.storage import create_image

        folder = self.disk_dir(vm_path, disk_key)
        path = os.path.join(folder, f"{point_id}.qcow2")
        backing = os.path.basename(base.path) if base else None
        try:
            os.makedirs(folder, exist_ok=True)
            create_image(
                path, None if base else capacity, ImageFormat.QCOW2, backing_file=backing, backing_format="qcow2"
            )
        except (OSError, ImageError) as exc:
            raise RepositoryError(f"cannot create {path}: {exc}") from exc
        return path

    def opener(self, point: Point, *, readonly: bool) -> ImageOpener:
        """What opens the point's qcow2 file (and its backing chain)."""
        return ImageOpener(point.path, ImageFormat.QCOW2, readonly)

    def source(self, point: Point) -> str:
        """The point's qcow2 file: the copy library reads its chain through it."""
        return point.path

    def reclaim(self, disks: Collection[tuple[str, int]] | None = None) -> list[str]:
        """Nothing: files hold no locks after their process."""
        return []

    def seal(self, point: Point) -> None:
        """Nothing: the export's flush made the file whole."""

    def discard(self, point: Point, *, latest: Point | None) -> None:
        """Delete the point's file (``latest`` is untouched: an overlay never writes below itself)."""
        remove_quietly(point.path)

    def close(self) -> None:
        """Nothing to let go: files are opened per call."""

    def blocked(self, point: Point) -> str | None:
        """None: a qcow2 file can always be merged (what holds it, retention's ``protected`` says)."""
        return None

    def drop(self, base: Point, top: Point) -> None:
        """``top`` is committed into ``base``'s image, which is renamed over ``top``'s file (so the
        overlays above keep their backing name) and checked. Safe to repeat after a crash at any step
        (the commit leaves ``top`` as it was)."""
        from sendense_nbd.storage.qcow2.check import check_image
        from sendense_nbd.storage.qcow2.commit import commit

        if os.path.exists(base.path):
            commit(top.path)
            os.replace(base.path, top.path)  # base's image now holds the top's point in time
            sync_directory(os.path.dirname(top.path))
        result = check_image(top.path)
        if result.corruptions or result.check_errors:
            raise RepositoryError(f"{top.path}: qcow2 check failed after merging: {result.to_json()}")

    def share_digests(self, point: Point) -> None:
        """Nothing: the sidecar is next to its image, where every reader of the repository looks."""

    def fetch_digests(self, point: Point) -> None:
        """Nothing: see :meth:`share_digests`."""

    def digest_path(self, point: Point) -> str:
        """``<point-id>.digests`` next to its image."""
        return os.path.join(os.path.dirname(point.path), f"{point.id}.digests")

    def changes(self, above: Sequence[Point], base: Point) -> list[tuple[int, int]]:
        """What the files of ``above`` (the points over ``base``) define, clusters of data or zeroes."""
        out: list[tuple[int, int]] = []
        for point in above:
            out += layer_extents(point.path, point.size)
        return out

    def own_file(self, point: Point, base: Point | None) -> str | None:
        """The point's file when ``base`` is its backing point (or None, for a full): an overlay's
        backing is always named ``<base-id>.qcow2``, which merges keep so."""
        return point.path if (base.id if base else None) == point.backing else None

    def clone_target(self, name: str) -> str:
        """Refused: a clone is a new RBD image from a snapshot (convert the point to a file instead)."""
        raise RepositoryError("a clone makes an RBD image from a snapshot: it needs an RBD repository (rbd://)")

    def clone(self, point: Point, name: str) -> None:
        """Refused, as :meth:`clone_target`."""
        self.clone_target(name)

    def check(self, chain: Sequence[Point]) -> str | None:
        """The qcow2 check of every file of a chain: the first finding, or None when all are clean."""
        from sendense_nbd.errors import SendenseError
        from sendense_nbd.storage.qcow2.check import check_image

        for point in chain:
            try:
                result = check_image(point.path)
            except (SendenseError, OSError) as exc:
                return f"qcow2 check of point {point.id} failed: {exc}"
            if result.corruptions or result.check_errors:
                return (
                    f"qcow2 check of point {point.id}: {result.corruptions} corruptions, "
                    f"{result.check_errors} check errors"
                )
        return None

    def sweep(self, known: Callable[[], Sequence[tuple[str, str]]]) -> tuple[list[str], list[str]]:
        """Remove the images under ``vms/`` that no point knows of (a crash between creating an
        image and recording it, or a temporary file of a create), and the digest sidecars of points
        that are gone; ``(removed, unexpected)`` paths. (A point's sidecar written but not yet
        recorded stays: the restarted hub computes it again and replaces it.)

        Only our own names are removed (``*.qcow2``, ``*.digests`` and temporary files at
        ``vms/<vm>/<disk-key>/``); anything else is reported and left alone.
        Points are matched by their last three path components, so a moved
        repository keeps its images.
        """
        tails = set()
        for path, point_id in known():
            tails |= {_tail(path), _tail(os.path.join(os.path.dirname(path), f"{point_id}.digests"))}
        return _sweep(os.path.join(self.root, "vms"), tails)

    def space(self) -> Space:
        """The filesystem holding the repository; free is what an unprivileged writer gets."""
        try:
            stat = os.statvfs(self.root)
        except OSError as exc:
            raise RepositoryError(f"cannot read the free space of {self.root}: {exc.strerror or exc}") from exc
        total = stat.f_blocks * stat.f_frsize
        return Space(total, total - stat.f_bfree * stat.f_frsize, stat.f_bavail * stat.f_frsize)

    def allocated(self, points: Sequence[Point]) -> dict[str, int | None]:
        """The bytes each point's file takes on disk (None: gone meanwhile)."""
        out: dict[str, int | None] = {}
        for point in points:
            try:
                out[point.id] = os.stat(point.path).st_blocks * 512
            except OSError:
                out[point.id] = None
        return out


def layer_extents(path: str, size: int) -> list[tuple[int, int]]:
    """The ``(offset, length)`` ranges an image's own layer defines (its overlay's clusters, data or zero)."""
    from sendense_nbd.storage import open_image

    device = open_image(path, None, readonly=True)
    try:
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            for place in device.layer_map(offset=pos, length=size - pos):
                end = min(place.end, size)
                if place.present and end > place.offset:
                    out.append((place.offset, end - place.offset))
                pos = max(pos, end)
        return out
    finally:
        device.close()


def _tail(path: str) -> tuple[str, ...]:
    return tuple(os.path.normpath(path).split(os.sep)[-3:])


def _sweep(vms: str, known: set[tuple[str, ...]]) -> tuple[list[str], list[str]]:
    removed: list[str] = []
    unexpected: list[str] = []
    for folder, dirs, files in os.walk(vms):  # never follows symlinks to directories
        depth = len(os.path.relpath(folder, vms).split(os.sep)) if folder != vms else 0
        entries = files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in entries:
            path = os.path.join(folder, name)
            ours = depth == 2 and (name.endswith((".qcow2", ".digests")) or is_temporary(name))
            if depth == 2 and _tail(path) in known:
                continue
            if ours and not os.path.islink(path):
                remove_quietly(path)
                removed.append(path)
            else:
                unexpected.append(path)
    for path in removed:
        log.warning("removed %s: no restore point knows it (left by a crash)", path)
    for path in unexpected:
        log.warning("unexpected file in the repository, left alone: %s", path)
    return removed, unexpected
