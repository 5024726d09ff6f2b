"""Creating images for the hub (and ``sendense-nbd create``): a planted symlink is never followed, nothing
is overwritten, a refused create leaves no file, and qcow2 sizes are bounded as qemu-img bounds them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sendense_nbd.errors import ImageError
from sendense_nbd.storage import ImageFormat, create_image
from sendense_nbd.storage.files import create_new_file, is_temporary, open_exclusive, temporary_name
from tests.conftest import require, run

pytestmark = pytest.mark.peer

QCOW2_MAX_64K = 1 << 51  # qemu-img's largest qcow2 at 64 KiB clusters (a 32 MiB L1 table)


@pytest.mark.parametrize("fmt", [ImageFormat.RAW, ImageFormat.QCOW2])
def test_a_symlink_or_file_at_the_name_is_never_followed_nor_replaced(tmp_path: Path, fmt: ImageFormat) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "link.img").symlink_to(victim)
    (tmp_path / "dangling.img").symlink_to(tmp_path / "nowhere")
    for name in ("link.img", "dangling.img", "victim"):
        with pytest.raises(ImageError, match="File exists"):
            create_image(str(tmp_path / name), 1 << 20, fmt)
    assert victim.read_bytes() == b"precious" and not (tmp_path / "nowhere").exists()
    assert sorted(os.listdir(tmp_path)) == ["dangling.img", "link.img", "victim"]


def test_the_temporary_name_refuses_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    temporary = temporary_name(str(tmp_path / "disk.qcow2"))
    assert is_temporary(os.path.basename(temporary)) and os.path.dirname(temporary) == str(tmp_path)
    assert temporary != temporary_name(str(tmp_path / "disk.qcow2"))
    os.symlink(victim, temporary)
    with pytest.raises(FileExistsError):
        open_exclusive(temporary)
    assert victim.read_bytes() == b"precious"


def test_a_failed_create_leaves_nothing(tmp_path: Path) -> None:
    def fail(fd: int) -> None:
        os.write(fd, b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        create_new_file(str(tmp_path / "disk.raw"), fail)
    with pytest.raises(ImageError, match="not a file size"):
        create_image(str(tmp_path / "big.raw"), 1 << 64, ImageFormat.RAW)
    with pytest.raises(ImageError, match="too large for qcow2"):
        create_image(str(tmp_path / "big.qcow2"), 1 << 64, ImageFormat.QCOW2)
    assert os.listdir(tmp_path) == []


def test_qcow2_sizes_are_bounded_as_qemu_img_bounds_them(tmp_path: Path) -> None:
    largest = tmp_path / "largest.qcow2"
    create_image(str(largest), QCOW2_MAX_64K, ImageFormat.QCOW2)
    run(require("qemu-img"), "check", str(largest))
    assert largest.stat().st_blocks * 512 < 1 << 20, "the L1 table is a hole, not written zeroes"
    over = QCOW2_MAX_64K + 512
    with pytest.raises(ImageError, match=f"at most {QCOW2_MAX_64K}"):
        create_image(str(tmp_path / "over.qcow2"), over, ImageFormat.QCOW2)
    refused = run(require("qemu-img"), "create", "-f", "qcow2", str(tmp_path / "q.qcow2"), str(over), check=False)
    assert refused.returncode != 0 and "too large" in refused.stderr
    assert sorted(os.listdir(tmp_path)) == ["largest.qcow2"]
