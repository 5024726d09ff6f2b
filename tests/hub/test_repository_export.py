"""A point as portable qcow2 files (``Repository.export_point``, what offsite copies upload): a standalone
full of any point, or an overlay on any older point of its chain named ``<point-id>.qcow2`` with its
backing named ``<base-id>.qcow2``; in one folder they form a chain qemu-img checks and reads exactly as
the point (qemu-img compare). A local full, and an overlay on its own backing point, are the point's own
file; any other is a temporary file, gone when the context ends and swept after a crash."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from sendense_nbd.errors import RepositoryError
from sendense_nbd.hub.repository import Point, Repository
from sendense_nbd.hub.requests import ReportedDisk
from tests.conftest import require, run

pytestmark = pytest.mark.peer

VM = "/DC0/vm/export"
DISK = 2000
SIZE = 4 << 20
CLUSTER = 64 << 10


async def _chain(repository: Repository, count: int) -> list[Point]:
    """A full and overlays, each writing data that straddles clusters and zeroing some of the older data."""
    points = []
    for index in range(count):
        point = await repository.new_point(VM, DISK, f"job{index}", incremental=index > 0, capacity=SIZE)
        commands = [f"write -P {0x30 + index} {index * CLUSTER + 1000} {CLUSTER}"]
        if index:
            commands.append(f"write -z {(index - 1) * CLUSTER + 2000} 300")  # inside the last point's data
        run(require("qemu-io"), "-f", "qcow2", *(a for c in commands for a in ("-c", c)), point.path)
        await repository.complete([(point.id, ReportedDisk(DISK, f"change-{index}", None))])
        points.append(await repository.point(point.id))
    return points


def _exists(path: str, folder: Path) -> bool:
    """Whether ``path`` or anything under ``folder`` is left."""
    return Path(path).exists() or any(folder.iterdir())


def _backing(path: Path) -> str | None:
    info = json.loads(run(require("qemu-img"), "info", "--output=json", str(path)).stdout)
    return info.get("backing-filename")


def _same(left: str | Path, right: str | Path) -> None:
    run(require("qemu-img"), "compare", "-f", "qcow2", "-F", "qcow2", str(left), str(right))


async def test_a_full_of_any_point_and_overlays_on_older_points_read_as_the_point(
    repository: Repository, tmp_path: Path
) -> None:
    points = await _chain(repository, 4)
    folder = tmp_path / "offsite"
    folder.mkdir()
    async with repository.export_point(points[0]) as path:
        assert path == points[0].path  # a full: its own file
        shutil.copy(path, folder / f"{points[0].id}.qcow2")
    async with repository.export_point(points[2], base=points[0]) as path:  # over two layers
        assert Path(path).name == f"{points[2].id}.qcow2" and path != points[2].path
        assert _backing(Path(path)) == f"{points[0].id}.qcow2"
        shutil.copy(path, folder / Path(path).name)
    assert not await asyncio.to_thread(_exists, path, Path(repository.root) / "tmp")
    async with repository.export_point(points[3], base=points[2]) as path:
        assert path == points[3].path  # its own overlay: backing named <base-id>.qcow2
        shutil.copy(path, folder / f"{points[3].id}.qcow2")
    top = folder / f"{points[3].id}.qcow2"
    run(require("qemu-img"), "check", str(top))
    _same(top, points[3].path)
    _same(folder / f"{points[2].id}.qcow2", points[2].path)
    async with repository.export_point(points[3]) as path:  # a standalone full of an overlay
        assert _backing(Path(path)) is None
        run(require("qemu-img"), "check", path)
        _same(path, points[3].path)


async def test_a_base_outside_the_chain_is_refused_and_a_crash_leaves_nothing(
    repository: Repository, tmp_path: Path
) -> None:
    points = await _chain(repository, 2)
    with pytest.raises(RepositoryError, match="is not below point"):
        async with repository.export_point(points[0], base=points[1]):
            pass
    leftover = Path(repository.root) / "tmp" / "tmpcrashed"
    leftover.mkdir(parents=True)
    (leftover / f"{points[1].id}.qcow2").write_bytes(b"partial")
    removed, unexpected = await repository.sweep_orphans()
    assert removed == [str(leftover)] and unexpected == [] and not leftover.exists()


async def test_the_disk_lock_is_free_while_an_export_is_read(repository: Repository) -> None:
    """An offsite upload reads the export for hours: restores, retention, digests and verify of the disk must not
    wait as long (the caller protects the point from retention meanwhile)."""
    points = await _chain(repository, 2)
    for point, base in ((points[0], None), (points[1], None), (points[1], points[0])):
        async with repository.export_point(point, base=base) as path:
            async with asyncio.timeout(5), repository.disk_lock(VM, DISK):
                pass  # taken at once: the export holds it only while it chooses or writes its file
            _same(path, point.path)
