"""The copy engine against real peers: nbdkit, qemu-nbd and our server.

Results are judged by independent tools: ``nbdcopy`` dumps both sides
byte for byte, ``nbdinfo --map`` shows the target's allocation, and
``qemu-img compare`` checks overlays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.copy import (
    CopyOptions,
    CopyResult,
    Endpoint,
    OverlayZeroes,
    Progress,
    TargetMode,
    copy,
    copy_between,
    merge_areas,
    open_source,
    open_target,
    probe_target_mode,
)
from sendense_nbd.errors import CopyError, VerifyError
from sendense_nbd.storage import ImageFormat
from tests.conftest import random_file, require, run, sparse_file
from tests.copy.conftest import TCPServer, data_ranges, dump, free_port, nbdinfo_map
from tests.peers import Processes

pytestmark = pytest.mark.peer

MiB = 1 << 20
SPARSE_RANDOM = ("sparse-random", "size=32M", "seed=4242", "percent=30", "runlength=262144")


async def copy_uris(
    src: str,
    dst: str,
    *,
    fmt: ImageFormat | None = None,
    changed_areas: list[tuple[int, int]] | None = None,
    progress: Callable[[Progress], None] | None = None,
    **options: Any,
) -> CopyResult:
    return await copy_between(src, dst, CopyOptions(**options), fmt=fmt, changed_areas=changed_areas, progress=progress)


def same_bytes(a: Path, b: Path) -> None:
    run("cmp", str(a), str(b))


def inside(ranges: list[tuple[int, int]], allowed: list[tuple[int, int]], grain: int) -> None:
    """Every range lies within ``allowed`` widened to ``grain`` (the target's allocation unit)."""
    wide: list[tuple[int, int]] = []
    for o, n in sorted(allowed):
        start, end = o // grain * grain, -(-(o + n) // grain) * grain
        if wide and start <= wide[-1][1]:
            wide[-1] = (wide[-1][0], max(end, wide[-1][1]))
        else:
            wide.append((start, end))
    for offset, length in ranges:
        assert any(s <= offset and offset + length <= e for s, e in wide), f"({offset}, {length}) allocated for zeroes"


def empty_image(path: Path, fmt: str, size: str = "32M", *extra: str) -> Path:
    """A new image; raw ones by truncate (qemu-img allocates a raw file's first block)."""
    if fmt == "raw" and not extra:
        return sparse_file(path, int(size[:-1]) * MiB, [])
    run(require("qemu-img"), "create", "-q", "-f", fmt, *extra, str(path), size)
    return path


@pytest.mark.parametrize("target", ["qemu-nbd-raw", "qemu-nbd-qcow2", "ours-raw", "ours-qcow2", "local-qcow2"])
async def test_full_copy_from_sparse_random(target: str, tmp_path: Path, nbdkit, qemu_nbd, ours) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit(*SPARSE_RANDOM)
    fmt = target.rsplit("-", 1)[1]
    image = empty_image(tmp_path / f"dst.{fmt}", fmt)
    if target.startswith("qemu-nbd"):
        dst = qemu_nbd(image, fmt=fmt)
    elif target.startswith("ours"):
        dst = ours(image, fmt=fmt)
    else:
        dst = str(image)
    result = await copy_uris(src, dst, fmt=ImageFormat(fmt), connections=2, requests=8, request_size=MiB)
    assert result.flushed and result.target_mode is TargetMode.FRESH
    source_data = data_ranges(src)
    data_bytes = sum(n for _, n in source_data)
    assert result.copied == data_bytes and result.skipped == 32 * MiB - data_bytes and result.zeroed == 0
    check = dst if not target.startswith("local") else ours(image, fmt=fmt)
    same_bytes(dump(src, tmp_path / "src.raw"), dump(check, tmp_path / "check.raw"))
    inside(data_ranges(check), source_data, 65536 if fmt == "qcow2" else 4096)


async def test_zero_data_becomes_holes_and_rate_counts_only_data(tmp_path: Path, nbdkit, ours) -> None:  # type: ignore[no-untyped-def]
    # nbdkit data reports everything as data, so only zero detection finds the zeroes.
    src = nbdkit("data", "data=@0 ( 0x55 )*1048576 ( 0 )*2097152 ( 0xaa )*1048576 @7340032 ( 0 )*1048576", "size=8M")
    image = empty_image(tmp_path / "dst.raw", "raw", "8M")
    dst = ours(image)
    events: list[Progress] = []
    result = await copy_uris(src, dst, request_size=MiB, progress=events.append, progress_interval=0.0)
    assert result.copied == 2 * MiB and result.skipped == 6 * MiB
    assert data_ranges(dst) == [(0, MiB), (3 * MiB, MiB)]
    same_bytes(dump(src, tmp_path / "a"), dump(dst, tmp_path / "b"))
    final = events[-1]
    assert final.done and final.error is None and final.processed == final.total == 8 * MiB
    # the rate is data bytes per second: 6 MiB of skipped zeroes do not count
    assert final.rate == pytest.approx(final.copied / final.elapsed, rel=0.01)
    assert all(e.rate * e.elapsed <= e.copied * 1.01 + 1 for e in events)


async def test_progress_is_rate_limited_and_final_event_always_sent(nbdkit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit(*SPARSE_RANDOM)
    events: list[Progress] = []
    start = time.monotonic()
    await copy_uris(src, str(tmp_path / "t.raw"), fmt=ImageFormat.RAW, request_size=256 * 1024, progress=events.append)
    elapsed = time.monotonic() - start
    assert events[-1].done and events[-1].processed == 32 * MiB
    assert sum(not e.done for e in events) <= elapsed / 0.5 + 2


async def test_qemu_img_raw_file_is_probed_fresh(tmp_path: Path, qemu_nbd) -> None:  # type: ignore[no-untyped-def]
    # qemu-img allocates (and zeroes) the first block of a new raw file; the probe reads it.
    image = tmp_path / "new.raw"
    run(require("qemu-img"), "create", "-q", "-f", "raw", str(image), "8M")
    dst = qemu_nbd(image)
    assert data_ranges(dst), "qemu-img no longer allocates the first block: this test lost its point"
    target = await open_target(dst)
    try:
        assert await probe_target_mode(target) is TargetMode.FRESH
    finally:
        await target.close()
    image.write_bytes(b"\1" + bytes(8 * MiB - 1))
    target = await open_target(str(image), fmt=ImageFormat.RAW)
    try:
        assert await probe_target_mode(target) is TargetMode.RAW
    finally:
        await target.close()


@pytest.mark.parametrize("server", ["qemu-nbd", "ours"])
@pytest.mark.parametrize("source", ["ours-sparse", "nbdkit-memory"])
async def test_raw_target_with_old_data_is_overwritten(  # type: ignore[no-untyped-def]
    server: str, source: str, tmp_path: Path, ours, qemu_nbd, nbdkit
) -> None:
    if source == "ours-sparse":
        src_file = sparse_file(tmp_path / "src.raw", 16 * MiB, [(0, 65536), (3 * MiB, 2 * MiB), (15 * MiB, 4096)])
        src = ours(src_file, "--read-only")
    else:
        src_file = sparse_file(tmp_path / "src.raw", 16 * MiB, [])
        src = nbdkit("memory", "16M")
    image = random_file(tmp_path / "dst.raw", 16 * MiB, seed=9)
    dst = qemu_nbd(image) if server == "qemu-nbd" else ours(image)
    result = await copy_uris(src, dst, request_size=MiB)
    assert result.target_mode is TargetMode.RAW and result.zeroed == 16 * MiB - result.copied
    same_bytes(src_file, image)


def overlay_chain(tmp_path: Path) -> Path:
    """top.qcow2 over base.qcow2, whose every byte is 0x11."""
    base = empty_image(tmp_path / "base.qcow2", "qcow2", "16M")
    run(require("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 16M", str(base))
    return empty_image(tmp_path / "top.qcow2", "qcow2", "16M", "-b", str(base), "-F", "qcow2")


@pytest.mark.parametrize(
    "target,zeroes",
    [("qemu-nbd", "write-zeroes"), ("ours", "write-zeroes"), ("ours", "buffers"), ("local", "write-zeroes")],
)
async def test_overlay_zero_areas_hide_the_backing_file(  # type: ignore[no-untyped-def]
    target: str, zeroes: str, tmp_path: Path, ours, qemu_nbd
) -> None:
    src_file = sparse_file(tmp_path / "src.raw", 16 * MiB, [(MiB, MiB), (8 * MiB, 4096)])
    src = ours(src_file, "--read-only")
    top = overlay_chain(tmp_path)
    if target == "qemu-nbd":
        dst = qemu_nbd(top, "--allocation-depth", fmt="qcow2")
    elif target == "ours":
        dst = ours(top, "--allocation-depth", fmt="qcow2")
    else:
        dst = str(top)
    result = await copy_uris(src, dst, fmt=ImageFormat.QCOW2, overlay_zeroes=OverlayZeroes(zeroes), request_size=MiB)
    assert result.target_mode is TargetMode.OVERLAY
    assert result.zeroed == 16 * MiB - result.copied and result.skipped == 0
    run(require("qemu-img"), "compare", "-U", "-f", "raw", "-F", "qcow2", str(src_file), str(top))


async def test_source_eio_is_retried(nbdkit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clean = nbdkit(*SPARSE_RANDOM)
    faulty = nbdkit("--filter=error", *SPARSE_RANDOM, "error-pread=EIO", "error-pread-rate=10%")
    # About 150 reads of 64 KiB: some fail (the odds of none are 0.9^150), none fails 6 times in a row.
    result = await copy_uris(
        faulty, str(tmp_path / "t.raw"), fmt=ImageFormat.RAW, request_size=64 * 1024, backoff=0.005
    )
    assert result.retries > 0
    same_bytes(dump(clean, tmp_path / "clean.raw"), tmp_path / "t.raw")


async def test_source_always_failing_gives_a_clear_error(nbdkit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    faulty = nbdkit("--filter=error", *SPARSE_RANDOM, "error-pread=EIO", "error-pread-rate=100%")
    events: list[Progress] = []
    with pytest.raises(CopyError, match=r"at offset \d+ failed after 4 attempts: .*EIO") as info:
        await copy_uris(
            faulty, str(tmp_path / "t.raw"), fmt=ImageFormat.RAW, retries=3, backoff=0.001, progress=events.append
        )
    assert info.value.offset is not None
    assert events[-1].done and events[-1].error is not None


async def test_target_eio_is_retried(nbdkit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit(*SPARSE_RANDOM)
    target = nbdkit("--filter=error", "memory", "size=32M", "error-pwrite=EIO", "error-pwrite-rate=5%")
    # About 150 writes of 64 KiB: some fail (the odds of none are 0.95^150), none fails 6 times in a row.
    result = await copy_uris(src, target, request_size=64 * 1024, backoff=0.005)
    assert result.retries > 0 and result.flushed
    same_bytes(dump(src, tmp_path / "src.raw"), dump(target, tmp_path / "target.raw"))


async def test_target_refusing_writes_fails_without_retrying(nbdkit) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit(*SPARSE_RANDOM)
    target = nbdkit("-r", "memory", "size=32M")
    start = time.monotonic()
    with pytest.raises(CopyError, match="EPERM") as info:
        await copy_uris(src, target, retries=5, backoff=1.0)
    assert time.monotonic() - start < 5, "a permanent error was retried with backoff"
    assert info.value.offset is not None


async def test_delayed_source_keeps_requests_in_flight(nbdkit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit("--filter=delay", "sparse-random", "size=16M", "seed=3", "percent=100", "delay-read=20ms")
    start = time.monotonic()
    result = await copy_uris(src, str(tmp_path / "t.raw"), fmt=ImageFormat.RAW, request_size=256 * 1024, requests=16)
    elapsed = time.monotonic() - start
    reads = 16 * MiB // (256 * 1024)
    assert result.copied == 16 * MiB
    assert elapsed < reads * 0.020 / 4, f"{reads} reads of 20 ms took {elapsed:.2f} s: requests were not overlapped"
    same_bytes(dump(src, tmp_path / "src.raw"), tmp_path / "t.raw")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_target_killed_and_restarted_resumes(fmt: str, tmp_path: Path, procs: Processes, nbdkit) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit("sparse-random", "size=96M", "seed=11", "percent=50", "runlength=1048576")
    image = empty_image(tmp_path / f"dst.{fmt}", fmt, "96M")
    server = TCPServer(procs, image, fmt, free_port())
    server.start()
    restarted = threading.Event()

    def restart() -> None:
        time.sleep(0.3)  # let the copy find the server gone for a while
        server.start()
        restarted.set()

    killed: list[int] = []

    def on_progress(event: Progress) -> None:
        if not killed and event.copied >= 24 * MiB:
            server.kill()
            killed.append(event.copied)
            threading.Thread(target=restart, daemon=True).start()

    result = await copy_uris(
        src,
        server.uri,
        connections=2,
        requests=4,
        request_size=MiB,
        checkpoint_bytes=4 * MiB,
        backoff=0.1,
        retries=6,
        progress=on_progress,
        progress_interval=0.0,
        target_mode=TargetMode.FRESH,
    )
    assert killed and restarted.wait(10) and result.reconnects >= 1
    data = sum(n for _, n in data_ranges(src))
    assert result.copied == data
    # Only what no FLUSH covered was sent again: at most a checkpoint's worth, the writes that
    # completed while its FLUSH was in flight, and the requests in flight at the kill.
    in_flight = 2 * 4 * MiB
    assert data <= result.written <= data + 2 * 4 * MiB + in_flight, (result.written, data, killed)
    assert result.written - data < killed[0] // 2, "a large part of the finished ranges was copied again"
    same_bytes(dump(src, tmp_path / "src.raw"), dump(server.uri, tmp_path / "check.raw"))


async def test_changed_areas_copy_only_those(tmp_path: Path, nbdkit, ours) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit(*SPARSE_RANDOM)
    source = dump(src, tmp_path / "src.raw").read_bytes()
    image = tmp_path / "dst.raw"
    image.write_bytes(b"\xee" * (32 * MiB))
    dst = ours(image)
    holes = [(o, n) for o, n in _zero_ranges(src) if n >= 256 * 1024]
    zero_area = (holes[0][0] + 4096, 65536)
    changed = [(4096, 8192), (10 * MiB, 3 * MiB + 5), (10 * MiB + 512 * 1024, 4096), zero_area, (31 * MiB, MiB)]
    result = await copy_uris(src, dst, changed_areas=changed, request_size=MiB, target_mode=TargetMode.RAW)
    scope = merge_areas(changed, size=32 * MiB)
    assert result.copied + result.zeroed == sum(n for _, n in scope)
    after = image.read_bytes()
    pos = 0
    for offset, length in scope:
        assert after[pos:offset] == b"\xee" * (offset - pos), f"untouched area before {offset} changed"
        assert after[offset : offset + length] == source[offset : offset + length]
        pos = offset + length
    assert after[pos:] == b"\xee" * (len(after) - pos)
    assert after[zero_area[0] : zero_area[0] + zero_area[1]] == bytes(zero_area[1])


def _zero_ranges(uri: str) -> list[tuple[int, int]]:
    return [(o, n) for o, n, kind in nbdinfo_map(uri) if kind & 2]


class Corrupting:
    """A target that silently flips one byte of the write covering ``at``."""

    def __init__(self, inner: Endpoint, at: int) -> None:
        self._inner = inner
        self.at = at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def write(self, *, offset: int, data: memoryview) -> None:
        if offset <= self.at < offset + len(data):
            changed = bytearray(data)
            changed[self.at - offset] ^= 0xFF
            data = memoryview(changed)
        await self._inner.write(offset=offset, data=data)


async def test_verify_finds_a_planted_mismatch(tmp_path: Path, nbdkit, ours) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit(*SPARSE_RANDOM)
    at = data_ranges(src)[1][0] + 12345
    dst = ours(empty_image(tmp_path / "dst.raw", "raw"))
    source = await open_source(src)
    target = await open_target(dst)
    try:
        ok = await copy(source, target, CopyOptions(verify=True))
        assert ok.verified
        with pytest.raises(VerifyError, match=f"differ at offset {at}$") as info:
            options = CopyOptions(verify=True, target_mode=TargetMode.RAW)
            await copy(source, Corrupting(target, at), options)  # type: ignore[arg-type]
        assert info.value.offset == at
    finally:
        await target.close()
        await source.close()


async def test_target_smaller_than_source_is_refused(tmp_path: Path, nbdkit) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit(*SPARSE_RANDOM)
    small = empty_image(tmp_path / "small.raw", "raw", "1M")
    with pytest.raises(CopyError, match="smaller than the source"):
        await copy_uris(src, str(small), fmt=ImageFormat.RAW)
