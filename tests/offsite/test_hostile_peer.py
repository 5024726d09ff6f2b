"""Offsite copies against an S3 service that answers wrongly (tests/offsite/standin.py, a local HTTP server the test
starts: RGW cannot be made to lie): a ranged GET whose answer ignores the range, names another one, is short, long
or dribbled is refused (never cached, EIO to an NBD client whose connection stays usable); a download body longer
than recorded is cut off; part listings that never end are refused; a silent endpoint fails in bounded time; a
delete refused without a lock is not called locked."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from sendense_nbd.client import NBDRequestError, connect
from sendense_nbd.errors import CopyLocked, OffsiteError
from sendense_nbd.offsite.manifest import Manifest, StoredObject
from sendense_nbd.offsite.remote import BLOCK, BlockCache, S3File, open_copy
from sendense_nbd.offsite.restore import download_object
from sendense_nbd.offsite.s3 import Bucket, Timing
from sendense_nbd.policy.offsite import CopyTarget
from sendense_nbd.server import Export, NBDServer
from sendense_nbd.storage import ImageFormat, create_image, open_image
from tests.offsite.conftest import secret_file
from tests.offsite.standin import Behaviour, free_port, standin

MIB = 1 << 20
#: Tight bounds, so a test of a slow peer takes seconds (the hub's are QUICK and PATIENT).
FAST = Timing(connect=1, read=2, attempts=1, piece=1)


def _bucket(endpoint: str, tmp_path: Path) -> Bucket:
    target = CopyTarget(
        endpoint=endpoint, bucket="copies", access_key="AK", secret_file=secret_file(tmp_path, "s3cr3t"), retain=60.0
    )
    return Bucket.connect(target, patient=FAST, fast=FAST)


def _file(bucket: Bucket, data: bytes, cache: BlockCache) -> S3File:
    stored = StoredObject("c/p.qcow2", "v1", len(data), "0" * 64)
    return S3File(bucket, {"p.qcow2": stored}, "p.qcow2", cache)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("ignore-range", r"with 200 .*not 206 'bytes 1048576-2097151/3145728'"),
        ("wrong-range", r"with 206 'bytes 0-1048575/3145728', not 206 'bytes 1048576-2097151/3145728'"),
        ("short", r"reading copies/c/p.qcow2 failed"),
        ("long", r"more than the 1048576 bytes of copies/c/p.qcow2"),
    ],
)
def test_a_wrong_ranged_answer_is_refused_and_never_cached(tmp_path: Path, mode: str, message: str) -> None:
    data = os.urandom(3 * MIB)
    behaviour = Behaviour(objects={"c/p.qcow2": data}, ranged=mode, hostile=frozenset({BLOCK}))
    with standin(behaviour) as endpoint:
        bucket = _bucket(endpoint, tmp_path)
        with pytest.raises(OffsiteError, match=message):
            bucket.read_range("c/p.qcow2", "v1", BLOCK, BLOCK, size=len(data))
        cache = BlockCache(limit=8 * BLOCK)
        file = _file(bucket, data, cache)
        buffer = bytearray(16)
        with pytest.raises(OSError) as failed:
            file.readinto(memoryview(buffer), BLOCK + 5)  # what the review saw return block 0's bytes
        assert failed.value.errno == errno.EIO
        assert cache.size == 0 and cache.get("c/p.qcow2", 1) is None  # nothing of a failed block is kept
        assert file.readinto(memoryview(buffer), 5) == 16 and buffer == data[5:21]  # block 0 answers honestly
        assert cache.size == BLOCK


def test_a_dribbled_body_is_cut_off_at_its_budget(tmp_path: Path) -> None:
    data = os.urandom(2 * MIB)
    with standin(Behaviour(objects={"c/p.qcow2": data}, ranged="dribble")) as endpoint:
        bucket = _bucket(endpoint, tmp_path)
        started = time.monotonic()
        with pytest.raises(OffsiteError, match="took over 1 s"):
            bucket.read_range("c/p.qcow2", "v1", 0, BLOCK, size=len(data))
        assert time.monotonic() - started < 4  # a byte every 0.2 s would take days


def test_a_silent_endpoint_fails_within_its_bounds(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        bucket = _bucket(f"http://127.0.0.1:{silent.getsockname()[1]}", tmp_path)
        started = time.monotonic()
        with pytest.raises(OffsiteError, match="Read timeout|timed out"):
            bucket.check_lock()
        assert time.monotonic() - started < 8
    refused = _bucket(f"http://127.0.0.1:{free_port()}", tmp_path)
    with pytest.raises(OffsiteError, match="Could not connect"):
        refused.check_lock()


@pytest.mark.parametrize("mode", ["endless", "long"])
def test_a_download_longer_than_recorded_is_cut_off(tmp_path: Path, mode: str) -> None:
    data = os.urandom(3 * MIB)
    behaviour = Behaviour(objects={"c/p.qcow2": data}, whole=mode)
    with standin(behaviour) as endpoint:
        bucket = _bucket(endpoint, tmp_path)
        stored = StoredObject("c/p.qcow2", "v1", len(data), "0" * 64)
        target = tmp_path / "out" / "p.qcow2"
        target.parent.mkdir()
        with pytest.raises(OffsiteError, match=f"more than the {len(data)} bytes"):
            download_object(bucket, stored, str(target))
    assert not list(target.parent.iterdir())  # no file, no temporary
    assert behaviour.streamed < len(data) + 8 * MIB  # the reader stopped: the peer did not fill the disk


def test_a_body_shorter_than_recorded_is_refused(tmp_path: Path) -> None:
    data = os.urandom(MIB)
    with standin(Behaviour(objects={"c/p.qcow2": data})) as endpoint:
        bucket = _bucket(endpoint, tmp_path)
        stored = StoredObject("c/p.qcow2", "v1", len(data) + 10, "0" * 64)
        with pytest.raises(OffsiteError, match=f"downloaded {len(data)} bytes .* says {len(data) + 10} bytes"):
            download_object(bucket, stored, str(tmp_path / "p.qcow2"))
    assert not (tmp_path / "p.qcow2").exists()


def test_part_listings_that_never_end_are_refused(tmp_path: Path) -> None:
    stuck = Behaviour(parts=lambda marker: ([1], True, "1"))  # IsTruncated with the same marker, forever
    with standin(stuck) as endpoint:
        with pytest.raises(OffsiteError, match="truncated at marker '1' after 1: a listing must move on"):
            _bucket(endpoint, tmp_path).parts("c/p.qcow2", "u")
    assert len(stuck.seen) == 2
    endless = Behaviour(parts=lambda marker: ([marker + 1], True, str(marker + 1)))  # moves on, never ends
    with standin(endless) as endpoint:
        with pytest.raises(OffsiteError, match="in more than 20 pages"):
            _bucket(endpoint, tmp_path).parts("c/p.qcow2", "u")
    assert len(endless.seen) == 20
    many = Behaviour(parts=lambda marker: (list(range(marker + 1, marker + 1001)), True, str(marker + 1000)))
    with standin(many) as endpoint:
        with pytest.raises(OffsiteError, match="more than 10000 parts"):
            _bucket(endpoint, tmp_path).parts("c/p.qcow2", "u")
    done = Behaviour(parts=lambda marker: ([marker + 1, marker + 2], marker < 2, str(marker + 2)))
    with standin(done) as endpoint:
        assert [p.number for p in _bucket(endpoint, tmp_path).parts("c/p.qcow2", "u") or []] == [1, 2, 3, 4]


def test_a_delete_refused_without_a_lock_names_the_permission(tmp_path: Path) -> None:
    past = {"c/p.qcow2": ("GOVERNANCE", time.time() - 3600)}
    with standin(Behaviour(deny_delete=True, retention=past)) as endpoint:
        with pytest.raises(OffsiteError, match="though no lock holds it .*needs s3:DeleteObjectVersion") as refused:
            _bucket(endpoint, tmp_path).delete("c/p.qcow2", "v1")
        assert not isinstance(refused.value, CopyLocked)
    future = {"c/p.qcow2": ("COMPLIANCE", time.time() + 3600)}
    with standin(Behaviour(deny_delete=True, retention=future)) as endpoint:
        with pytest.raises(CopyLocked, match="is locked until .* \\(COMPLIANCE\\)"):
            _bucket(endpoint, tmp_path).delete("c/p.qcow2", "v1")


def _image(path: Path, data: bytes) -> bytes:
    """A qcow2 holding ``data`` from offset 0."""
    create_image(str(path), len(data), ImageFormat.QCOW2)
    device = open_image(str(path), ImageFormat.QCOW2)
    try:
        device.write(offset=0, data=data)
        device.flush()
    finally:
        device.close()
    return path.read_bytes()


async def test_a_wrong_answer_is_eio_to_the_nbd_client_whose_connection_stays(tmp_path: Path) -> None:
    data = os.urandom(4 * MIB)
    image = _image(tmp_path / "p.qcow2", data)
    where = image.find(data[3 * MIB : 3 * MIB + 4096]) // BLOCK * BLOCK  # the file's block holding guest 3 MiB
    assert where >= BLOCK  # past the header (its tables are read when the copy opens)
    behaviour = Behaviour(objects={"c/p.qcow2": image}, ranged="ignore-range", hostile=frozenset({where}))
    with standin(behaviour) as endpoint:
        bucket = _bucket(endpoint, tmp_path)
        stored = StoredObject("c/p.qcow2", "v1", len(image), "0" * 64)
        manifest = Manifest("c1", "/vm", 2000, "p", 0.0, 4 * MIB, "p", ("p",), stored, None, None, 0.0)
        device = await asyncio.to_thread(open_copy, bucket, [manifest], cache=BlockCache(limit=4 * BLOCK))
        async with NBDServer([Export("copy", device, readonly=True)], port=0, persistent=True) as server:
            async with connect(f"nbd://127.0.0.1:{server.port}/copy") as nbd:
                assert await nbd.pread(offset=0, length=4096) == data[:4096]
                with pytest.raises(NBDRequestError) as failed:
                    await nbd.pread(offset=3 * MIB, length=4096)
                assert failed.value.errno == errno.EIO
                assert await nbd.pread(offset=4096, length=4096) == data[4096:8192]  # the connection stays
        device.close()
    assert threading.active_count() < 50
