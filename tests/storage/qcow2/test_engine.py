"""The qcow2 engine's metadata cache and allocator, judged by qemu-img on the files they write.

* Tables reach the disk only at a flush: before it, the image on disk is still
  the one it was (qemu reads the old content and checks it clean); after it,
  qemu reads the new content.
* The allocator grows the refcount table (moving it to the end of the file)
  and frees the old one, leaving no leak; freed clusters (discarded, or
  compressed ones rewritten) lose their references at the flush.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sendense_nbd.storage.checked import CheckedDevice
from sendense_nbd.storage.qcow2 import Qcow2Device, create_qcow2
from sendense_nbd.storage.qcow2 import format as fmt
from tests.storage.qcow2.test_qcow2_interop import assert_qemu_check, qemu_img, qemu_read

pytestmark = pytest.mark.peer

KiB = 1 << 10
MiB = 1 << 20


def header_of(path: Path) -> fmt.Header:
    with open(path, "rb") as f:
        return fmt.parse_header(f.read(1 << fmt.MAX_CLUSTER_BITS))


def test_tables_reach_the_disk_only_at_flush(tmp_path: Path) -> None:
    path = tmp_path / "image.qcow2"
    create_qcow2(str(path), 8 * MiB, cluster_size=64 * KiB)
    data = os.urandom(MiB + 4 * KiB)
    device = CheckedDevice(Qcow2Device(str(path)))
    try:
        device.write(offset=3 * MiB - 2 * KiB, data=data)
        device.zero(offset=6 * MiB, length=64 * KiB)
        assert qemu_read(path) == bytes(8 * MiB), "qemu sees writes whose tables were not flushed yet"
        assert_qemu_check(path)  # the data clusters at the end of the file are simply not referenced yet
        device.flush()
        expected = bytearray(8 * MiB)
        expected[3 * MiB - 2 * KiB : 3 * MiB - 2 * KiB + len(data)] = data
        assert qemu_read(path) == expected
        assert_qemu_check(path)
    finally:
        device.close()


def test_data_write_out_starts_as_data_arrives_and_tables_still_wait_for_the_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every WRITEBACK_EVERY bytes of data start the file's write-out (not waited for); the
    tables still reach the disk only at the flush, so the image stays consistent meanwhile."""
    from sendense_nbd.storage import raw

    calls: list[tuple[int, int, int, int]] = []
    real = raw._libc

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def sync_file_range(self, fd: int, offset: int, length: int, flags: int) -> int:
            calls.append((fd, offset, length, flags))
            return real.sync_file_range(fd, offset, length, flags)  # type: ignore[no-any-return]

    monkeypatch.setattr(raw, "_libc", Spy())
    path = tmp_path / "image.qcow2"
    size = 2 * raw.WRITEBACK_EVERY + 4 * MiB
    create_qcow2(str(path), size, cluster_size=64 * KiB)
    data = os.urandom(2 * raw.WRITEBACK_EVERY + MiB)
    device = CheckedDevice(Qcow2Device(str(path)))
    try:
        for start in range(0, len(data), MiB):
            device.write(offset=MiB + start, data=data[start : start + MiB])
        assert len(calls) == 2 and all(call[1:] == (0, 0, raw._SYNC_FILE_RANGE_WRITE) for call in calls)
        assert qemu_read(path) == bytes(size), "qemu sees writes whose tables were not flushed yet"
        assert_qemu_check(path)
        device.flush()
        assert qemu_read(path) == bytes(MiB) + data + bytes(size - MiB - len(data))
        assert_qemu_check(path)
    finally:
        device.close()


def test_refcount_table_grows_and_the_old_one_is_freed(tmp_path: Path) -> None:
    # 512-byte clusters: a refcount block covers 256 clusters (128 KiB of file) and the first
    # table's 64 entries 8 MiB, so 12 MiB of data outgrows it and it moves, more than once.
    path = tmp_path / "small-clusters.qcow2"
    create_qcow2(str(path), 32 * MiB, cluster_size=512)
    before = header_of(path)
    data = os.urandom(12 * MiB)
    device = CheckedDevice(Qcow2Device(str(path)))
    try:
        for offset in range(0, len(data), MiB):
            device.write(offset=offset, data=data[offset : offset + MiB])
        device.flush()
    finally:
        device.close()
    after = header_of(path)
    assert after.refcount_table_offset > before.refcount_table_offset
    assert after.refcount_table_clusters > before.refcount_table_clusters
    report = json.loads(qemu_img("check", "--output=json", path).stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    assert qemu_read(path)[: len(data)] == data


def test_discarded_and_rewritten_compressed_clusters_are_freed(tmp_path: Path) -> None:
    raw = tmp_path / "source.raw"
    raw.write_bytes(os.urandom(4 * MiB))
    path = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, path)
    device = CheckedDevice(Qcow2Device(str(path)))
    try:
        device.write(offset=100 * KiB, data=b"\x5a" * 1000)  # a partial rewrite of a compressed cluster
        device.trim(offset=2 * MiB, length=MiB)  # whole clusters
        device.flush()
    finally:
        device.close()
    report = json.loads(qemu_img("check", "--output=json", path).stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    expected = bytearray(raw.read_bytes())
    expected[100 * KiB : 100 * KiB + 1000] = b"\x5a" * 1000
    expected[2 * MiB : 3 * MiB] = bytes(MiB)
    assert qemu_read(path) == expected
