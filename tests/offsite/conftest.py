"""Offsite copies against the session's real Ceph RGW (tests/conftest.py ``ceph_cluster``): a fresh bucket with
Object Lock per test, the S3 secret in a 0600 file, and a small chain of qcow2 points made by our engine."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import boto3
import pytest
from botocore.config import Config

from sendense_nbd.copy.digests import CHUNK_SIZE, DigestFile, chunk_count, chunk_digests
from sendense_nbd.copy.endpoints import open_source
from sendense_nbd.errors import OffsiteError
from sendense_nbd.offsite.copier import PointFiles
from sendense_nbd.offsite.s3 import Bucket
from sendense_nbd.offsite.upload import Recorded
from sendense_nbd.policy.offsite import CopyTarget
from sendense_nbd.storage import ImageFormat, create_image, open_image

MIB = 1 << 20
#: The disk of the test chain: 40 MiB, so an image takes several 16 MiB parts.
DISK = 40 * MIB


def admin_client(cluster: Any) -> Any:
    """A boto3 client with the cluster's S3 user (for setting up buckets and looking at what copies did)."""
    config = Config(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3", endpoint_url=cluster.rgw_endpoint, aws_access_key_id=cluster.s3_access_key,
        aws_secret_access_key=cluster.s3_secret_key, region_name="us-east-1", config=config,
    )  # fmt: skip


def secret_file(directory: Path, secret: str, mode: int = 0o600) -> str:
    """The secret in a file of ``mode``."""
    path = directory / f"s3-secret-{uuid.uuid4().hex[:6]}"
    path.write_text(secret + "\n")
    path.chmod(mode)
    return str(path)


def new_bucket(cluster: Any, *, lock: bool = True) -> str:
    """A fresh bucket (with Object Lock unless ``lock`` is False)."""
    name = f"copies-{uuid.uuid4().hex[:12]}"
    extra = {"ObjectLockEnabledForBucket": True} if lock else {}
    admin_client(cluster).create_bucket(Bucket=name, **extra)
    return name


@pytest.fixture
def s3(ceph_cluster: Any) -> Any:
    """The admin S3 client of the session's cluster."""
    return admin_client(ceph_cluster)


@pytest.fixture
def target(ceph_cluster: Any, tmp_path: Path) -> CopyTarget:
    """A copy target on a fresh Object Lock bucket: GOVERNANCE, locked 60 s + 5 s margin, 3 points a chain."""
    return CopyTarget(
        endpoint=ceph_cluster.rgw_endpoint, bucket=new_bucket(ceph_cluster), access_key=ceph_cluster.s3_access_key,
        secret_file=secret_file(tmp_path, ceph_cluster.s3_secret_key), retain=60.0, margin=5.0, seal_every=3,
    )  # fmt: skip


class Parts:
    """Bucket.upload_part, counted and slowed: each part waits for ``gate`` (set: no wait) and then ``pause``;
    ``arrived`` is set when a part reached the gate; a part of a key ending in ``fail_on`` fails as S3 would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.arrived = threading.Event()
        self.fail_on: str | None = None
        self.pause = 0.0
        real = Bucket.upload_part

        def upload_part(bucket: Bucket, key: str, upload: str, number: int, data: Any, md5: bytes) -> str:
            self.arrived.set()
            assert self.gate.wait(60), "the test never opened the gate"
            time.sleep(self.pause)
            if self.fail_on is not None and key.endswith(self.fail_on):
                raise OffsiteError(f"S3 uploading part {number} of {key} failed: InternalError", "InternalError")
            etag = real(bucket, key, upload, number, data, md5)
            self.sent.append((key, number))
            return etag

        monkeypatch.setattr(Bucket, "upload_part", upload_part)


@pytest.fixture
def parts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Parts]:
    """The hub's part uploads, counted, held or failed by the test (:class:`Parts`)."""
    found = Parts(monkeypatch)
    yield found
    found.gate.set()


class MemoryJournal:
    """An upload journal in a dict (the hub's is its SQLite store); ``fail_after`` parts recorded, the next
    recording raises, as a hub killed mid-upload would stop."""

    def __init__(self) -> None:
        self.uploads: dict[str, Recorded] = {}
        self.sent: list[tuple[str, int]] = []
        self.fail_after: int | None = None
        self.lock = threading.Lock()
        #: Object versions made: (key, version, until).
        self.versions: list[tuple[str, str, float]] = []

    def recorded(self, key: str) -> Recorded | None:
        return self.uploads.get(key)

    def begun(self, key: str, upload: str, part_size: int) -> None:
        self.uploads[key] = Recorded(upload, part_size, {})

    def part(self, key: str, number: int, size: int, md5: str) -> None:
        with self.lock:
            if self.fail_after is not None and len(self.sent) >= self.fail_after:
                raise RuntimeError("killed mid-upload")
            self.sent.append((key, number))
            self.uploads[key].parts[number] = (size, md5)

    def finished(self, key: str) -> None:
        self.uploads.pop(key, None)

    def made(self, key: str, version: str, until: float) -> None:
        self.versions.append((key, version, until))

    def version(self, key: str) -> str | None:
        return next((v for k, v, _ in reversed(self.versions) if k == key), None)


@attrs.frozen
class LocalPoint:
    """A point of the test chain: its files and the time it completed."""

    files: PointFiles
    path: Path


def _write(path: Path, writes: list[tuple[int, bytes]], zeroes: list[tuple[int, int]]) -> None:
    device = open_image(str(path), ImageFormat.QCOW2)
    try:
        for offset, data in writes:
            device.write(offset=offset, data=data)
        for offset, length in zeroes:
            device.zero(offset=offset, length=length)
        device.flush()
    finally:
        device.close()


async def _digests(path: Path, size: int) -> Path:
    source = await open_source(str(path))
    try:
        found = await chunk_digests(source)
    finally:
        await source.close()
    sidecar = path.with_suffix(".digests")
    DigestFile(size, CHUNK_SIZE, tuple(found[i] for i in range(chunk_count(size)))).write(str(sidecar))
    return sidecar


Plan = tuple[list[tuple[int, bytes]], list[tuple[int, int]]]


async def make_chain(folder: Path, size: int, plans: list[Plan]) -> list[LocalPoint]:
    """Points of one disk of ``size`` bytes as the local repository holds them, one per plan (writes, zeroed
    ranges): a full qcow2 and overlays, backing files named ``<point-id>.qcow2``, each with its digests."""
    os.makedirs(folder, exist_ok=True)
    points: list[LocalPoint] = []
    now = time.time()
    for index, (writes, zeroes) in enumerate(plans):
        point_id = f"202612{index + 1:02d}T000000Z-{uuid.uuid4().hex[:8]}"
        path = folder / f"{point_id}.qcow2"
        backing = points[-1].path.name if points else None
        create_image(str(path), None if backing else size, ImageFormat.QCOW2, backing_file=backing,
                     backing_format="qcow2" if backing else None)  # fmt: skip
        _write(path, writes, zeroes)
        sidecar = await _digests(path, size)
        files = PointFiles("/DC0/vm/web01", 2000, point_id, now - 30 + index, size, str(path), backing, str(sidecar))
        points.append(LocalPoint(files, path))
    os.sync()
    return points


@pytest.fixture
async def chain(tmp_path: Path) -> list[LocalPoint]:
    """Three points of one 40 MiB disk as the local repository holds them: a full qcow2 (random data) and two
    overlays (new data, zeroed ranges), backing files named ``<point-id>.qcow2``, each with its digests."""
    rng = __import__("random").Random(7)
    plans: list[Plan] = [
        ([(0, rng.randbytes(24 * MIB)), (30 * MIB, rng.randbytes(3 * MIB))], []),
        ([(MIB, rng.randbytes(2 * MIB)), (35 * MIB, rng.randbytes(MIB))], [(8 * MIB, 4 * MIB)]),
        ([(20 * MIB, rng.randbytes(5 * MIB))], [(0, 512 * 1024), (31 * MIB, MIB)]),
    ]
    return await make_chain(tmp_path / "repo", DISK, plans)
