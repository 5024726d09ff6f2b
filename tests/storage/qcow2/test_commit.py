"""qcow2 commit (merge an overlay into its backing file), judged by qemu-img."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendense_nbd.errors import ImageError
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage import Filter, ImageFormat, open_image
from sendense_nbd.storage.qcow2.commit import _own_ranges, backing_path, commit
from tests.conftest import require, run

pytestmark = pytest.mark.peer

MiB = 1 << 20


def qemu_io(image: Path, *commands: str) -> None:
    args = [arg for command in commands for arg in ("-c", command)]
    run(require("qemu-io"), *args, str(image))


def snapshot(image: Path, out: Path) -> Path:
    run(require("qemu-img"), "convert", "-O", "raw", str(image), str(out))
    return out


def identical(image: Path, raw: Path) -> None:
    run(require("qemu-img"), "check", str(image))
    run(require("qemu-img"), "compare", "-F", "raw", str(image), str(raw))


@pytest.mark.parametrize("base_format", ["qcow2", "raw"])
def test_commit_keeps_the_overlays_view(tmp_path: Path, base_format: str) -> None:
    base = tmp_path / f"base.{base_format}"
    run(require("qemu-img"), "create", "-q", "-f", base_format, str(base), str(16 * MiB))
    qemu_io(base, "write -P 1 0 4M", "write -P 2 8M 4M")
    inc1, inc2 = tmp_path / "inc1.qcow2", tmp_path / "inc2.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", "-b", base.name, "-F", base_format, str(inc1))
    # Data over data, zeroes over data (must hide the base), a partial cluster, data past the base's data.
    qemu_io(inc1, "write -P 3 1M 1M", "write -z 8M 1M", "write -P 4 15M 3k", "write -z 12M 64k")
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", "-b", inc1.name, "-F", "qcow2", str(inc2))
    qemu_io(inc2, "write -P 5 2M 512k", "write -z 9M 64k")
    want1, want2 = snapshot(inc1, tmp_path / "want1.raw"), snapshot(inc2, tmp_path / "want2.raw")

    assert commit(str(inc1)) >= 2 * MiB
    if base_format == "qcow2":
        identical(base, want1)
    else:
        run("cmp", str(base), str(want1))
    identical(inc1, want1)  # committing leaves the overlay as it was
    identical(inc2, want2)
    if base_format == "qcow2":  # as retention does: the merged base takes the overlay's name
        base.replace(inc1)
        identical(inc2, want2)
        assert backing_path(str(inc2)) == (str(inc1), "qcow2")


def test_commit_needs_a_backing_file(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", str(top), str(4 * MiB))
    assert backing_path(str(top)) is None
    with pytest.raises(ImageError, match="no backing file"):
        commit(str(top))


class _Piecemeal(Filter):
    """Answers each allocation-depth question with its first extent only, as the contract allows."""

    def allocation_depth(self, *, offset: int, length: int) -> list[Extent]:
        return self.next.allocation_depth(offset=offset, length=length)[:1]


def test_the_overlays_own_ranges_are_asked_for_until_the_whole_disk_is_covered(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", str(overlay), str(16 * MiB))
    qemu_io(overlay, "write -P 1 1M 1M", "write -P 2 8M 64k", "write -P 3 15M 1M")
    device = _Piecemeal(open_image(str(overlay), ImageFormat.QCOW2, readonly=True))
    try:
        assert _own_ranges(device) == [Extent(1 * MiB, MiB, 1), Extent(8 * MiB, 64 << 10, 1), Extent(15 * MiB, MiB, 1)]
    finally:
        device.close()
