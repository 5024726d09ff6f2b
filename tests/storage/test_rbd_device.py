"""The RBD device against the real test cluster: data, zeroes, block status, snapshots, clones, errors.

What the device reads and writes is checked against qemu's rbd driver (qemu-img convert) and
``rbd diff``, never against itself alone.
"""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.errors import DeviceError, ImageError, RbdError, RbdNotFound, RbdPermissionDenied, RbdSpecError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.storage import CacheMode, open_image
from sendense_nbd.storage.images import create_image
from sendense_nbd.storage.rbd import RbdDevice, connect, create_rbd, open_rbd, parse_rbd_filename, rbd_exists
from tests.conftest import run
from tests.storage.rbd_images import MiB, RbdImages, data_runs, rbd_images

pytestmark = pytest.mark.peer
__all__ = ["rbd_images"]  # the fixture, imported for pytest


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_reads_and_writes_match_qemus_view(rbd_images: RbdImages, tmp_path: Path) -> None:
    """Unaligned and object-crossing requests, small (blocking) and large (aio parts), from many threads."""
    image = rbd_images.new(24 * MiB)
    expected = bytearray(24 * MiB)
    writes = [(4 * MiB - 1000, _random(9 * MiB + 123, 1)), (17, _random(5000, 2)), (20 * MiB, _random(4 * MiB, 3))]
    writes += [(13 * MiB + 512 * i, _random(512, 10 + i)) for i in range(32)]
    device = open_rbd(rbd_images.filename(image), queue_depth=2)  # fewer slots than threads and parts
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda w: device.write(offset=w[0], data=memoryview(bytearray(w[1]))), writes))
        for offset, data in writes:
            expected[offset : offset + len(data)] = data
        device.flush()
        got = bytearray(len(expected))
        view = memoryview(got)
        with ThreadPoolExecutor(8) as pool:  # 1 MiB reads are blocking calls; the 21 MiB one runs as aio parts
            list(pool.map(lambda o: device.read_into(offset=o, buffer=view[o : o + MiB]), range(0, 3 * MiB, MiB)))
            device.read_into(offset=3 * MiB, buffer=view[3 * MiB :])
        assert got == expected
    finally:
        device.close()
    assert rbd_images.export(image, tmp_path / "qemu.raw").read_bytes() == expected


def test_zero_trim_and_block_status_agree_with_rbd_diff(rbd_images: RbdImages) -> None:
    image = rbd_images.new(32 * MiB)
    device = open_rbd(rbd_images.filename(image))
    try:
        device.write(offset=0, data=_random(12 * MiB, 4))
        device.write(offset=20 * MiB + 5, data=b"x" * 10)
        first = device.extents(offset=0, length=device.size)
        assert data_runs(first) == rbd_images.diff(image) == [(0, 12 * MiB), (20 * MiB, 4 * MiB)]
        assert device.extents(offset=0, length=device.size) == first[:1]  # the data run, from memory
        device.zero(offset=4 * MiB, length=4 * MiB, may_trim=True)  # a whole object: deallocated
        device.trim(offset=8 * MiB, length=4 * MiB)  # a whole object: discarded
        device.zero(offset=MiB, length=MiB)  # inside an object: stays allocated, reads zeroes
        device.flush()
        runs = data_runs(device.extents(offset=0, length=device.size))
        assert runs == rbd_images.diff(image) == [(0, 4 * MiB), (20 * MiB, 4 * MiB)]
        assert device.extents(offset=21 * MiB, length=MiB)[0].offset == 21 * MiB  # starts where asked
        buffer = bytearray(12 * MiB)
        device.read_into(offset=0, buffer=memoryview(buffer))
        expected = bytearray(_random(12 * MiB, 4))
        expected[MiB : 2 * MiB] = bytes(MiB)
        expected[4 * MiB :] = bytes(8 * MiB)
        assert buffer == expected
        with pytest.raises(DeviceError) as fast:
            device.zero(offset=0, length=MiB, fast=True)
        assert fast.value.errno == Errno.ENOTSUP
    finally:
        device.close()


def test_block_status_after_another_client_writes(rbd_images: RbdImages) -> None:
    """A hole seen once is asked again (another client may have written it); data may be answered from memory."""
    image = rbd_images.new(16 * MiB)
    device = open_rbd(rbd_images.filename(image), readonly=True)
    try:
        assert data_runs(device.extents(offset=0, length=device.size)) == []
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 8M 4k", rbd_images.filename(image))
        assert data_runs(device.extents(offset=8 * MiB, length=8 * MiB)) == [(8 * MiB, 4 * MiB)]
        buffer = bytearray(4096)
        device.read_into(offset=8 * MiB, buffer=memoryview(buffer))
        assert buffer == b"\x11" * 4096
    finally:
        device.close()


def test_a_snapshot_opens_read_only_and_keeps_its_data(rbd_images: RbdImages, tmp_path: Path) -> None:
    image = rbd_images.new(8 * MiB)
    run("qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 4M", rbd_images.filename(image))
    rbd_images.snapshot(image, "s1")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xbb 0 1M", "-c", "write -P 0xcc 4M 1M", rbd_images.filename(image))
    name = rbd_images.filename(image, snapshot="s1")
    with pytest.raises(RbdError, match="rbd snapshots are read-only"):
        open_rbd(name)
    device = open_rbd(name, readonly=True)
    try:
        assert not device.capabilities.writable
        with pytest.raises(DeviceError) as refused:
            device.write(offset=0, data=b"x")
        assert refused.value.errno == Errno.EPERM
        buffer = bytearray(device.size)
        device.read_into(offset=0, buffer=memoryview(buffer))
        assert buffer == rbd_images.export(image, tmp_path / "s1.raw", snapshot="s1").read_bytes()
        assert buffer[: 4 * MiB] == b"\xaa" * (4 * MiB) and buffer[4 * MiB :] == bytes(4 * MiB)
        assert data_runs(device.extents(offset=0, length=device.size)) == rbd_images.diff(image, snapshot="s1")
        assert data_runs(device.extents(offset=4 * MiB, length=4 * MiB)) == []  # from the kept map: still a hole
    finally:
        device.close()


def test_a_clone_reads_its_parent(rbd_images: RbdImages) -> None:
    parent = rbd_images.new(8 * MiB)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5c 4M 1M", rbd_images.filename(parent))
    rbd_images.snapshot(parent, "base")
    rbd_images.rbd("snap", "protect", rbd_images.spec(parent, snapshot="base"))
    child = f"{parent}-clone"
    rbd_images.made.append(child)
    rbd_images.rbd("clone", rbd_images.spec(parent, snapshot="base"), rbd_images.spec(child))
    device = open_rbd(rbd_images.filename(child))
    try:
        assert data_runs(device.extents(offset=0, length=device.size)) == [(4 * MiB, 4 * MiB)]
        buffer = bytearray(MiB)
        device.read_into(offset=4 * MiB, buffer=memoryview(buffer))
        assert buffer == b"\x5c" * MiB
        device.write(offset=0, data=b"child")
    finally:
        device.close()
    rbd_images.rbd("rm", "--no-progress", rbd_images.spec(child))
    rbd_images.made.remove(child)
    rbd_images.rbd("snap", "unprotect", rbd_images.spec(parent, snapshot="base"))


def test_namespaces(rbd_images: RbdImages) -> None:
    namespace = f"ns{rbd_images.new(MiB)}"
    rbd_images.rbd("namespace", "create", f"rbd/{namespace}")
    try:
        image = rbd_images.new(4 * MiB, namespace=namespace)
        device = open_rbd(rbd_images.filename(image, namespace=namespace))
        device.write(offset=0, data=b"in a namespace")
        device.close()
        out = run("qemu-io", "-f", "raw", "-r", "-c", "read -v 0 14", rbd_images.filename(image, namespace=namespace))
        assert "in.a.namespace" in out.stdout  # qemu-io prints a space as a dot
        with pytest.raises(RbdNotFound, match="namespace 'nope' of pool 'rbd': not found"):
            open_rbd(rbd_images.filename(image, namespace="nope"))
    finally:
        rbd_images.remove_all()
        rbd_images.made.clear()
        rbd_images.rbd("namespace", "remove", f"rbd/{namespace}")


def test_cache_modes_write_durably(rbd_images: RbdImages) -> None:
    image = rbd_images.new(4 * MiB)
    for i, mode in enumerate(CacheMode):
        device = open_image(rbd_images.filename(image), cache=mode)
        device.write(offset=i * MiB, data=bytes([0x41 + i]) * 4096)
        device.close()
    out = run(
        "qemu-io",
        "-f",
        "raw",
        "-r",
        *[a for i in range(3) for a in ("-c", f"read -P {0x41 + i} {i}M 4k")],
        rbd_images.filename(image),
    )
    assert "Pattern verification failed" not in out.stdout


def test_create_and_exists(rbd_images: RbdImages) -> None:
    name = f"created-{rbd_images.new(MiB)}"
    filename = rbd_images.filename(name)
    assert not rbd_exists(filename)
    rbd_images.made.append(name)
    create_image(filename, 3 * MiB)
    assert rbd_exists(filename)
    assert json.loads(rbd_images.rbd("info", "--format", "json", f"rbd/{name}"))["size"] == 3 * MiB
    with pytest.raises(RbdError, match="it exists"):
        create_rbd(filename, MiB)
    with pytest.raises(ImageError, match="raw"):
        open_image(filename, _qcow2())
    with pytest.raises(RbdSpecError, match="a snapshot is made from an image"):
        create_rbd(rbd_images.filename(name, snapshot="s"), MiB)


def _qcow2() -> Any:
    from sendense_nbd.storage import ImageFormat

    return ImageFormat.QCOW2


def test_missing_things_are_named(rbd_images: RbdImages, ceph_cluster: Any) -> None:
    image = rbd_images.new(MiB)
    cases = {
        rbd_images.filename("no-such-image"): "image rbd:rbd/no-such-image: not found",
        rbd_images.filename(image).replace("rbd:rbd/", "rbd:no-such-pool/"): "pool 'no-such-pool': not found",
        rbd_images.filename(image, snapshot="nope"): f"snapshot 'nope' of rbd:rbd/{image}: not found",
    }
    for name, message in cases.items():
        with pytest.raises(RbdNotFound) as missing:
            open_rbd(name, readonly=True)
        assert str(missing.value) == message
    with pytest.raises(RbdError, match="cannot read the Ceph configuration"):
        open_rbd(f"rbd:rbd/{image}:conf=/nonexistent/ceph.conf")
    with pytest.raises(RbdSpecError, match="no_such_option"):
        open_rbd(rbd_images.filename(image) + ":no_such_option=1")


def test_an_unreachable_cluster_fails_in_its_timeout(rbd_images: RbdImages) -> None:
    image = rbd_images.new(MiB)
    name = rbd_images.filename(image) + r":mon_host=127.0.0.1\:1:client_mount_timeout=2"
    with pytest.raises(RbdError, match="cannot connect to the Ceph cluster"):
        open_rbd(name)


def test_a_user_without_caps_on_the_pool_is_denied(rbd_images: RbdImages, ceph_cluster: Any, tmp_path: Path) -> None:
    image = rbd_images.new(MiB)
    user = f"limited{image.replace('-', '')}"
    keyring = tmp_path / "limited.keyring"
    run(
        "ceph",
        *ceph_cluster.client_args(),
        "auth",
        "get-or-create",
        f"client.{user}",
        "mon",
        "profile rbd",
        "osd",
        "profile rbd pool=elsewhere",
        "-o",
        str(keyring),
    )
    try:
        name = f"rbd:rbd/{image}:conf={ceph_cluster.conf}:id={user}:keyring={keyring}"
        with pytest.raises(RbdPermissionDenied, match="profile rbd pool=rbd"):
            open_rbd(name)
        spec = parse_rbd_filename(name)
        assert spec.user == user and spec.keyring == str(keyring)
    finally:
        run("ceph", *ceph_cluster.client_args(), "auth", "del", f"client.{user}")


def test_a_full_pool_fails_writes_with_enospc(ceph_cluster: Any) -> None:
    """A pool over its quota (POOL_FULL) answers writes with ENOSPC at once; librados' default is to wait."""
    pool = "quota-test"
    ceph = ("ceph", *ceph_cluster.client_args())
    run(*ceph, "osd", "pool", "create", pool)
    try:
        images = RbdImages(ceph_cluster, pool=pool)
        run("rbd", *ceph_cluster.client_args(), "pool", "init", pool)
        image = images.new(16 * MiB)
        run(*ceph, "osd", "pool", "set-quota", pool, "max_bytes", str(MiB))
        device = open_rbd(images.filename(image))
        try:
            outcome: list[BaseException | None] = []

            def fill() -> None:
                try:
                    for i in range(16):  # the quota is seen a few seconds after it is passed
                        device.write(offset=i * MiB, data=b"\xee" * MiB)
                        device.flush()
                        threading.Event().wait(0.5)
                    outcome.append(None)
                except DeviceError as exc:
                    outcome.append(exc)

            worker = threading.Thread(target=fill, daemon=True)
            worker.start()
            worker.join(60)
            assert not worker.is_alive(), "a write to a full pool blocked"
            assert isinstance(outcome[0], DeviceError) and outcome[0].errno == Errno.ENOSPC, outcome
            buffer = bytearray(4096)
            device.read_into(offset=0, buffer=memoryview(buffer))  # reads still work
        finally:
            device.close()
        images.remove_all()
    finally:
        run(*ceph, "osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it")


def test_queue_depth_must_be_positive(rbd_images: RbdImages) -> None:
    image = rbd_images.new(MiB)
    with pytest.raises(RbdError, match="queue depth"):
        RbdDevice(parse_rbd_filename(rbd_images.filename(image)), queue_depth=0)


def test_connect_yields_the_pool(rbd_images: RbdImages) -> None:
    image = rbd_images.new(MiB)
    import rbd

    with connect(rbd_images.filename(image)) as (cluster, ioctx):
        assert ioctx.get_pool_name() == "rbd" and cluster.state == "connected"
        assert image in rbd.RBD().list(ioctx)
