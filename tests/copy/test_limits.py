"""Bounds of the copy: memory against a very fragmented map, time against a
stalled server, and windowed planning that still copies every byte.
Real peers where they can: nbdkit (a python plugin with a fragmented map) and
our server; the stalled server is our scripted one (tests/copy/hostile.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sendense_nbd.copy import CopyOptions, TargetMode, copy, endpoints, engine, open_source, open_target
from sendense_nbd.storage import ImageFormat
from tests.conftest import sparse_file
from tests.copy.hostile import BLOCK_STATUS, Case, HostileServer, make_disk

pytestmark = pytest.mark.peer

MiB = 1 << 20

#: 512 MiB of alternating 512-byte extents (a million of them), all reading as zeroes.
FRAGMENTED_PLUGIN = """
API_VERSION = 2
SIZE = 512 << 20
STEP = 512


def open(readonly):
    return 1


def get_size(h):
    return SIZE


def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))


def can_extents(h):
    return True


def extents(h, count, offset, flags):
    start = offset - offset % STEP
    end = min(offset + count, SIZE, start + STEP * 32768)
    return [(pos, STEP, 2 if pos // STEP % 2 else 3) for pos in range(start, end, STEP)]
"""
#: Peak RSS allowed: the interpreter and the package take about 50 MiB; the whole map would take over 250.
RSS_BOUND_MIB = 120


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sendense_nbd", "copy", *args]


def run_measured(command: list[str], timeout: float, report: Path) -> tuple[int, str, int]:
    """Exit status, stderr and peak RSS (MiB) of ``command``, as GNU time measures it.

    (Not wait4 from here: a child forked from this big test process starts with its pages.)
    """
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(report), *command], capture_output=True, timeout=timeout, check=False
    )
    return proc.returncode, proc.stderr.decode(), int(report.read_text().split()[-1]) // 1024


def test_a_million_extents_are_walked_in_bounded_memory(tmp_path: Path, nbdkit) -> None:  # type: ignore[no-untyped-def]
    plugin = tmp_path / "fragmented.py"
    plugin.write_text(FRAGMENTED_PLUGIN)
    src = nbdkit("python", str(plugin))
    command = cli(src, str(tmp_path / "t.raw"), "-f", "raw", "--target-mode", "fresh")
    code, err, rss = run_measured(command, 120, tmp_path / "rss")
    assert code == 0, err
    assert f"skipped {512 * MiB} of {512 * MiB}" in err
    assert rss < RSS_BOUND_MIB, f"peak RSS {rss} MiB"


async def test_a_stalled_server_fails_after_about_timeout_times_attempts(tmp_path: Path) -> None:
    """A server that stops answering: each attempt times out, and the copy gives up with one line.

    (Our scripted server: nbdkit 1.32's delay filter trips an assertion in nbdkit when the client
    hangs up on a delayed request, so it cannot play this part.)
    """
    server = HostileServer(make_disk(1), Case(1, "stall", 0, persistent=True))
    uri = await server.start()
    command = cli(uri, str(tmp_path / "t.raw"), "-f", "raw", "--request-timeout", "1", "--retries", "2")
    start = time.monotonic()
    try:
        proc = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=60, check=False)
    finally:
        await server.close()
    elapsed = time.monotonic() - start
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "took over 1.0 s" in err
    assert server.connections == 3 * 4  # one pool per attempt, its 4 handshakes (--connections) at once
    assert 3.0 <= elapsed < 30, elapsed  # three full timeouts; nowhere near the old 12 minutes


def test_an_unreachable_server_is_one_line_within_the_connect_timeout(tmp_path: Path) -> None:
    sock = tmp_path / "nobody"
    command = cli(f"nbd+unix:///?socket={sock}", str(tmp_path / "t.raw"), "-f", "raw", "--connect-timeout", "2")
    proc = subprocess.run(command, capture_output=True, timeout=30, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "cannot connect" in err


@pytest.mark.parametrize("changed", [None, [(0, 3 * MiB), (5 * MiB + 4096, 100_000), (20 * MiB, 12 * MiB)]])
async def test_small_unaligned_windows_still_copy_every_byte(  # type: ignore[no-untyped-def]
    changed, tmp_path: Path, ours, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows of 100000 bytes and 3 extents: the plan is stitched from many windows.

    (Our server, not nbdkit sparse-random: that plugin returns other bytes for
    reads that do not start on its 4 KiB blocks, which this test would catch.)
    """
    monkeypatch.setattr(engine, "EXTENT_WINDOW", 100_000)
    monkeypatch.setattr(endpoints, "MAX_EXTENTS", 3)
    data = [(i * 700_001 % (31 * MiB), 50_000 + i * 3001) for i in range(40)]
    source_image = sparse_file(tmp_path / "s.raw", 32 * MiB, data)
    src = ours(source_image)
    image = tmp_path / "t.raw"
    image.write_bytes(b"\xee" * (32 * MiB))  # old data everywhere
    source = await open_source(src)
    target = await open_target(str(image), fmt=ImageFormat.RAW)
    try:
        options = CopyOptions(verify=True, request_size=MiB, target_mode=TargetMode.RAW)
        result = await copy(source, target, options, changed_areas=changed)
    finally:
        await target.close()
        await source.close()
    assert result.verified and result.copied + result.zeroed + result.skipped == 32 * MiB
    expected = source_image.read_bytes()
    after = image.read_bytes()
    for offset, length in changed or [(0, 32 * MiB)]:
        assert after[offset : offset + length] == expected[offset : offset + length]
    if changed:
        assert after[3 * MiB : 5 * MiB] == b"\xee" * (2 * MiB)  # outside the areas: untouched


async def test_a_changed_area_copy_asks_for_the_map_of_those_areas_only(tmp_path: Path) -> None:
    disk = make_disk(3, 1 << 20)
    server = HostileServer(disk, Case(3, "honest"))
    uri = await server.start()
    areas = [(65536, 8192), (512 * 1024, 100_000)]
    target = tmp_path / "t.raw"
    target.write_bytes(bytes(1 << 20))
    source = await open_source(uri)
    destination = await open_target(str(target), fmt=ImageFormat.RAW)
    try:
        await copy(source, destination, CopyOptions(merge_gap=0, verify=True), changed_areas=areas)
    finally:
        await destination.close()
        await source.close()
        await server.close()
    asked = [(offset, length) for command, offset, length in server.requests if command == BLOCK_STATUS]
    assert asked and all(any(o <= a and a + n <= o + m for o, m in areas) for a, n in asked), asked
    after = target.read_bytes()
    for offset, length in areas:
        assert after[offset : offset + length] == disk[offset : offset + length]
