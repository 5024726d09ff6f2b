"""``sendense-nbd copy``: flags, output and exit codes."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sendense_nbd.cli.copy import copy_command
from tests.conftest import run, sparse_file

pytestmark = pytest.mark.peer

MiB = 1 << 20


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(copy_command, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_local_to_local_with_json_progress_and_verify(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src.raw", 8 * MiB, [(0, 65536), (5 * MiB, MiB)])
    dst = tmp_path / "dst.raw"
    code, out, err = invoke(str(src), str(dst), "-f", "raw", "--json", "--verify", "--request-size", "1M", "-C", "2")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1]["done"] and lines[-1]["copied"] == 65536 + MiB and lines[-1]["total"] == 8 * MiB
    run("cmp", str(src), str(dst))


def test_qcow2_target_and_summary(tmp_path: Path, nbdkit) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit("data", "data=@1048576 ( 0x42 )*65536", "size=4M")
    dst = tmp_path / "dst.qcow2"
    code, out, err = invoke(src, str(dst), "-f", "qcow2", "--progress", "--target-mode", "fresh")
    assert code == 0, err
    assert out == "" and "copied 65536 bytes" in err and "fresh target" in err
    expected = tmp_path / "expected.raw"
    run("nbdcopy", src, str(expected))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(dst), str(expected))


def test_local_target_needs_a_format(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src.raw", MiB, [])
    code, out, err = invoke(str(src), str(tmp_path / "dst"))
    assert code == 1 and err.count("\n") == 1 and "-f raw|qcow2" in err


def test_failure_is_one_line_naming_the_offset(tmp_path: Path, nbdkit) -> None:  # type: ignore[no-untyped-def]
    src = nbdkit("--filter=error", "pattern", "size=4M", "error-pread=EIO", "error-pread-rate=100%")
    code, out, err = invoke(src, str(tmp_path / "dst.raw"), "-f", "raw", "--retries", "1")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("sendense-nbd copy: error: ") and "at offset" in err and "EIO" in err


@pytest.mark.parametrize("zeroes", ["write-zeroes", "buffers"])
def test_overlay_flags_and_changed_areas_reach_the_copy(zeroes: str, tmp_path: Path) -> None:
    """--target-mode, --overlay-zeroes and --changed-areas: the changed areas of an overlay read
    as the source (zeroes included, hiding the backing file); the rest still shows the backing file."""
    src = sparse_file(tmp_path / "src.raw", 4 * MiB, [(MiB, 65536)])
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(base))
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "4M")
    areas = tmp_path / "areas.json"
    areas.write_text(json.dumps([[0, 2 * MiB]]))
    code, _, err = invoke(str(src), str(top), "-f", "qcow2", "--target-mode", "overlay", "--overlay-zeroes", zeroes,
                          "--changed-areas", str(areas))  # fmt: skip
    assert code == 0 and "overlay target" in err and f"zeroed {2 * MiB - 65536}" in err, err
    image = tmp_path / "top.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(image))
    data = image.read_bytes()
    assert data[: 2 * MiB] == src.read_bytes()[: 2 * MiB] and data[2 * MiB :] == b"\x11" * (2 * MiB)
    first = json.loads(run("qemu-img", "map", "--output=json", str(top)).stdout)[0]
    assert first["start"] == 0 and first["depth"] == 0  # the zeroed area at 0 is the overlay's own
    assert first["zero"] is (zeroes == "write-zeroes") and first["data"] is (zeroes == "buffers")


def test_bad_request_size(tmp_path: Path) -> None:
    code, _, err = invoke("a", "b", "--request-size", "lots")
    assert code == 2 and "not a size" in err


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """With --progress and stderr on a TTY, a click progress bar is drawn there; stdout stays clean."""
    src = sparse_file(tmp_path / "src.raw", 8 * MiB, [(0, MiB), (4 * MiB, MiB)])
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sendense_nbd",
                "copy",
                "--progress",
                str(src),
                str(tmp_path / "dst.raw"),
                "-f",
                "raw",
            ],
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=60,
        )
        os.close(terminal)
        terminal = -1
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen
    assert proc.stdout == b""
    assert "copying" in screen and "100%" in screen, screen
    run("cmp", str(src), str(tmp_path / "dst.raw"))
