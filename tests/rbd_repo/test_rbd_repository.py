"""The RBD store against a real Ceph cluster: one image per disk, a snapshot per point, each point's snapshot
read by qemu's rbd driver byte for byte equal to what was written (qemu-img compare against a raw file written
with the same qemu-io commands). A discarded or interrupted job leaves nothing a later point could include (the
head is rolled back; a snapshot taken by a crashed completion is removed); retention removes snapshots only;
digests and verify read snapshots; a shared sidecar is kept in bounded parts and fetched in bounded pieces; a
point exports as portable qcow2 files, converts to a file and clones to a new, flattened image; space comes from
the pool and its quota; orphans are swept."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import sendense_nbd.hub.repository.rbd as rbd_store
from sendense_nbd.backup.records import SyncType
from sendense_nbd.errors import Conflict, RepositoryError
from sendense_nbd.hub.clock import SystemClock
from sendense_nbd.hub.repository import (
    Point,
    PointStatus,
    RbdStore,
    Repository,
    VerifyState,
    open_store,
    shared_digests,
)
from sendense_nbd.hub.requests import ReportedDisk
from sendense_nbd.hub.verify import record_digests, verify_point
from sendense_nbd.policy.model import Retention
from sendense_nbd.storage.modes import ImageFormat
from tests.conftest import require, run
from tests.rbd_repo.conftest import ceph, head, rbd

pytestmark = pytest.mark.peer

VM = "/DC0/vm/rbd01"
DISK = 2000
MIB = 1 << 20
SIZE = 16 * MIB


class Disk:
    """A disk's head in the repository and a local raw file that the same qemu-io commands write."""

    def __init__(self, repository: Repository, folder: Path) -> None:
        self.repository = repository
        self.folder = folder
        self.raw = folder / "disk.raw"
        run(require("qemu-img"), "create", "-f", "raw", str(self.raw), str(SIZE))
        self.expected: dict[str, Path] = {}

    def write(self, *commands: str, expected: bool = True) -> None:
        """Run qemu-io ``commands`` on the head (and, unless ``expected`` is False, on the raw file)."""
        args = [a for command in commands for a in ("-c", command)]
        run(require("qemu-io"), "-f", "raw", *args, head(self.repository, VM, DISK))
        if expected:
            run(require("qemu-io"), "-f", "raw", *args, str(self.raw))

    async def backup(self, *commands: str, incremental: bool) -> Point:
        """A point: created, written, completed; its expected content kept."""
        point = await self.repository.new_point(VM, DISK, "job", incremental=incremental, capacity=SIZE)
        self.write(*commands)
        await self.repository.complete([(point.id, ReportedDisk(DISK, f"change-{point.id}", None))])
        self.expected[point.id] = self.folder / f"{point.id}.raw"
        shutil.copyfile(self.raw, self.expected[point.id])
        return await self.repository.point(point.id)

    async def chain(self, pattern: int, incrementals: int, size: int) -> list[Point]:
        """A full point of 1 MiB of ``pattern``, then ``incrementals`` incremental ones: the n-th writes ``size``
        bytes of ``pattern + n`` at n MiB."""
        points = [await self.backup(f"write -P {pattern:#x} 0 {MIB}", incremental=False)]
        for index in range(1, incrementals + 1):
            points.append(await self.backup(f"write -P {pattern + index} {index * MIB} {size}", incremental=True))
        return points

    def check(self, point: Point) -> None:
        """The point's snapshot, read through qemu's rbd driver, holds exactly what was written."""
        snapshot = self.repository.source(point)
        run(require("qemu-img"), "compare", "-f", "raw", "-F", "raw", snapshot, str(self.expected[point.id]))


def snapshots(cluster: Any, repository: Repository) -> list[str]:
    store = repository.store
    assert isinstance(store, RbdStore)
    return [s["name"] for s in rbd(cluster, "snap", "ls", f"{cluster.pool}/{store.image_name(VM, DISK)}")]


async def test_fulls_incrementals_failures_and_crashes_leave_only_whole_points(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    full = await disk.backup(f"write -P 0x11 0 {3 * MIB}", f"write -P 0x12 {9 * MIB} 5000", incremental=False)
    assert full.kind is SyncType.FULL and full.path.endswith(f"@{full.id}") and full.path.startswith("rbd:")
    first = await disk.backup(f"write -P 0x21 {MIB + 100} 9000", f"write -z {9 * MIB} 4096", incremental=True)
    assert first.kind is SyncType.INCREMENTAL and first.backing == full.id

    # A job that fails after writing (a node killed mid-copy): its point is discarded, the head rolled back.
    failed = await repository.new_point(VM, DISK, "failed", incremental=True, capacity=None)
    disk.write(f"write -P 0x66 0 {SIZE}", expected=False)
    await repository.discard(failed.id)
    assert snapshots(ceph_cluster, repository) == [full.id, first.id]
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "raw", head(repository, VM, DISK), str(disk.raw))

    # A hub killed after snapshotting a point and before recording it: the restarted hub removes the snapshot.
    crashed = await repository.new_point(VM, DISK, "crashed", incremental=True, capacity=None)
    disk.write(f"write -P 0x77 {4 * MIB} {MIB}", expected=False)
    await asyncio.to_thread(repository.store.seal, crashed)
    restarted = Repository(repository.root, repository.db, store=open_store(repository.root, None))
    assert await restarted.recover() == ([crashed.id], [])
    assert snapshots(ceph_cluster, repository) == [full.id, first.id]

    second = await disk.backup(f"write -P 0x31 {2 * MIB} {MIB}", "write -z 0 512", incremental=True)
    for point in (full, first, second):
        disk.check(point)
    assert [p.id for p in await repository.points(VM, DISK)] == [full.id, first.id, second.id]
    assert await repository.check(second) is None


async def test_retention_removes_snapshots_and_merges_nothing(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    points = await disk.chain(0x40, 3, 8192)
    protected = {points[1].id}

    async def in_use() -> set[str]:
        return protected

    dropped = await repository.apply_retention(VM, DISK, [(Retention(keep_last=1), "UTC")], protected=in_use)
    assert dropped == [points[0].id, points[2].id]  # the protected point alone stays: its snapshot is a whole view
    assert snapshots(ceph_cluster, repository) == [points[1].id, points[3].id]
    kept = await repository.points(VM, DISK)
    assert [(p.id, p.kind, p.backing) for p in kept] == [
        (points[1].id, SyncType.FULL, None),
        (points[3].id, SyncType.INCREMENTAL, points[1].id),
    ]
    for point in kept:
        disk.check(point)


async def test_digests_verify_export_convert_and_clone_read_snapshots(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    full = await disk.backup(f"write -P 0x51 0 {6 * MIB}", incremental=False)
    top = await disk.backup(f"write -P 0x52 {5 * MIB - 700} 1400", f"write -z {MIB} 300", incremental=True)
    readers = asyncio.Semaphore(1)
    for point in (full, top):
        await record_digests(repository, point.id, readers=readers)
        verdict = await verify_point(repository, await repository.point(point.id), SystemClock(), readers=readers)
        assert verdict is not None and verdict.state == VerifyState.VERIFIED.value, verdict
    assert await asyncio.to_thread(Path(repository.digest_path(top)).is_file)

    folder = tmp_path / "offsite"
    folder.mkdir()
    async with repository.export_point(full) as path:
        shutil.copy(path, folder / f"{full.id}.qcow2")
    async with repository.export_point(top, base=full) as path:
        info = json.loads(run(require("qemu-img"), "info", "--output=json", path).stdout)
        assert info["backing-filename"] == f"{full.id}.qcow2"
        shutil.copy(path, folder / f"{top.id}.qcow2")
    run(require("qemu-img"), "check", str(folder / f"{top.id}.qcow2"))
    run(require("qemu-img"), "compare", "-F", "raw", str(folder / f"{top.id}.qcow2"), str(disk.expected[top.id]))

    await repository.convert(top, str(tmp_path / "restored.qcow2"), ImageFormat.QCOW2)
    run(require("qemu-img"), "compare", "-F", "raw", str(tmp_path / "restored.qcow2"), str(disk.expected[top.id]))

    store = repository.store
    assert isinstance(store, RbdStore)
    name = f"{store.where.prefix}-restored"
    assert store.clone_target(name) == f"rbd:{ceph_cluster.pool}/{name}"
    await repository.clone(top, name)
    try:
        clone = ceph_cluster.rbd_filename(name)
        run(require("qemu-img"), "compare", "-f", "raw", "-F", "raw", clone, str(disk.expected[top.id]))
        assert "parent" not in rbd(ceph_cluster, "info", f"{ceph_cluster.pool}/{name}")  # flattened
        listed = rbd(ceph_cluster, "snap", "ls", f"{ceph_cluster.pool}/{store.image_name(VM, DISK)}")
        assert not any(s.get("protected") == "true" for s in listed), listed
        with pytest.raises(Conflict, match="exists"):
            await repository.clone(top, name)
        with pytest.raises(RepositoryError, match="the repository's own"):
            store.clone_target(f"{store.where.prefix}.x")
    finally:
        run(require("rbd"), *ceph_cluster.client_args(), "rm", f"{ceph_cluster.pool}/{name}")

    ceph(ceph_cluster, "--version")  # the peer is here
    image = f"{ceph_cluster.pool}/{store.image_name(VM, DISK)}"
    run(require("rbd"), *ceph_cluster.client_args(), "snap", "rm", f"{image}@{full.id}")
    verdict = await verify_point(repository, await repository.point(top.id), SystemClock(), readers=readers)
    assert verdict is not None and verdict.state == VerifyState.VERIFIED.value  # a snapshot needs no other
    verdict = await verify_point(repository, await repository.point(full.id), SystemClock(), readers=readers)
    assert verdict is not None and verdict.state == VerifyState.DAMAGED.value and "missing" in str(verdict.error)


class Reads:
    """The pool's Ioctx, recording the length each read asks for (python-rados allocates it); ``restamp``
    shares the sidecar again (as another hub would) after the reader's first read."""

    def __init__(self, ioctx: Any, lengths: list[int], restamp: Callable[[Any], None] | None = None) -> None:
        self.ioctx = ioctx
        self.lengths = lengths
        self.restamp = restamp

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ioctx, name)

    def read(self, name: str, length: int = 8192, offset: int = 0) -> bytes:
        self.lengths.append(length)
        data = bytes(self.ioctx.read(name, length, offset))
        if self.restamp is not None:
            self.restamp(self.ioctx)
            self.restamp = None
        return data


def watch_reads(
    monkeypatch: pytest.MonkeyPatch, store: RbdStore, restamp: Callable[[Any], None] | None = None
) -> list[int]:
    """The lengths the store's reads of RADOS objects ask for, from now on."""
    opened = store._ioctx
    lengths: list[int] = []

    @contextlib.contextmanager
    def watched(what: str) -> Iterator[Reads]:
        with opened(what) as ioctx:
            yield Reads(ioctx, lengths, restamp)

    monkeypatch.setattr(store, "_ioctx", watched)
    return lengths


def sidecar_objects(store: RbdStore, point: Point) -> list[str]:
    name = f"{store.where.prefix}.{rbd_store.DIGESTS}.{point.id}"
    with store._ioctx("list") as ioctx:
        return sorted(o.key for o in ioctx.list_objects() if o.key == name or o.key.startswith(f"{name}."))


def check_shared_digests(store: RbdStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sidecar shared in parts, then fetched byte for byte in bounded pieces; a share that is not complete
    fetches nothing; an oversized size refused before any read; a share rewritten while read refused; a
    shorter share and the removal of a share leave no part behind."""
    monkeypatch.setattr(shared_digests, "PART", MIB)
    monkeypatch.setattr(shared_digests, "PIECE", 256 * 1024)
    point = Point(
        "20260101T000000Z-0000d1d1", VM, DISK, "job", SyncType.FULL, "", None, SIZE, None, None,
        PointStatus.COMPLETED, 0.0, 0.0,
    )  # fmt: skip
    sidecar = Path(store.digest_path(point))
    sidecar.parent.mkdir(parents=True)
    data = os.urandom(3 * MIB + 17)
    sidecar.write_bytes(data)
    store.share_digests(point)
    sidecar.unlink()
    name = f"{store.where.prefix}.{rbd_store.DIGESTS}.{point.id}"
    assert sidecar_objects(store, point) == [name, f"{name}.1", f"{name}.2", f"{name}.3"]

    lengths = watch_reads(monkeypatch, store)
    store.fetch_digests(point)
    assert sidecar.read_bytes() == data
    assert max(lengths) == 256 * 1024 and sum(lengths) == len(data)  # bounded pieces, each byte once

    sidecar.unlink()
    with store._ioctx("stamp") as ioctx:
        stamp = ioctx.get_xattr(name, shared_digests.STAMP)
        ioctx.rm_xattr(name, shared_digests.STAMP)  # as while a hub shares it
        store.fetch_digests(point)
        assert not sidecar.exists()
        ioctx.set_xattr(name, shared_digests.STAMP, f"{shared_digests.MAX_SIZE + 1} x".encode())
        lengths.clear()
        with pytest.raises(RepositoryError, match="it is not a sidecar a hub shared"):
            store.fetch_digests(point)
        assert lengths == [] and not sidecar.exists()  # refused before any read
        ioctx.set_xattr(name, shared_digests.STAMP, stamp)

    def restamp(ioctx: Any) -> None:
        ioctx.set_xattr(name, shared_digests.STAMP, stamp + b"-again")

    watch_reads(monkeypatch, store, restamp)
    with pytest.raises(RepositoryError, match="shared again while read"):
        store.fetch_digests(point)
    assert not sidecar.exists() and not list(sidecar.parent.iterdir())  # no temporary file left

    sidecar.write_bytes(data[: MIB + 1])  # shared again, shorter: the extra parts go
    store.share_digests(point)
    assert sidecar_objects(store, point) == [name, f"{name}.1"]
    with store._ioctx("remove") as ioctx:
        shared_digests.remove(ioctx, name)
    assert sidecar_objects(store, point) == []

    other = attrs.evolve(point, id="20260101T000000Z-0000d2d2")  # never shared: nothing fetched, no error
    store.fetch_digests(other)
    assert not Path(store.digest_path(other)).exists()


async def test_shared_digests_are_fetched_byte_identical_in_bounded_pieces_and_checked(
    repository: Repository, ceph_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = repository.store
    assert isinstance(store, RbdStore)
    await asyncio.to_thread(check_shared_digests, store, monkeypatch)


async def test_a_sweep_keeps_what_another_hub_recorded_since_it_began(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    """The sweep reads the points again before it removes anything from an image: a point (and a new image)
    another hub recorded after the sweep's first read are kept; what no point knows at the second look goes."""
    disk = Disk(repository, tmp_path)
    point = await disk.backup(f"write -P 0x61 0 {MIB}", incremental=False)
    store = repository.store
    assert isinstance(store, RbdStore)
    image = f"{ceph_cluster.pool}/{store.image_name(VM, DISK)}"
    fresh = f"{ceph_cluster.pool}/{store.where.prefix}.new-00000000.2000"  # another hub's first full, writing
    tool = [require("rbd"), *ceph_cluster.client_args()]
    run(*tool, "create", "--size", "4M", fresh)
    run(*tool, "image-meta", "set", fresh, "sendense.repository", str(store.identity))
    run(*tool, "snap", "create", f"{image}@20260101T000000Z-0000beef")  # another hub's point, just completed
    recorded = [(f"rbd:{image}@{point.id}", point.id)]
    later = [*recorded, (f"rbd:{image}@20260101T000000Z-0000beef", "20260101T000000Z-0000beef"),
             (f"rbd:{fresh}@20260101T000000Z-0000f00d", "20260101T000000Z-0000f00d")]  # fmt: skip
    reads: list[int] = []

    def known() -> list[tuple[str, str]]:
        reads.append(len(reads))
        return recorded if len(reads) == 1 else later

    removed, unexpected = await asyncio.to_thread(store.sweep, known)
    assert (removed, unexpected) == ([], []) and len(reads) >= 2
    assert snapshots(ceph_cluster, repository) == [point.id, "20260101T000000Z-0000beef"]
    assert fresh.rpartition("/")[2] in run(*tool, "ls", ceph_cluster.pool).stdout.split()
    removed, _ = await asyncio.to_thread(store.sweep, lambda: recorded)  # nobody recorded them: they go
    assert sorted(removed) == sorted([f"rbd:{image}@20260101T000000Z-0000beef", f"rbd:{fresh}"])


async def test_space_is_the_pools_and_its_quota(repository: Repository, ceph_cluster: Any) -> None:
    space = await repository.space()
    assert 0 < space.free <= space.total and space.used >= 0
    limit = space.used + 64 * MIB  # the pool holds what the session's other tests wrote
    ceph(ceph_cluster, "osd", "pool", "set-quota", ceph_cluster.pool, "max_bytes", str(limit))
    try:
        quoted = await repository.space()
        assert quoted.total <= limit and quoted.free == limit - quoted.used, quoted
    finally:
        ceph(ceph_cluster, "osd", "pool", "set-quota", ceph_cluster.pool, "max_bytes", "0")


async def test_sweep_removes_our_orphans_and_reports_foreign_snapshots(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    point = await disk.backup(f"write -P 0x61 0 {MIB}", incremental=False)
    store = repository.store
    assert isinstance(store, RbdStore)
    image = f"{ceph_cluster.pool}/{store.image_name(VM, DISK)}"
    orphan = f"{ceph_cluster.pool}/{store.where.prefix}.gone-00000000.2000"
    tool = [require("rbd"), *ceph_cluster.client_args()]
    run(*tool, "create", "--size", "4M", orphan)
    run(*tool, "image-meta", "set", orphan, "sendense.repository", str(store.identity))  # ours (an untagged one is not)
    run(*tool, "snap", "create", f"{image}@20260101T000000Z-0badc0de")
    run(*tool, "snap", "create", f"{image}@operator-kept")
    stale = Path(repository.root) / "digests" / store.image_name(VM, DISK) / "20260101T000000Z-0badc0de.digests"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"")
    removed, unexpected = await repository.sweep_orphans()
    assert sorted(removed) == sorted([f"rbd:{image}@20260101T000000Z-0badc0de", f"rbd:{orphan}", str(stale)]), removed
    assert unexpected == [f"rbd:{image}@operator-kept"]
    assert snapshots(ceph_cluster, repository) == [point.id, "operator-kept"]
    run(*tool, "snap", "rm", f"{image}@operator-kept")
