"""The raw file device alone: zeroing fallbacks, cache modes and the non-blocking cached read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sendense_nbd import DeviceError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.storage import CacheMode
from sendense_nbd.storage.raw import RawDevice
from tests.conftest import random_file

MiB = 1 << 20


def _flags_of(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def test_zero_falls_back_to_writing_zeroes_and_fast_zero_says_enotsup(shm_image: Path) -> None:
    device = RawDevice(str(shm_image))
    try:
        with pytest.raises(DeviceError) as err:
            device.zero(offset=0, length=MiB, may_trim=False, fast=True)  # would need ZERO_RANGE
        assert err.value.errno == Errno.ENOTSUP
        assert shm_image.read_bytes()[:MiB] != bytes(MiB)  # a failed fast zero changed nothing
        device.zero(offset=0, length=MiB, may_trim=False)  # slow path: real zeroes
        device.zero(offset=2 * MiB, length=MiB, may_trim=True, fast=True)  # punching a hole is fast
        data = shm_image.read_bytes()
        assert data[:MiB] == bytes(MiB) and data[2 * MiB : 3 * MiB] == bytes(MiB)
        extents = device.extents(offset=0, length=4 * MiB)
        holes = [e for e in extents if e.hole]
        assert sum(e.length for e in holes) == MiB  # only the punched MiB is a hole
    finally:
        device.close()


def test_cache_modes_open_the_file_as_asked(tmp_path: Path) -> None:
    image = random_file(tmp_path / "d.raw", MiB)
    for mode, fd_flag in [(CacheMode.WRITETHROUGH, os.O_DSYNC), (CacheMode.NONE, os.O_DIRECT)]:
        device = RawDevice(str(image), cache=mode)
        try:
            fds = [device._fd, device._direct_fd]
            assert any(fd >= 0 and _flags_of(fd) & fd_flag for fd in fds), mode
            device.write(offset=4096, data=b"\x07" * 8192)  # aligned: O_DIRECT path under cache=none
            device.write(offset=5, data=b"\x08" * 10)  # unaligned: buffered path
            buf = bytearray(8192)
            device.read_into(offset=4096, buffer=memoryview(buf))
            assert buf == b"\x07" * 8192
            device.flush()
        finally:
            device.close()
        data = image.read_bytes()
        assert data[5:15] == b"\x08" * 10 and data[4096:12288] == b"\x07" * 8192


def test_read_cached_never_blocks_and_agrees_with_read_into(tmp_path: Path) -> None:
    image = random_file(tmp_path / "d.raw", 2 * MiB)
    device = RawDevice(str(image))
    try:
        cached = bytearray(MiB)
        device.read_into(offset=0, buffer=memoryview(bytearray(MiB)))  # now in the page cache
        assert device.read_cached(offset=0, buffer=memoryview(cached))
        assert cached == image.read_bytes()[:MiB]
    finally:
        device.close()
    direct = RawDevice(str(image), cache=CacheMode.NONE)
    try:
        assert not direct.read_cached(offset=0, buffer=memoryview(bytearray(4096)))  # O_DIRECT: never inline
    finally:
        direct.close()


class _WriteOutSpy:
    """Forwards to the C library and records each sync_file_range call (fd, offset, length, flags)."""

    def __init__(self, libc: object) -> None:
        self._libc = libc
        self.calls: list[tuple[int, int, int, int]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._libc, name)

    def sync_file_range(self, fd: int, offset: int, length: int, flags: int) -> int:
        self.calls.append((fd, offset, length, flags))
        return self._libc.sync_file_range(fd, offset, length, flags)  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("cache", list(CacheMode))
def test_writeback_cache_starts_write_out_as_data_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: CacheMode
) -> None:
    """With cache=writeback, every WRITEBACK_EVERY bytes of buffered writes start the file's write-out
    (without waiting), so a later FLUSH finds little left; the other modes never do; data stays intact."""
    from sendense_nbd.storage import raw

    spy = _WriteOutSpy(raw._libc)
    monkeypatch.setattr(raw, "_libc", spy)
    path = tmp_path / "disk.img"
    size = 3 * raw.WRITEBACK_EVERY
    path.write_bytes(b"")
    os.truncate(path, size)
    payload = os.urandom(MiB + 512)  # unaligned, so cache=none writes it through the buffered descriptor too
    device = RawDevice(str(path), cache=cache)
    try:
        for offset in range(0, size - len(payload), len(payload)):
            device.write(offset=offset, data=payload)
        written = (size - len(payload)) // len(payload) * len(payload)
        device.flush()
        if cache is CacheMode.WRITEBACK:
            assert len(spy.calls) == written // raw.WRITEBACK_EVERY >= 2
            assert all(call == (device._fd, 0, 0, raw._SYNC_FILE_RANGE_WRITE) for call in spy.calls)
        else:
            assert spy.calls == []
        check = bytearray(len(payload))
        device.read_into(offset=written - len(payload), buffer=memoryview(check))
        assert check == payload
    finally:
        device.close()
