"""Regressions of the RBD repository's review (issue 17 part 2) against the real cluster: a protected snapshot
keeps its point (retention and a restarted hub go on), a clone unprotects its snapshot while another snapshot
has a clone, a head left at the wrong size with its clean mark is rolled back, a full over an existing image
starts empty, a clone on a full pool fails as out of space, a sweep reports an image it cannot remove, a disk
resized between points gets a full of its new size (both stores), prefixes and URLs read back as written."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.backup.records import FullReason
from sendense_nbd.errors import RepositoryClaimed, RepositoryError
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.repository import PointStatus, RbdStore, Repository, open_store
from sendense_nbd.hub.repository import rbd as rbd_store
from sendense_nbd.hub.repository.rbd import parse_location
from sendense_nbd.hub.service import _out_of_space
from sendense_nbd.policy.model import Retention
from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess
from tests.rbd_repo.conftest import ceph, rbd, wait_pool_full
from tests.rbd_repo.test_rbd_repository import DISK, MIB, SIZE, VM, Disk, snapshots

pytestmark = pytest.mark.peer


def _store(repository: Repository) -> RbdStore:
    store = repository.store
    assert isinstance(store, RbdStore)
    return store


def _image(cluster: Any, repository: Repository) -> str:
    return f"{cluster.pool}/{_store(repository).image_name(VM, DISK)}"


async def _status(repository: Repository, point_id: str) -> PointStatus:
    return (await repository.point(point_id)).status


async def test_a_protected_snapshot_keeps_its_point_and_the_hub_starts(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    points = await disk.chain(0x70, 2, 4096)
    tool = [require("rbd"), *ceph_cluster.client_args()]
    image = _image(ceph_cluster, repository)
    clone = f"{ceph_cluster.pool}/{_store(repository).where.prefix}-outside"
    run(*tool, "snap", "protect", f"{image}@{points[0].id}")  # an operator's clone of the oldest point
    run(*tool, "clone", f"{image}@{points[0].id}", clone)
    try:
        dropped = await repository.apply_retention(VM, DISK, [(Retention(keep_last=1), "UTC")])
        assert dropped == [points[1].id]  # the cloned point stays, completed, listed
        assert await _status(repository, points[0].id) is PointStatus.COMPLETED
        assert snapshots(ceph_cluster, repository) == [points[0].id, points[2].id]

        # A point marked merging whose snapshot cannot go (the old hub's way): the restarted hub starts and
        # completes it again.
        await repository.db.run(
            lambda c: c.execute("UPDATE points SET status = 'merging' WHERE id = ?", (points[0].id,))
        )
        restarted = Repository(repository.root, repository.db, store=open_store(repository.root, None))
        assert await restarted.recover() == ([], [])
        assert await _status(repository, points[0].id) is PointStatus.COMPLETED
    finally:
        run(*tool, "rm", clone)
        run(*tool, "snap", "unprotect", f"{image}@{points[0].id}")
    assert await repository.apply_retention(VM, DISK, [(Retention(keep_last=1), "UTC")]) == [points[0].id]


async def test_a_clone_unprotects_its_snapshot_while_another_has_a_clone(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    full = await disk.backup(f"write -P 0x31 0 {MIB}", incremental=False)
    top = await disk.backup(f"write -P 0x32 {MIB} {MIB}", incremental=True)
    tool = [require("rbd"), *ceph_cluster.client_args()]
    image = _image(ceph_cluster, repository)
    prefix = _store(repository).where.prefix
    run(*tool, "snap", "protect", f"{image}@{full.id}")
    run(*tool, "clone", f"{image}@{full.id}", f"{ceph_cluster.pool}/{prefix}-other")
    try:
        await repository.clone(top, f"{prefix}-mine")
        listed = {s["name"]: s["protected"] for s in rbd(ceph_cluster, "snap", "ls", image)}
        assert listed == {full.id: "true", top.id: "false"}, listed
    finally:
        for name in ("other", "mine"):
            run(*tool, "rm", f"{ceph_cluster.pool}/{prefix}-{name}")
        run(*tool, "snap", "unprotect", f"{image}@{full.id}")


async def test_a_head_left_at_another_size_is_rolled_back(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    full = await disk.backup(f"write -P 0x41 0 {MIB}", incremental=False)
    # What a hub killed mid-create left before the fix: the head resized, the clean mark still naming full.
    run(
        require("rbd"), *ceph_cluster.client_args(), "resize", "--size", f"{2 * SIZE}", _image(ceph_cluster, repository)
    )
    point = await repository.new_point(VM, DISK, "job", incremental=True, capacity=None)
    assert point.backing == full.id and point.size == SIZE
    assert rbd(ceph_cluster, "info", _image(ceph_cluster, repository))["size"] == SIZE


async def test_a_full_over_an_existing_image_starts_empty(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    full = await disk.backup(f"write -P 0x51 0 {8 * MIB}", incremental=False)
    pending = await repository.new_point(VM, DISK, "job", incremental=False, capacity=SIZE)
    store = _store(repository)
    assert await asyncio.to_thread(store.allocated, [pending]) == {pending.id: 0}  # nothing written yet
    run(
        require("qemu-io"),
        "-f",
        "raw",
        "-c",
        f"write -P 0x52 {MIB} 4096",
        store.where.spec(store.image_name(VM, DISK)).filename,
    )
    assert await asyncio.to_thread(store.allocated, [pending]) == {pending.id: 4 * MIB}  # one object
    await repository.discard(pending.id)
    disk.check(full)  # the snapshot kept its data


async def test_a_clone_on_a_full_pool_fails_as_out_of_space(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    point = await disk.backup(f"write -P 0x61 0 {2 * MIB}", incremental=False)
    used = (await repository.space()).used
    ceph(ceph_cluster, "osd", "pool", "set-quota", ceph_cluster.pool, "max_bytes", str(max(used // 2, 1)))
    name = f"{_store(repository).where.prefix}-full"
    try:
        wait_pool_full(ceph_cluster, True)
        with pytest.raises(RepositoryError, match="the Ceph pool is full") as caught:
            await repository.clone(point, name)
        assert _out_of_space(caught.value)  # the job or request fails insufficient_space
    finally:
        ceph(ceph_cluster, "osd", "pool", "set-quota", ceph_cluster.pool, "max_bytes", "0")
        wait_pool_full(ceph_cluster, False)
    assert name not in rbd(ceph_cluster, "ls", ceph_cluster.pool)  # nothing left
    listed = rbd(ceph_cluster, "snap", "ls", _image(ceph_cluster, repository))
    assert [s["protected"] for s in listed] == ["false"], listed


async def test_a_sweep_reports_an_image_it_cannot_remove(repository: Repository, ceph_cluster: Any) -> None:
    import rados  # Debian's python3-rados
    import rbd as librbd

    await repository.recover()  # the hub's start: the prefix is claimed
    store = _store(repository)
    orphan = f"{store.where.prefix}.gone-00000000.2000"
    tool = [require("rbd"), *ceph_cluster.client_args()]
    run(*tool, "create", "--size", "4M", f"{ceph_cluster.pool}/{orphan}")
    assert await repository.sweep_orphans() == ([], [])  # untagged: not ours, left alone
    assert orphan in rbd(ceph_cluster, "ls", ceph_cluster.pool)
    run(*tool, "image-meta", "set", f"{ceph_cluster.pool}/{orphan}", "sendense.repository", str(store.identity))
    with rados.Rados(conffile=ceph_cluster.conf, rados_id=ceph_cluster.user) as client:
        with client.open_ioctx(ceph_cluster.pool) as ioctx, librbd.Image(ioctx, orphan):  # an operator has it open
            removed, unexpected = await repository.sweep_orphans()
    assert removed == [] and len(unexpected) == 1, (removed, unexpected)
    assert unexpected[0].startswith(f"rbd:{ceph_cluster.pool}/{orphan} (it could not be swept"), unexpected
    removed, unexpected = await repository.sweep_orphans()
    assert removed == [f"rbd:{ceph_cluster.pool}/{orphan}"] and unexpected == []


def test_prefixes_without_dots_and_urls_read_back(ceph_cluster: Any, tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no '.'"):
        parse_location(f"rbd://{ceph_cluster.pool}?prefix=q5.x")
    odd = "/k/a+b&c d.keyring"
    from urllib.parse import quote

    location = parse_location(f"rbd://{ceph_cluster.pool}?keyring={quote(odd, safe='/')}&prefix=q5")
    assert location.keyring == odd
    assert parse_location(location.url) == location
    assert parse_location(f"rbd://{ceph_cluster.pool}?keyring=/k/a+b.keyring").keyring == "/k/a+b.keyring"


def _full_then_resized(api: Api, tmp_path: Path, sizes: tuple[int, int]) -> list[dict[str, Any]]:
    """A full of ``sizes[0]`` bytes, then an automatic backup of the disk resized to ``sizes[1]``: the jobs."""
    jobs = []
    for size in sizes:
        status, job = api.post(
            "/backups", {"vm_path": "/DC/vm/r", "mode": "auto", "disks": [{"key": DISK, "capacity": size}]}
        )
        assert status == 201, job
        data = tmp_path / f"{size}.raw"
        data.write_bytes(b"\x6b" * size)
        run(require("nbdcopy"), "--flush", str(data), job["detail"]["disks"][0]["uri"])
        done = {"status": "completed", "vm_path": "/DC/vm/r",
                "disks": [{"disk_key": DISK, "change_id": f"c-{size}", "disk_uuid": None}]}  # fmt: skip
        status, completed = api.post(f"/backups/{job['job_id']}/complete", done)
        assert status == 200 and completed["state"] == "completed", completed
        jobs.append(job)
    return jobs


@pytest.mark.parametrize("store", ["local", "rbd"])
@pytest.mark.parametrize("sizes", [(4 * MIB, 8 * MIB), (8 * MIB, 4 * MIB)], ids=["grown", "shrunk"])
def test_a_resized_disk_gets_a_full_of_its_new_size(
    hub_factory: Callable[..., HubProcess], url: str, tmp_path: Path, store: str, sizes: tuple[int, int]
) -> None:
    state = tmp_path / "state"
    extra = ("--repo", url, "--state-dir", str(state)) if store == "rbd" else ()
    api = Api(hub_factory(None, *extra, repo=state).url)
    jobs = _full_then_resized(api, tmp_path, sizes)
    second = jobs[1]["detail"]["disks"][0]
    assert second["sync_type"] == "full" and second["full_reason"] == "cbt_reset", second
    points = api.get("/points?vm_path=/DC/vm/r")[1]["points"]
    newest = points[-1]
    assert newest["size"] == sizes[1] and newest["kind"] == "full", newest


async def test_a_second_state_directory_is_refused_unless_it_adopts(
    repository: Repository, ceph_cluster: Any, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An established repository (a claim younger than CLAIM_FRESH is a new cluster's, told apart below).
    monkeypatch.setattr(rbd_store, "CLAIM_FRESH", 0)
    disk = Disk(repository, tmp_path)
    point = await disk.backup(f"write -P 0x71 0 {MIB}", incremental=False)
    store = _store(repository)
    assert json.loads((Path(repository.root) / "store.json").read_text())["repository"] == store.identity
    for name, extra in (("other", ""), ("adopting", "&adopt=yes")):
        state = tmp_path / name
        state.mkdir()
        opened = open_store(str(state), url + extra)
        other = Repository(str(state), Database(str(state / "hub.db")), store=opened)
        if not extra:
            with pytest.raises(RepositoryError, match="adopt=yes"):
                await other.recover()
            continue
        assert await other.recover() == ([], [])
        assert await other.sweep_orphans() == ([], [])  # an adopted repository is never swept
        assert _store(other).identity == store.identity
    assert snapshots(ceph_cluster, repository) == [point.id]
    # The pool's repository object names another UUID than this directory's: refused.
    ceph_rados = [require("rados"), *ceph_cluster.client_args(), "-p", ceph_cluster.pool]
    run(*ceph_rados, "rm", f"{store.where.prefix}.repository")
    restarted = Repository(repository.root, repository.db, store=open_store(repository.root, None))
    assert await restarted.recover() == ([], [])  # recreated from the directory's record
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({"rbd": url, "repository": "00000000-0000-0000-0000-000000000000"}))
    shutil.copyfile(stale, Path(repository.root) / "store.json")
    with pytest.raises(RepositoryError, match="but this state directory recorded"):
        await Repository(repository.root, repository.db, store=open_store(repository.root, None)).recover()


async def test_a_clone_cut_short_is_removed_at_start(repository: Repository, ceph_cluster: Any, tmp_path: Path) -> None:
    disk = Disk(repository, tmp_path)
    point = await disk.backup(f"write -P 0x81 0 {MIB}", incremental=False)
    other = await disk.backup("write -P 0x82 0 4096", incremental=True)
    tool = [require("rbd"), *ceph_cluster.client_args()]
    image = _image(ceph_cluster, repository)
    prefix = _store(repository).where.prefix
    # What a hub killed mid-clone left: a protected snapshot and an unflattened, tagged clone; next to it an
    # operator's clone of another point, which stays.
    for snapshot, name, tagged in ((point.id, "cut", True), (other.id, "kept", False)):
        run(*tool, "snap", "protect", f"{image}@{snapshot}")
        run(*tool, "clone", f"{image}@{snapshot}", f"{ceph_cluster.pool}/{prefix}-{name}")
        if tagged:
            run(*tool, "image-meta", "set", f"{ceph_cluster.pool}/{prefix}-{name}", "sendense.clone-of", snapshot)
    try:
        restarted = Repository(repository.root, repository.db, store=open_store(repository.root, None))
        assert await restarted.recover() == ([], [])
        names = rbd(ceph_cluster, "ls", ceph_cluster.pool)
        assert f"{prefix}-cut" not in names and f"{prefix}-kept" in names
        listed = {s["name"]: s["protected"] for s in rbd(ceph_cluster, "snap", "ls", image)}
        assert listed == {point.id: "false", other.id: "true"}, listed
    finally:
        run(*tool, "rm", f"{ceph_cluster.pool}/{prefix}-kept")
        run(*tool, "snap", "unprotect", f"{image}@{other.id}")


async def test_metrics_leave_out_a_repository_whose_space_fails(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from sendense_nbd.hub.clock import SystemClock
    from sendense_nbd.hub.metrics import HubMetrics

    missing = RbdStore(
        parse_location(f"rbd://no-such-pool?conf={ceph_cluster.conf}&id={ceph_cluster.user}"), str(tmp_path)
    )
    for store, expected in ((_store(repository), {"free", "total", "used"}), (missing, set())):
        metrics = HubMetrics(
            repository.db, repo=repository.root, pool_size=4, clock=SystemClock(),
            space=lambda store=store: asyncio.to_thread(store.space),
        )  # fmt: skip
        families = {f.name: f for f in text_string_to_metric_families((await metrics.render()).decode())}
        assert {s.labels["kind"] for s in families["sendense_repository_bytes"].samples} == expected
        assert families["sendense_ports"].samples  # the rest is there


async def test_a_missing_base_snapshot_makes_the_next_backup_full(
    repository: Repository, ceph_cluster: Any, tmp_path: Path
) -> None:
    disk = Disk(repository, tmp_path)
    point = await disk.backup(f"write -P 0x91 0 {MIB}", incremental=False)
    assert await repository.base_for(VM, DISK) == (await repository.point(point.id), None)
    run(require("rbd"), *ceph_cluster.client_args(), "snap", "rm", f"{_image(ceph_cluster, repository)}@{point.id}")
    assert await repository.base_for(VM, DISK) == (None, FullReason.BASE_MISSING)
    full = await disk.backup(f"write -P 0x92 0 {2 * MIB}", incremental=False)
    disk.check(full)


async def test_a_seal_that_hangs_fails_the_completion_in_time(
    repository: Repository, ceph_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from sendense_nbd.hub.repository import core
    from sendense_nbd.hub.requests import ReportedDisk

    disk = Disk(repository, tmp_path)
    full = await disk.backup(f"write -P 0xa1 0 {MIB}", incremental=False)
    store = _store(repository)
    release = threading.Event()
    sealed = store.seal

    def hung(point: Any) -> None:  # a cluster whose OSDs do not answer, until released
        release.wait(30)
        sealed(point)

    monkeypatch.setattr(store, "seal", hung)
    monkeypatch.setattr(core, "SEAL_TIMEOUT", 0.5)
    pending = await repository.new_point(VM, DISK, "job", incremental=True, capacity=None)
    with pytest.raises(RepositoryError, match="took over 0.5 s"):
        await repository.complete([(pending.id, ReportedDisk(DISK, "c", None))])
    await repository.discard(pending.id)
    release.set()
    for _ in range(100):  # the late seal takes its snapshot (at most 10 s): the next start removes it
        if pending.id in snapshots(ceph_cluster, repository):
            break
        await asyncio.sleep(0.1)
    assert await repository.sweep_orphans() == ([f"rbd:{_image(ceph_cluster, repository)}@{pending.id}"], [])
    assert snapshots(ceph_cluster, repository) == [full.id]


HOLDER = """
import sys, time, rados, rbd
with rados.Rados(conffile=sys.argv[1], rados_id=sys.argv[2]) as client, client.open_ioctx(sys.argv[3]) as ioctx:
    with rbd.Image(ioctx, sys.argv[4]) as image:
        image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        print("locked", flush=True)
        time.sleep(600)
"""


def _killed_lock_holder(cluster: Any, image: str) -> None:
    """A client that takes the image's exclusive lock and is killed (-9) holding it."""
    import select
    import subprocess
    import sys

    args = [sys.executable, "-c", HOLDER, cluster.conf, cluster.user, cluster.pool, image]
    holder = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and select.select([holder.stdout], [], [], 30)[0], "no lock in 30 s"
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.kill()
        holder.wait(10)


async def test_a_profile_rbd_user_runs_the_repository(ceph_cluster: Any, prefix: str, tmp_path: Path) -> None:
    user = f"hub-{prefix}"
    keyring = tmp_path / "hub.keyring"
    caps = ["mon", "profile rbd", "osd", f"profile rbd pool={ceph_cluster.pool}"]
    keyring.write_text(ceph(ceph_cluster, "auth", "get-or-create", f"client.{user}", *caps).stdout)
    url = f"rbd://{ceph_cluster.pool}?conf={ceph_cluster.conf}&id={user}&keyring={keyring}&prefix={prefix}"
    state = tmp_path / "state"
    state.mkdir()
    store = open_store(str(state), url)
    repository = Repository(str(state), Database(str(state / "hub.db")), store=store)
    try:
        disk = Disk(repository, tmp_path)
        point = await disk.backup(f"write -P 0xb1 0 {MIB}", incremental=False)
        space = await repository.space()  # ceph df and osd pool get-quota
        assert space.total > 0 and space.used >= 0
        await repository.clone(point, f"{prefix}-clone")
        run(require("rbd"), *ceph_cluster.client_args(), "rm", f"{ceph_cluster.pool}/{prefix}-clone")
        # A killed client's exclusive lock on the image: the restarted hub breaks it (blocklisting it).
        image = _store(repository).image_name(VM, DISK)
        await asyncio.to_thread(_killed_lock_holder, ceph_cluster, image)
        restarted = Repository(str(state), repository.db, store=open_store(str(state), None))
        assert await asyncio.to_thread(restarted.store.reclaim) == [image]
        assert await restarted.sweep_orphans() == ([], [])
        second = await disk.backup(f"write -P 0xb2 {MIB} 4096", incremental=True)  # the head rolls back
        disk.check(second)
    finally:
        repository.db.close()
        ceph(ceph_cluster, "auth", "rm", f"client.{user}")


async def test_one_connection_per_store(
    repository: Repository, ceph_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sendense_nbd.hub.repository import rbd as rbd_module

    opened: list[Any] = []
    real = rbd_module.connect

    def counting(spec: Any) -> Any:
        opened.append(spec)
        return real(spec)

    monkeypatch.setattr(rbd_module, "connect", counting)
    disk = Disk(repository, tmp_path)
    point = await disk.backup(f"write -P 0xc1 0 {MIB}", incremental=False)
    top = await disk.backup(f"write -P 0xc2 {MIB} 4096", incremental=True)
    await repository.space()
    store = _store(repository)
    assert await asyncio.to_thread(store.allocated, [point, top]) == {point.id: 4 * MIB, top.id: 4 * MIB}
    assert len(opened) == 1, opened  # claim, create, seal, space, diffs: one connection
    await asyncio.to_thread(store.close)
    assert await asyncio.to_thread(store.check, [point, top]) is None  # opened again after close
    assert len(opened) == 2
    await asyncio.to_thread(store.close)


def test_of_two_new_stores_claiming_at_once_the_second_is_told_so(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read the pool unclaimed; the first one's exclusive create wins and the second fails with
    RepositoryClaimed (a hub then takes the winner's repository from the cluster), recording nothing."""
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first, second = (open_store(str(tmp_path / name), url) for name in ("first", "second"))
    assert isinstance(first, RbdStore) and isinstance(second, RbdStore)
    listed = second._named

    def listed_then_claimed(ioctx: Any, what: str) -> list[str]:
        """The second has read the pool unclaimed and lists its images: the first claims it now."""
        names = listed(ioctx, what)
        first.reclaim(())
        return names

    try:
        monkeypatch.setattr(second, "_named", listed_then_claimed)
        with pytest.raises(RepositoryClaimed, match="another hub claimed it"):
            second.reclaim(())
        monkeypatch.undo()
        assert first.identity is not None and second.identity is None
        assert "repository" not in json.loads((tmp_path / "second" / "store.json").read_text())
        # Tried again, the repository is still the new one of a cluster starting (a hub then waits for the
        # cluster to record it); once older than CLAIM_FRESH, it is refused as any other repository.
        with pytest.raises(RepositoryClaimed, match=r"claimed it as a new repository \d+ s ago"):
            second.reclaim(())
        monkeypatch.setattr(rbd_store, "CLAIM_FRESH", 0)
        with pytest.raises(RepositoryError, match="adopt=yes"):
            second.reclaim(())
    finally:
        first.close()
        second.close()
