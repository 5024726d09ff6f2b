"""Offsite copies against a real Ceph RGW with Object Lock: a 3-point chain uploaded, locked as a unit, refused
deletion, served back over NBD from the bucket (read by nbdcopy and qemu-img), downloaded and checked, an
interrupted upload resumed; buckets without Object Lock, wrong credentials and readable secret files refused."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

from sendense_nbd.errors import CopyDamaged, CopyLocked, OffsiteError
from sendense_nbd.offsite.copier import Written, copy_point, delete_copies
from sendense_nbd.offsite.manifest import Manifest
from sendense_nbd.offsite.remote import BLOCK, BlockCache, open_copy
from sendense_nbd.offsite.restore import download, recorded_digests, verify
from sendense_nbd.offsite.s3 import Bucket
from sendense_nbd.offsite.upload import part_size
from sendense_nbd.policy.offsite import CopyTarget, LockMode
from sendense_nbd.server import Export, NBDServer
from tests.conftest import require, run
from tests.offsite.conftest import LocalPoint, MemoryJournal, new_bucket, secret_file

pytestmark = pytest.mark.peer


def _copy_chain(bucket: Bucket, chain: list[LocalPoint], journal: MemoryJournal, *, step: float = 0.0) -> list[Written]:
    """Copy the points in order, the n-th copy made at now + n * ``step``."""
    written: list[Written] = []
    start = time.time()
    for index, point in enumerate(chain):
        done = copy_point(
            bucket, point.files, [(w.manifest, w.version) for w in written], copy_id=f"c-{point.files.point_id}",
            now=start + index * step, journal=journal,
        )  # fmt: skip
        written.append(done)
    return written


def _objects(written: Written) -> list[tuple[str, str]]:
    """A copy's objects (key, version): image, digests and manifest."""
    found = [(written.manifest.image.key, written.manifest.image.version), (written.manifest.key, written.version)]
    digests = written.manifest.digests
    return found + ([(digests.key, digests.version)] if digests is not None else [])


async def test_a_chain_is_copied_locked_as_a_unit_and_refuses_deletion(
    target: CopyTarget, chain: list[LocalPoint], s3: Any
) -> None:
    bucket = Bucket.connect(target)
    bucket.check_lock()
    # the copies are made 100 s apart: each one must push the lock of every object below it further
    written = await asyncio.to_thread(_copy_chain, bucket, chain, MemoryJournal(), step=100.0)
    top = written[-1].manifest
    assert [w.manifest.kind for w in written] == ["full", "incremental", "incremental"]
    assert top.chain == tuple(p.files.point_id for p in chain)
    assert top.backing == chain[1].path.name
    assert top.created == written[0].manifest.created + 200
    until = top.created + target.retain + target.margin  # t + 200 + 65
    for w in written:  # every object of the chain, the full's and its digests too, is locked until the newest's date
        assert len(_objects(w)) == 3
        for key, version in _objects(w):
            retention = s3.get_object_retention(Bucket=target.bucket, Key=key, VersionId=version)["Retention"]
            assert retention["Mode"] == "GOVERNANCE"
            assert abs(retention["RetainUntilDate"].timestamp() - until) < 1, key
    stored = s3.get_object(Bucket=target.bucket, Key=top.key, VersionId=written[-1].version)["Body"].read()
    assert Manifest.decode(stored, top.key) == top
    with pytest.raises(CopyLocked, match="is locked until .*GOVERNANCE.*refused"):
        await asyncio.to_thread(delete_copies, bucket, [(top, written[-1].version)])
    versions = s3.list_object_versions(Bucket=target.bucket)
    assert len(versions.get("Versions", [])) == 9 and not versions.get("DeleteMarkers")  # nothing went


async def test_a_copy_is_served_from_the_bucket_byte_identical(
    target: CopyTarget, chain: list[LocalPoint], tmp_path: Path
) -> None:
    bucket = Bucket.connect(target)
    written = await asyncio.to_thread(_copy_chain, bucket, chain, MemoryJournal())
    manifests = [w.manifest for w in written]
    cache = BlockCache(limit=8 * BLOCK)
    device = open_copy(bucket, manifests, cache=cache)
    out = tmp_path / "served.raw"
    async with NBDServer([Export("copy", device, readonly=True)], port=0, shared=4, persistent=True) as server:
        uri = f"nbd://127.0.0.1:{server.port}/copy"
        info = await asyncio.to_thread(run, require("nbdinfo"), "--json", uri)
        assert '"is_read_only": true' in info.stdout
        await asyncio.to_thread(run, require("nbdcopy"), uri, str(out))
        await asyncio.to_thread(run, require("qemu-img"), "compare", "-F", "qcow2", uri, str(chain[-1].path))
    device.close()
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(out), str(chain[-1].path))
    assert cache.size <= 8 * BLOCK and cache.fetches > 0  # bounded: far less than the 40 MiB disk
    # the served view has the digests recorded at backup time
    scratch = tmp_path / "scratch"
    await verify(open_copy(bucket, manifests), recorded_digests(bucket, manifests[-1], str(scratch)), "copy")
    assert os.listdir(scratch) == []  # the digests' temporary folder is gone


async def test_a_downloaded_copy_is_checked_and_opens_with_qemu_img(
    target: CopyTarget, chain: list[LocalPoint], tmp_path: Path
) -> None:
    bucket = Bucket.connect(target)
    written = await asyncio.to_thread(_copy_chain, bucket, chain[:2], MemoryJournal())
    folder = tmp_path / "restore"
    folder.mkdir()
    top = await asyncio.to_thread(download, bucket, [w.manifest for w in written], str(folder))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [chain[0].path.name, chain[1].path.name, chain[1].path.with_suffix(".digests").name]
    )
    for name in (chain[0].path.name, chain[1].path.name):
        run(require("qemu-img"), "check", str(folder / name))
    info = run(require("qemu-img"), "info", "--output=json", top).stdout
    assert f'"backing-filename": "{chain[0].path.name}"' in info
    run(require("qemu-img"), "compare", top, str(chain[1].path))
    from sendense_nbd.storage import ImageFormat, open_image

    scratch = str(tmp_path / "scratch")
    await verify(
        open_image(top, ImageFormat.QCOW2, readonly=True), recorded_digests(bucket, written[-1].manifest, scratch), top
    )


async def test_a_damaged_download_is_refused(
    target: CopyTarget, chain: list[LocalPoint], tmp_path: Path, s3: Any
) -> None:
    bucket = Bucket.connect(target)
    (written,) = await asyncio.to_thread(_copy_chain, bucket, chain[:1], MemoryJournal())
    manifest = written.manifest
    s3.put_object(Bucket=target.bucket, Key=manifest.image.key, Body=b"not the image")  # a newer version: ignored
    wrong = attrs.evolve(manifest, image=attrs.evolve(manifest.image, sha256="0" * 64))
    with pytest.raises(OffsiteError, match="the manifest says"):
        await asyncio.to_thread(download, bucket, [wrong], str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".qcow2") or ".creating" in p]  # nothing half-made
    with pytest.raises(CopyDamaged):
        await asyncio.to_thread(download, bucket, [wrong], str(tmp_path))


async def test_an_interrupted_upload_resumes_without_resending_parts(
    target: CopyTarget, chain: list[LocalPoint], s3: Any, tmp_path: Path
) -> None:
    bucket = Bucket.connect(target)
    journal = MemoryJournal()
    parts = -(-chain[0].path.stat().st_size // part_size(chain[0].path.stat().st_size))
    assert parts >= 2
    journal.fail_after = 1  # the hub "dies" after S3 took part 1 of the full image, before part 2 is recorded
    with pytest.raises(RuntimeError, match="killed"):
        await asyncio.to_thread(_copy_chain, bucket, chain[:1], journal)
    key = next(iter(journal.uploads))
    assert [
        p["PartNumber"]
        for p in s3.list_parts(Bucket=target.bucket, Key=key, UploadId=journal.uploads[key].upload)["Parts"]
    ] == [1, 2]
    journal.fail_after = None
    sent_before = list(journal.sent)
    (written,) = await asyncio.to_thread(_copy_chain, bucket, chain[:1], journal)
    resent = journal.sent[len(sent_before) :]
    # part 1 (recorded) is kept; part 2 reached S3 but was never recorded, so it is sent again, then the rest
    assert [n for k, n in resent if k == key] == list(range(2, parts + 1))
    assert not s3.list_multipart_uploads(Bucket=target.bucket).get("Uploads")
    head = s3.head_object(Bucket=target.bucket, Key=key, VersionId=written.manifest.image.version)
    assert head["ContentLength"] == chain[0].path.stat().st_size == written.manifest.image.size
    folder = tmp_path / "back"
    folder.mkdir()  # the copy read back is the point: the resumed parts and the resent ones are in place
    top = await asyncio.to_thread(download, bucket, [written.manifest], str(folder))
    run(require("qemu-img"), "compare", top, str(chain[0].path))


async def test_an_expired_lock_lets_the_chain_be_deleted(
    ceph_cluster: Any, chain: list[LocalPoint], tmp_path: Path, s3: Any
) -> None:
    target = CopyTarget(
        endpoint=ceph_cluster.rgw_endpoint, bucket=new_bucket(ceph_cluster), access_key=ceph_cluster.s3_access_key,
        secret_file=secret_file(tmp_path, ceph_cluster.s3_secret_key), retain=6.0, margin=0.0,
        lock_mode=LockMode.GOVERNANCE,
    )  # fmt: skip
    bucket = Bucket.connect(target)
    written = await asyncio.to_thread(_copy_chain, bucket, chain[:2], MemoryJournal())
    copies = [(w.manifest, w.version) for w in written]
    with pytest.raises(CopyLocked):
        await asyncio.to_thread(delete_copies, bucket, copies)
    assert len(s3.list_object_versions(Bucket=target.bucket)["Versions"]) == 6  # the refusal changed nothing
    await asyncio.sleep(max(0.0, written[-1].manifest.created + target.retain + 1 - time.time()))
    await asyncio.to_thread(delete_copies, bucket, copies)
    assert not s3.list_object_versions(Bucket=target.bucket).get("Versions")


def test_a_bucket_without_object_lock_is_refused(ceph_cluster: Any, tmp_path: Path) -> None:
    target = CopyTarget(
        endpoint=ceph_cluster.rgw_endpoint, bucket=new_bucket(ceph_cluster, lock=False),
        access_key=ceph_cluster.s3_access_key, secret_file=secret_file(tmp_path, ceph_cluster.s3_secret_key),
        retain=60.0,
    )  # fmt: skip
    with pytest.raises(OffsiteError, match="has no Object Lock: copies must be immutable"):
        Bucket.connect(target).check_lock()


def test_wrong_credentials_and_readable_secret_files_are_refused(target: CopyTarget, tmp_path: Path) -> None:
    wrong = attrs.evolve(target, secret_file=secret_file(tmp_path, "not-the-secret"))
    with pytest.raises(OffsiteError, match="SignatureDoesNotMatch.*check the access key"):
        Bucket.connect(wrong).check_lock()
    for mode in (0o644, 0o640, 0o604, 0o700, 0o500, 0o660):
        readable = attrs.evolve(target, secret_file=secret_file(tmp_path, "x", mode))
        with pytest.raises(OffsiteError, match=f"has mode {mode:04o}: it must be the hub user's alone.*chmod 600"):
            Bucket.connect(readable)
    missing = attrs.evolve(target, secret_file=str(tmp_path / "nope"))
    with pytest.raises(OffsiteError, match="No such file"):
        Bucket.connect(missing)
    Bucket.connect(attrs.evolve(target, secret_file=secret_file(tmp_path, "x", 0o400)))  # read-only for its owner: fine
