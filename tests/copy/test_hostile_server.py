"""The copy against a lying or broken NBD server (tests/copy/hostile.py).

Whatever the server does, a copy either fails cleanly (a typed error, or
for the CLI exit 1 with one line on stderr), within a time bound, or exits
successfully with a target byte-identical to the true data. Never a
"verified" wrong copy.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sendense_nbd.copy import CopyOptions, copy, open_source, open_target
from sendense_nbd.errors import CopyError, SendenseError, VerifyError
from sendense_nbd.storage import ImageFormat
from tests.copy.hostile import KINDS, Case, HostileServer, make_disk

pytestmark = pytest.mark.peer

CASES = 200
CONCURRENCY = 8
REQUEST_TIMEOUT = 0.5
CONNECT_TIMEOUT = 1.0
RETRIES = 2
#: Seconds one case may take: every attempt connecting and timing out, twice (copy and verify), plus slack.
CASE_BOUND = 2 * (RETRIES + 1) * (CONNECT_TIMEOUT + REQUEST_TIMEOUT) + 10
BASE_SEED = 1100


async def copy_once(uri: str, target: Path, *, verify: bool = True) -> None:
    source = await open_source(uri, connections=2, request_timeout=REQUEST_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)
    try:
        destination = await open_target(str(target), fmt=ImageFormat.RAW, size=source.size, connections=2)
        try:
            options = CopyOptions(
                connections=2, requests=4, request_size=64 * 1024, retries=RETRIES, backoff=0.01, verify=verify
            )
            await copy(source, destination, options)
        finally:
            await destination.close()
    finally:
        await source.close()


async def run_case(case: Case, directory: Path) -> str:
    """``"ok"`` (a correct copy) or ``"failed: ..."`` (a clean failure); raises on anything else."""
    disk = make_disk(case.seed)
    server = HostileServer(disk, case)
    uri = await server.start()
    target = directory / f"case{case.seed}.raw"
    start = time.monotonic()
    try:
        await asyncio.wait_for(copy_once(uri, target), CASE_BOUND)
        outcome = "ok"
    except SendenseError as exc:
        outcome = f"failed: {exc}"
    except TimeoutError:
        raise AssertionError(f"{case}: no outcome within {CASE_BOUND} s") from None
    except Exception as exc:
        raise AssertionError(f"{case}: not a typed error: {type(exc).__name__}: {exc}") from exc
    finally:
        await server.close()
    elapsed = time.monotonic() - start
    assert elapsed < CASE_BOUND, f"{case}: took {elapsed:.1f} s"
    if outcome == "ok":
        assert target.read_bytes() == disk, f"{case}: the copy succeeded with wrong data"
    target.unlink(missing_ok=True)
    return outcome


async def test_seeded_hostile_servers_never_give_a_wrong_copy(tmp_path: Path) -> None:
    """200 seeded cases, 8 at a time; each fails cleanly in time or copies exactly."""
    cases = [Case.draw(BASE_SEED + i) for i in range(CASES)]
    gate = asyncio.Semaphore(CONCURRENCY)
    failures: list[str] = []

    async def one(case: Case) -> str:
        async with gate:
            try:
                return await run_case(case, tmp_path)
            except AssertionError as exc:
                failures.append(f"{exc} (reproduce: Case.draw({case.seed}))")
                return "defect"

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(case) for case in cases))
    assert not failures, "\n".join(failures)
    assert time.monotonic() - started < 120
    # The mix is meaningful: both outcomes occur, every kind was drawn.
    assert "ok" in outcomes and any(o.startswith("failed") for o in outcomes)
    assert {case.kind for case in cases} == set(KINDS)


@pytest.mark.parametrize(
    "case, message",
    [
        (Case(1, "overlap", 0, persistent=True), "overlaps earlier content"),
        (Case(2, "hole-overlap", 0, persistent=True), "overlaps earlier content"),
        (Case(3, "gap", 0, persistent=True), "READ reply covered"),
        (Case(4, "all-zero-extents", 0, persistent=True), "differ at offset"),
        (Case(5, "lie-on-reread"), "differ at offset"),
        (Case(6, "huge-size", handshake=True), "over 2\\^63 - 1"),
        (Case(7, "endless-info", handshake=True), "over 1024 option replies"),
        (Case(7, "bad-block-sizes", handshake=True), "block size|maximum payload"),
        (Case(8, "endless-meta", handshake=True), "was not asked for"),
        (Case(9, "zero-extent", 0, persistent=True), "extent of length 0"),
        (Case(10, "bad-context", 0, persistent=True), "not negotiated"),
        (Case(11, "wrong-handle", 2, persistent=True), "unknown handle"),
    ],
)
async def test_each_lie_is_named(case: Case, message: str, tmp_path: Path) -> None:
    """Kinds that must always fail, and with the reason in the message."""
    server = HostileServer(make_disk(case.seed), case)
    uri = await server.start()
    try:
        with pytest.raises(SendenseError, match=message):
            await asyncio.wait_for(copy_once(uri, tmp_path / "t.raw"), CASE_BOUND)
    finally:
        await server.close()


async def test_a_source_that_changes_on_reread_is_only_caught_by_verify(tmp_path: Path) -> None:
    """The copy reads honest data on the first connection; the verify's new connection gets other bytes."""
    disk = make_disk(5)
    for verify in (False, True):
        server = HostileServer(disk, Case(5, "lie-on-reread"))
        uri = await server.start()
        target = tmp_path / f"verify-{verify}.raw"
        try:
            if verify:
                with pytest.raises(VerifyError, match="differ at offset") as info:
                    await copy_once(uri, target)
                assert isinstance(info.value, CopyError) and info.value.offset is not None
            else:
                await copy_once(uri, target, verify=False)
        finally:
            await server.close()
        assert target.read_bytes() == disk  # the copy itself was right both times
        # Each pool starts 2 handshakes at once and, without multi-conn, keeps the first: the verify's is the third.
        assert server.connections == (4 if verify else 2)


CLI_KINDS = ("overlap", "hole-overlap", "all-zero-extents", "lie-on-reread", "huge-size", "bad-block-sizes",
             "endless-info", "truncate", "flip-header", "stall", "delay", "duplicate")  # fmt: skip


async def test_cli_prints_one_line_and_never_verified_for_a_wrong_copy(tmp_path: Path) -> None:
    """The command itself: exit 1 with one line and no traceback, or exit 0 with the right bytes."""
    rng = random.Random(77)
    handshake = ("huge-size", "bad-block-sizes", "endless-info")
    cases = [Case(300 + i, kind, rng.randrange(4), rng.random() < 0.5, kind in handshake)
             for i, kind in enumerate(CLI_KINDS)]  # fmt: skip
    gate = asyncio.Semaphore(4)

    async def one(case: Case) -> None:
        async with gate:
            disk = make_disk(case.seed)
            server = HostileServer(disk, case)
            uri = await server.start()
            target = tmp_path / f"cli{case.seed}.raw"
            command = [sys.executable, "-m", "sendense_nbd", "copy", "--verify", "-f", "raw", "-C", "2",
                       "--request-size", "64K", "--retries", str(RETRIES), "--request-timeout", str(REQUEST_TIMEOUT),
                       "--connect-timeout", str(CONNECT_TIMEOUT), uri, str(target)]  # fmt: skip
            try:
                proc = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=CASE_BOUND + 10)
            finally:
                await server.close()
            err = proc.stderr
            text = err.decode()
            assert "Traceback" not in text, f"{case}: {text}"
            assert text.count("\n") == 1, f"{case}: {text!r}"
            if proc.returncode == 0:
                assert "verified" in text and target.read_bytes() == disk, f"{case}: {text}"
            else:
                assert proc.returncode == 1 and text.startswith("sendense-nbd copy: error: "), f"{case}: {text}"
                assert "verified" not in text

    await asyncio.gather(*(one(case) for case in cases))
