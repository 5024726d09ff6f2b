"""``sendense-nbd serve rbd:...`` and ``sendense-nbd copy`` with RBD images, against real peers.

Our server's view of an image is compared with qemu's rbd driver reading the same image
(qemu-img convert/compare, qemu-io with ``rbd:``), read by nbdinfo, nbdcopy and qemu; block
status with ``rbd diff``; copies in every direction are compared the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import nbd
import pytest

from sendense_nbd.client import NBDRequestError, connect
from sendense_nbd.protocol.constants import Errno
from tests.conftest import random_file, run, server_command, sparse_file, wait_gone
from tests.storage.rbd_images import MiB, RbdImages, merge_runs, quota_pool, rbd_images, set_quota

pytestmark = pytest.mark.peer
__all__ = ["rbd_images"]  # the fixture, imported for pytest


def _map(uri: str) -> list[tuple[int, int]]:
    """nbdinfo's ``base:allocation`` data runs (merged)."""
    entries = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    return merge_runs((e["offset"], e["length"]) for e in entries if not e["type"] & 1)  # type bit 0: a hole


def _copy(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*server_command("copy", *args), check=check)


def test_served_image_reads_as_qemu_reads_it(rbd_images: RbdImages, serve: Any, tmp_path: Path) -> None:
    image = rbd_images.new(40 * MiB)
    source = sparse_file(tmp_path / "src.raw", 40 * MiB, [(0, 3 * MiB), (9 * MiB + 7, 5 * MiB), (36 * MiB, 4 * MiB)])
    rbd_images.fill(image, source)
    server = serve("-f", "raw", "-r", "-e", "4", "-t", rbd_images.filename(image))
    info = json.loads(run("nbdinfo", "--json", server.uri).stdout)["exports"][0]
    assert info["export-size"] == 40 * MiB and info["is_read_only"] and info["can_multi_conn"]
    assert info["block_size_preferred"] == 4 * MiB  # the object size: clients that follow it send fewer requests
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", server.qemu_uri, rbd_images.filename(image))
    run("nbdcopy", server.uri, str(tmp_path / "nbdcopy.raw"))
    qemu_view = rbd_images.export(image, tmp_path / "qemu.raw").read_bytes()
    assert (tmp_path / "nbdcopy.raw").read_bytes() == qemu_view == source.read_bytes()
    assert _map(server.uri) == rbd_images.diff(image) == [(0, 4 * MiB), (8 * MiB, 8 * MiB), (36 * MiB, 4 * MiB)]
    assert server.stop() == 0


def _qemu_io(target: str, *commands: str, read_only: bool = False) -> str:
    """``qemu-io -f raw [-r] TARGET -c CMD ...``; its stdout (fails on a failed command or pattern)."""
    args = [a for command in commands for a in ("-c", command)]
    out = run("qemu-io", "-f", "raw", *(["-r"] if read_only else []), target, *args).stdout
    assert "Pattern verification failed" not in out, out
    return out


def test_writes_through_the_server_read_back_by_qemu(rbd_images: RbdImages, serve: Any, tmp_path: Path) -> None:
    image = rbd_images.new(32 * MiB)
    server = serve("-f", "raw", "-e", "4", "-t", rbd_images.filename(image))
    data = random_file(tmp_path / "data.raw", 32 * MiB, seed=7)
    run("nbdcopy", "--flush", str(data), server.uri)
    _qemu_io(server.qemu_uri, "write -P 0x3c 5M 1M", "write -z 8M 4M", "discard 16M 4M", "flush")
    expected = bytearray(data.read_bytes())
    expected[5 * MiB : 6 * MiB] = b"\x3c" * MiB
    expected[8 * MiB : 12 * MiB] = bytes(4 * MiB)  # the discard is a no-op under --discard ignore (qemu-nbd's)
    _qemu_io(rbd_images.filename(image), "read -P 0x3c 5M 1M", "read -P 0 8M 4M", read_only=True)
    assert rbd_images.export(image, tmp_path / "qemu.raw").read_bytes() == expected
    assert _map(server.uri) == rbd_images.diff(image) == [(0, 32 * MiB)]  # nothing was freed
    server.stop()
    # under --discard unmap, zeroing may free whole objects and TRIM discards them: block status follows rbd diff
    unmap = serve("-f", "raw", "-t", "--discard", "unmap", rbd_images.filename(image))
    _qemu_io(unmap.qemu_uri, "write -z -u 8M 4M", "discard 16M 4M", "flush")
    assert _map(unmap.uri) == rbd_images.diff(image) == [(0, 8 * MiB), (12 * MiB, 4 * MiB), (20 * MiB, 12 * MiB)]
    expected[16 * MiB : 20 * MiB] = bytes(4 * MiB)
    assert rbd_images.export(image, tmp_path / "qemu.raw").read_bytes() == expected
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", unmap.qemu_uri, str(tmp_path / "qemu.raw"))
    assert unmap.stop() == 0  # closes the image: a killed server's watch would hold `rbd rm` for 30 s


def test_snapshot_served_read_only(rbd_images: RbdImages, serve: Any, tmp_path: Path) -> None:
    image = rbd_images.new(8 * MiB)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x71 0 8M", rbd_images.filename(image))
    rbd_images.snapshot(image, "before")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x72 0 1M", rbd_images.filename(image))
    snapshot = rbd_images.filename(image, snapshot="before")
    refused = run(*server_command("serve", "-p", "0", snapshot), check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith(
        f"rbd:rbd/{image}@before: rbd snapshots are read-only; open one read-only (serve -r)"
    )
    server = serve("-r", "-t", snapshot)
    assert json.loads(run("nbdinfo", "--json", server.uri).stdout)["exports"][0]["is_read_only"]
    write = run("qemu-io", "-f", "raw", server.qemu_uri, "-c", "write 0 4k", check=False)
    assert write.returncode == 1 and "Permission denied" in write.stderr  # qemu will not open it for writing
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", server.qemu_uri, snapshot)
    run("nbdcopy", server.uri, str(tmp_path / "snap.raw"))
    assert (tmp_path / "snap.raw").read_bytes() == b"\x71" * (8 * MiB)
    assert server.stop() == 0


def test_json_filename_and_several_exports(rbd_images: RbdImages, serve: Any, ceph_cluster: Any) -> None:
    first, second = rbd_images.new(4 * MiB), rbd_images.new(6 * MiB)
    spec = {"driver": "rbd", "pool": "rbd", "image": second, "conf": ceph_cluster.conf, "user": "admin"}
    server = serve("-f", "raw", "-r", "-e", "2", "-t", rbd_images.filename(first), "json:" + json.dumps(spec))
    listed = json.loads(run("nbdinfo", "--list", "--json", server.uri).stdout)["exports"]
    assert {(e["export-name"], e["export-size"]) for e in listed} == {("", 4 * MiB), (second, 6 * MiB)}
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri_for(second), rbd_images.filename(second))
    assert server.stop() == 0


def test_fork_opens_the_image_in_the_child(rbd_images: RbdImages, tmp_path: Path) -> None:
    """librados does not survive a fork: the image is opened after it, and a failure still reaches stderr."""
    image = rbd_images.new(4 * MiB)
    sock, pid_file = tmp_path / "s.sock", tmp_path / "pid"
    run(*server_command("serve", "--fork", "--pid-file", str(pid_file), "-k", str(sock), rbd_images.filename(image)))
    pid = int(pid_file.read_text())
    try:
        run("qemu-io", "-f", "raw", f"nbd:unix:{sock}", "-c", "write -P 0x44 0 64k")
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 30) and not pid_file.exists()  # it closed the image (and its watch) and left
    out = run("qemu-io", "-f", "raw", "-r", rbd_images.filename(image), "-c", "read -P 0x44 0 64k").stdout
    assert "Pattern verification failed" not in out
    failed = run(
        *server_command("serve", "--fork", "-k", str(tmp_path / "t.sock"), rbd_images.filename("gone")), check=False
    )
    assert failed.returncode == 1 and "image rbd:rbd/gone: not found" in failed.stderr


def test_copy_file_to_rbd_and_back(rbd_images: RbdImages, tmp_path: Path) -> None:
    source = sparse_file(tmp_path / "src.raw", 24 * MiB, [(MiB, 2 * MiB), (17 * MiB, 3 * MiB + 5)])
    name = f"copied-{rbd_images.new(MiB)}"
    rbd_images.made.append(name)
    target = rbd_images.filename(name)
    out = _copy(str(source), target)  # a missing RBD target is created with the source's size
    assert "fresh target" in out.stderr
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), target)
    assert json.loads(rbd_images.rbd("info", "--format", "json", f"rbd/{name}"))["size"] == 24 * MiB
    assert rbd_images.diff(name) == [(0, 4 * MiB), (16 * MiB, 8 * MiB)]  # holes stay holes
    back = tmp_path / "back.raw"
    _copy("-f", "raw", "--verify", target, str(back))
    assert back.read_bytes() == source.read_bytes()
    # an existing target is written as it is (qemu-img convert -n): old data under the source's zeroes goes
    run("qemu-io", "-f", "raw", "-c", "write -P 0x99 8M 4M", target)
    out = _copy(str(source), target)
    assert "raw target" in out.stderr
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), target)


def test_copy_from_a_snapshot_and_from_nbd_into_rbd(rbd_images: RbdImages, serve: Any, tmp_path: Path) -> None:
    origin = rbd_images.new(16 * MiB)
    rbd_images.fill(origin, random_file(tmp_path / "origin.raw", 16 * MiB, seed=3))
    rbd_images.snapshot(origin, "p1")
    run("qemu-io", "-f", "raw", "-c", "write -P 0 0 16M", rbd_images.filename(origin))
    twin = f"twin-{origin}"
    rbd_images.made.append(twin)
    _copy("--verify", rbd_images.filename(origin, snapshot="p1"), rbd_images.filename(twin))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "origin.raw"), rbd_images.filename(twin))
    exported = serve("-f", "raw", "-r", "-e", "4", "-t", str(tmp_path / "origin.raw"))
    third = rbd_images.new(16 * MiB)
    _copy("-C", "4", exported.uri, rbd_images.filename(third))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", exported.qemu_uri, rbd_images.filename(third))
    assert exported.stop() == 0


def test_copy_refuses_what_cannot_be(rbd_images: RbdImages, tmp_path: Path) -> None:
    small = rbd_images.new(MiB)
    source = random_file(tmp_path / "src.raw", 2 * MiB)
    cases = [
        ((str(source), rbd_images.filename(small)), "is smaller than the source"),
        ((rbd_images.filename("absent"), str(tmp_path / "x.raw"), "-f", "raw"), "image rbd:rbd/absent: not found"),
        ((str(source), rbd_images.filename(small, snapshot="s")), "a snapshot cannot be a copy target"),
        ((str(source), rbd_images.filename(small), "-f", "qcow2"), "an RBD target is raw, not qcow2"),
        ((str(source), "rbd:rbd"), "a pool name is required"),
        ((str(source), "rbd:no-pool/x:conf=/etc/nonexistent.conf"), "cannot read the Ceph configuration"),
    ]
    for args, message in cases:
        result = _copy(*args, check=False)
        assert result.returncode == 1, args
        lines = result.stderr.strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("sendense-nbd copy: error:"), result.stderr


def test_serve_refuses_bad_names_in_one_line(rbd_images: RbdImages) -> None:
    image = rbd_images.new(MiB)
    cases = {
        rbd_images.filename("absent"): "image rbd:rbd/absent: not found",
        rbd_images.filename(image).replace("rbd:rbd/", "rbd:nopool/"): "pool 'nopool': not found",
        "rbd:rbd/": "the image name is empty",
        rbd_images.filename(image) + ":bogus_option=1": "Ceph option bogus_option=",
    }
    for name, message in cases.items():
        result = run(*server_command("serve", "-p", "0", name), check=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
    qcow2 = run(*server_command("serve", "-p", "0", "-f", "qcow2", rbd_images.filename(image)), check=False)
    assert qcow2.returncode == 1 and "an RBD image is raw (-f raw), not qcow2" in qcow2.stderr


def _fill_until_a_flush_fails(write: Any, flush: Any) -> tuple[list[int], BaseException]:
    """Quota, write, sleep, flush: 1 MiB in a new object (8 MiB apart) each round, until a FLUSH fails;
    the rounds whose FLUSH succeeded, and that failure."""
    confirmed = []
    for i in range(8):
        with contextlib.suppress(nbd.Error, NBDRequestError):  # the write may fail at once: its flush must too
            write(bytes([0x50 + i]) * MiB, i * 8 * MiB)
        time.sleep(1.5)  # librbd's cache wrote it out in the background here, and kept the failure
        try:
            flush()
        except (nbd.Error, NBDRequestError) as exc:
            return confirmed, exc
        confirmed.append(i)
    raise AssertionError(f"every flush succeeded on a pool over its quota: {confirmed}")


def _assert_stored(images: RbdImages, image: str, confirmed: list[int]) -> None:
    """What a FLUSH confirmed reads back through qemu's rbd driver; the write the failed FLUSH reported does not."""
    reads = [a for i in confirmed for a in ("-c", f"read -P {0x50 + i} {i * 8}M 1M")]
    lost = f"read -P 0 {len(confirmed) * 8}M 1M"
    out = run("qemu-io", "-f", "raw", "-r", images.filename(image), *reads, "-c", lost).stdout
    assert "Pattern verification failed" not in out, out


def test_a_full_pool_fails_the_flush_of_nbd_clients(ceph_cluster: Any, serve: Any) -> None:
    """Through the server, read by libnbd (as nbdsh) and by our client: a FLUSH after the pool refused a write
    is ENOSPC, never success; what a FLUSH confirmed is stored."""
    with quota_pool(ceph_cluster, "quota-serve") as images:
        first, second = images.new(64 * MiB), images.new(64 * MiB)
        set_quota(images, MiB)
        server = serve("-f", "raw", "-e", "2", "-t", images.filename(first), images.filename(second))
        handle = nbd.NBD()
        handle.connect_uri(server.uri)
        confirmed, failure = _fill_until_a_flush_fails(handle.pwrite, handle.flush)
        assert isinstance(failure, nbd.Error) and failure.errno == "ENOSPC", failure  # libnbd names it
        handle.shutdown()

        async def ours() -> tuple[list[int], BaseException]:
            async with connect(server.uri_for(second)) as client:
                loop = asyncio.get_running_loop()

                def write(data: bytes, offset: int) -> None:
                    asyncio.run_coroutine_threadsafe(client.pwrite(data, offset=offset), loop).result(30)

                def flush() -> None:
                    asyncio.run_coroutine_threadsafe(client.flush(), loop).result(30)

                return await asyncio.to_thread(_fill_until_a_flush_fails, write, flush)

        ours_confirmed, failure = asyncio.run(ours())
        assert isinstance(failure, NBDRequestError) and failure.errno == Errno.ENOSPC, failure
        assert server.stop() == 0
        set_quota(images, 0)  # qemu's rbd driver (no full-try) would wait for space to open the image
        _assert_stored(images, first, confirmed)
        _assert_stored(images, second, ours_confirmed)
        images.remove_all()


def test_serve_closes_every_image_and_tells_each_failure_in_one_line(rbd_images: RbdImages, serve: Any) -> None:
    """The cluster refuses the server (both connections blocklisted): SIGTERM still closes both images, and
    exit 1 names both final flushes in one line, without a traceback."""
    first, second = rbd_images.new(4 * MiB), rbd_images.new(4 * MiB)
    server = serve("-f", "raw", "-e", "2", "-t", rbd_images.filename(first), rbd_images.filename(second))
    watchers = [
        json.loads(rbd_images.rbd("status", "--format", "json", rbd_images.spec(image)))["watchers"][0]["address"]
        for image in (first, second)
    ]
    ceph = ("ceph", *rbd_images.cluster.client_args())
    for address in watchers:
        run(*ceph, "osd", "blocklist", "add", address, "600")
    try:
        assert server.stop() == 1
        stderr = server.stderr()
        assert "Traceback" not in stderr, stderr
        last = stderr.strip().splitlines()[-1]  # before it, the server's log of the exports' own final flush
        assert last.startswith("Error: close rbd:rbd/"), stderr
        for image in (first, second):
            assert f"close rbd:rbd/{image}: the final flush" in last, stderr
    finally:
        for address in watchers:
            run(*ceph, "osd", "blocklist", "rm", address)
