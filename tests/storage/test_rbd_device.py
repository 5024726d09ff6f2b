"""The RBD device against the real test cluster: data, zeroes, block status, snapshots, clones, errors.

What the device reads and writes is checked against qemu's rbd driver (qemu-img convert) and
``rbd diff``, never against itself alone.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.copy import open_source, open_target
from sendense_nbd.errors import DeviceError, ImageError, RbdError, RbdNotFound, RbdPermissionDenied, RbdSpecError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.storage import CacheMode, open_image
from sendense_nbd.storage.images import create_image
from sendense_nbd.storage.rbd import (
    CLOSE_GRACE,
    RbdDevice,
    connect,
    create_rbd,
    open_rbd,
    opened_image,
    parse_rbd_filename,
    rbd_exists,
    settle,
)
from tests.conftest import run
from tests.storage.rbd_images import MiB, RbdImages, data_runs, quota_pool, rbd_images, set_quota

pytestmark = pytest.mark.peer
__all__ = ["rbd_images"]  # the fixture, imported for pytest


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_reads_and_writes_match_qemus_view(rbd_images: RbdImages, tmp_path: Path) -> None:
    """Unaligned and object-crossing requests, small and large (reads: blocking calls and aio parts), from
    many threads."""
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


def test_a_writers_buffer_is_free_once_the_write_returns(rbd_images: RbdImages) -> None:
    """Writes are zero-copy (librbd reads the caller's buffer): once one returns, overwriting its buffer
    changes nothing stored, for a whole bytearray, a view of one, and a view of a part (copied first)."""
    image = rbd_images.new(24 * MiB)
    device = open_rbd(rbd_images.filename(image))
    whole, viewed, backing = bytearray(b"\x51" * 9 * MiB), bytearray(b"\x52" * MiB), bytearray(b"\x53" * 2 * MiB)
    try:
        device.write(offset=MiB, data=whole)  # object-crossing: librbd splits it
        device.write(offset=12 * MiB, data=memoryview(viewed))
        device.write(offset=16 * MiB, data=memoryview(backing)[MiB:])
        for buffer in (whole, viewed, backing):
            buffer[:] = bytes(len(buffer))
        device.flush()
    finally:
        device.close()
    checks = ["read -P 0x51 1M 9M", "read -P 0x52 12M 1M", "read -P 0x53 16M 1M", "read -P 0 17M 1M"]
    out = run("qemu-io", "-f", "raw", "-r", *[a for c in checks for a in ("-c", c)], rbd_images.filename(image))
    assert "Pattern verification failed" not in out.stdout, out.stdout


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
        with pytest.raises(RbdPermissionDenied, match="profile rbd pool=rbd'"):
            open_rbd(name)
        spec = parse_rbd_filename(name)
        assert spec.user == user and spec.keyring == str(keyring)
        # in a namespace: librbd's own check of the namespace is denied too, and the caps name it
        in_namespace = f"rbd:rbd/ns1/{image}:conf={ceph_cluster.conf}:id={user}:keyring={keyring}"
        with pytest.raises(RbdPermissionDenied, match="profile rbd pool=rbd namespace=ns1'"):
            open_rbd(in_namespace)
        # a key the monitors do not know is not a matter of caps
        wrong = tmp_path / "wrong.keyring"
        key = run("ceph-authtool", "--gen-print-key").stdout.strip()
        run("ceph-authtool", "--create-keyring", str(wrong), "--name", f"client.{user}", "--add-key", key)
        with pytest.raises(RbdPermissionDenied, match=f"the monitors refused client.{user}'s key") as refused:
            open_rbd(name.replace(str(keyring), str(wrong)))
        assert "caps" not in str(refused.value)
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


#: Ceph options that would turn librbd's cache back on (and its early answers to writes): a name cannot.
_CACHE_ON = ":rbd_cache=true:rbd_cache_policy=writearound:rbd_cache_writethrough_until_flush=false"


@pytest.mark.parametrize("mode", list(CacheMode))
def test_a_write_the_full_pool_refused_fails_the_next_flush(ceph_cluster: Any, mode: CacheMode) -> None:
    """Quota, write, sleep, flush: the flush fails with ENOSPC, and every write a flush confirmed is stored.

    With librbd's cache on (Ceph 16 write-around) the write was answered at once, its failure met in the
    background, and the flush after the sleep answered with success while the data was lost."""
    with quota_pool(ceph_cluster, f"quota-flush-{mode.value}") as images:
        image = images.new(64 * MiB)
        set_quota(images, MiB)
        device = open_image(images.filename(image) + _CACHE_ON, cache=mode, trusted=True)
        confirmed, refused = [], None
        try:
            for i in range(8):  # an object each (8 MiB apart): the quota is seen a few seconds after it is passed
                try:
                    device.write(offset=i * 8 * MiB, data=bytes([0x40 + i]) * MiB)
                except DeviceError as exc:
                    assert exc.errno == Errno.ENOSPC, exc
                time.sleep(1.5)  # a cache would write it out now, and keep the failure from the flush
                try:
                    device.flush()
                except DeviceError as exc:
                    refused = exc
                    break
                confirmed.append(i)
        finally:
            device.close()
        assert refused is not None and refused.errno == Errno.ENOSPC, confirmed
        set_quota(images, 0)
        stored = images.diff(image)  # the object map marks an object before its write, even a refused one
        assert all((i * 8 * MiB, 4 * MiB) in stored for i in confirmed), (confirmed, stored)
        reads = [a for i in confirmed for a in ("-c", f"read -P {0x40 + i} {i * 8}M 1M")]
        lost = len(confirmed) * 8  # the write the flush reported: not stored
        out = run("qemu-io", "-f", "raw", "-r", images.filename(image), *reads, "-c", f"read -P 0 {lost}M 1M").stdout
        assert "Pattern verification failed" not in out
        images.remove_all()


def test_every_wait_has_a_timeout_and_the_cache_stays_off(rbd_images: RbdImages) -> None:
    """Ceph's op timeouts default to 0 (never): a device sets 60 s unless the name or conf gives one, and no
    name turns librbd's cache back on."""
    base = rbd_images.filename(rbd_images.new(MiB))
    cases = {"": ("60", "60"), ":rados_osd_op_timeout=0:rados_mon_op_timeout=7": ("60", "7")}
    for suffix, (osd, mon) in cases.items():
        with connect(base + suffix + _CACHE_ON) as (cluster, _):
            assert float(cluster.conf_get("rados_osd_op_timeout")) == float(osd)
            assert float(cluster.conf_get("rados_mon_op_timeout")) == float(mon)
            assert cluster.conf_get("rbd_cache") == "false"


def _bounded(call: Any, seconds: float) -> BaseException | None:
    """Run ``call`` in a thread; what it raised (None: nothing). Fails the test if it is still running."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still waiting after {seconds} s"
    return outcome[0]


def test_requests_to_paused_osds_fail_in_the_op_timeout(rbd_images: RbdImages, ceph_cluster: Any) -> None:
    """``ceph osd pause``: no OSD serves a request. Each one fails with EIO after the op timeout (2 s
    here), blocking calls and aio parts alike, instead of waiting for ever; then the device goes on."""
    image = rbd_images.new(16 * MiB)
    device = open_rbd(rbd_images.filename(image) + ":rados_osd_op_timeout=2")
    small, large = bytearray(4096), bytearray(9 * MiB)
    device.write(offset=0, data=b"\x01" * MiB)
    run("ceph", *ceph_cluster.client_args(), "osd", "pause")
    try:
        for _ in range(10):  # until the client's map has the pause flags (a moment)
            if _bounded(lambda: device.read_into(offset=0, buffer=memoryview(small)), 10) is not None:
                break
        requests = {
            "read": lambda: device.read_into(offset=0, buffer=memoryview(small)),
            "read in parts": lambda: device.read_into(offset=0, buffer=memoryview(large)),
            "write": lambda: device.write(offset=0, data=b"\x02" * 4096),
            "write in parts": lambda: device.write(offset=0, data=bytes(9 * MiB)),
        }
        for what, request in requests.items():
            started = time.monotonic()
            failed = _bounded(request, 20)
            assert isinstance(failed, DeviceError) and failed.errno == Errno.EIO, (what, failed)
            assert "timeout" in str(failed).lower() or "ETIMEDOUT" in str(failed), failed
            assert time.monotonic() - started < 10, what
    finally:
        run("ceph", *ceph_cluster.client_args(), "osd", "unpause")
    try:
        assert _bounded(lambda: device.read_into(offset=0, buffer=memoryview(small)), 60) is None
        assert small == b"\x01" * 4096
    finally:
        device.close()


def test_a_failing_aio_part_fails_its_request_and_frees_its_slot(rbd_images: RbdImages) -> None:
    """A part whose completion cannot be delivered (a read-only buffer here) fails the request with EIO;
    before, the exception stayed in python-rbd and the request waited for ever."""
    image = rbd_images.new(16 * MiB)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x6b 0 9M", rbd_images.filename(image))
    device = RbdDevice(parse_rbd_filename(rbd_images.filename(image)), queue_depth=2)
    try:
        for _ in range(3):  # more than the slots: a failed part gives its slot back
            failed = _bounded(lambda: device.read_into(offset=0, buffer=memoryview(bytes(9 * MiB))), 30)
            assert isinstance(failed, DeviceError) and failed.errno == Errno.EIO, failed
        buffer = bytearray(9 * MiB)
        assert _bounded(lambda: device.read_into(offset=0, buffer=memoryview(buffer)), 30) is None
        assert buffer == b"\x6b" * (9 * MiB)
    finally:
        device.close()


def test_names_from_api_callers_carry_no_arbitrary_ceph_options(rbd_images: RbdImages, tmp_path: Path) -> None:
    """``admin_socket`` would make Ceph unlink a file of the caller's choice: refused unless the operator
    named the image (``trusted=True``: the command line)."""
    image = rbd_images.new(MiB)
    stale = tmp_path / "stale"
    stale.write_text("not a socket")
    name = rbd_images.filename(image) + f":admin_socket={stale}"
    openers = {
        "open_image": lambda: open_image(name),
        "open_source": lambda: asyncio.run(open_source(name)),
        "open_target": lambda: asyncio.run(open_target(name)),
    }
    for what, opener in openers.items():
        with pytest.raises(RbdSpecError, match=r"Ceph options \['admin_socket'\] are not accepted here"):
            opener()
        assert stale.read_text() == "not a socket", what
    open_image(rbd_images.filename(image)).close()  # conf, id and keyring: what the hub's names carry
    open_image(name, trusted=True).close()


def test_read_only_images_close_after_a_grace_writable_ones_at_once(rbd_images: RbdImages) -> None:
    """A read-only image stays open CLOSE_GRACE seconds after its user let go (librbd may still be finishing
    the open in one of its threads); a writable one closes at once, its watch gone for the next user."""
    import rbd

    image = rbd_images.new(MiB)
    with connect(rbd_images.filename(image)) as (_, ioctx):
        with opened_image(ioctx, image) as writable:
            writable.write(b"written", 0)
        with pytest.raises(rbd.InvalidArgument, match="closed"):
            writable.size()
        assert "Watchers: none" in rbd_images.rbd("status", rbd_images.spec(image))
        let_go = time.monotonic()
        with opened_image(ioctx, image, read_only=True) as read_only:
            pass
        assert read_only.read(0, 7) == b"written"  # still open
        assert settle(timeout=30)
        assert time.monotonic() - let_go >= CLOSE_GRACE * 0.9
        with pytest.raises(rbd.InvalidArgument, match="closed"):
            read_only.size()
