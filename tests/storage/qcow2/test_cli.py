"""The qemu-img-like commands: create, info, check, map; dirty images are repaired on open."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from sendense_nbd.storage import ImageFormat, open_image
from tests.conftest import random_file, run

pytestmark = pytest.mark.peer

MiB = 1 << 20


def ours(*args: str, check: bool = True):  # type: ignore[no-untyped-def]
    return run(sys.executable, "-m", "sendense_nbd", *args, check=check)


@pytest.mark.parametrize("options", ["", "cluster_size=4k", "cluster_size=2M", "compat=0.10", "extended_l2=on"])
def test_create_matches_qemu_img(tmp_path: Path, options: str) -> None:
    mine, theirs = tmp_path / "mine.qcow2", tmp_path / "theirs.qcow2"
    extra = ["-o", options] if options else []
    ours("create", "-f", "qcow2", *extra, str(mine), "100M")
    run("qemu-img", "create", "-q", "-f", "qcow2", *extra, str(theirs), "100M")
    run("qemu-img", "check", str(mine))
    a = json.loads(run("qemu-img", "info", "--output=json", str(mine)).stdout)
    b = json.loads(run("qemu-img", "info", "--output=json", str(theirs)).stdout)
    for key in ("virtual-size", "cluster-size", "format"):
        assert a[key] == b[key], key
    assert a["format-specific"]["data"] == b["format-specific"]["data"]
    assert json.loads(ours("info", "--output", "json", str(mine)).stdout) | {"actual-size": 0} == a | {"actual-size": 0}


def test_create_overlay_takes_backing_size_and_reads_through(tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.raw", 3 * MiB)
    top = tmp_path / "top.qcow2"
    out = ours("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top)).stdout
    assert "backing_file=base.raw" in out
    info = json.loads(run("qemu-img", "info", "--output=json", str(top)).stdout)
    assert info["virtual-size"] == 3 * MiB
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(base), str(top))
    missing_format = ours("create", "-f", "qcow2", "-b", "base.raw", str(tmp_path / "x.qcow2"), check=False)
    assert missing_format.returncode == 1 and "-F raw" in missing_format.stderr


def test_check_exit_codes_and_repair(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M")
    run("qemu-io", "-c", "write -P 7 0 1M", str(image))
    assert ours("check", str(image)).returncode == 0
    header = image.read_bytes()[:104]
    (rt_offset,) = struct.unpack_from(">Q", header, 48)
    (block,) = struct.unpack_from(">Q", image.read_bytes(), rt_offset)
    with open(image, "r+b") as f:  # bump the header cluster's refcount: a leak
        f.seek(block)
        f.write(struct.pack(">H", 2))
    leaked = ours("check", "--output", "json", str(image), check=False)
    assert leaked.returncode == 3
    assert (
        json.loads(leaked.stdout)["leaks"]
        == json.loads(run("qemu-img", "check", "--output=json", str(image), check=False).stdout)["leaks"]
    )
    repaired = ours("check", "-r", "all", str(image), check=False)
    assert repaired.returncode == 0
    run("qemu-img", "check", str(image))
    (rt_offset,) = struct.unpack_from(">Q", image.read_bytes(), 48)  # the repair moved the refcounts
    (block,) = struct.unpack_from(">Q", image.read_bytes(), rt_offset)
    with open(image, "r+b") as f:  # now a refcount of 0 for the header: corruption
        f.seek(block)
        f.write(struct.pack(">H", 0))
    assert ours("check", str(image), check=False).returncode == 2


def test_dirty_image_is_repaired_when_opened_for_writing(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(image), "8M")
    run("qemu-io", "-c", "write -P 9 0 2M", "-c", "sigraise 9", str(image), check=False)  # dies dirty
    assert json.loads(run("qemu-img", "info", "--output=json", str(image)).stdout)["dirty-flag"] is True
    device = open_image(str(image), ImageFormat.QCOW2)
    device.write(offset=2 * MiB, data=b"\x01" * 4096)
    device.close()
    run("qemu-img", "check", str(image))
    data = run("qemu-io", "-c", "read -P 9 0 2M", "-c", "read -P 1 2M 4k", str(image)).stdout
    assert "Pattern verification failed" not in data


def test_map_matches_qemu_img_map(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    run("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -z 2M 512k", str(base))
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    run("qemu-io", "-c", "write -P 2 512k 64k", "-c", "discard 3M 64k", str(top))
    for output in ("human", "json"):
        mine = ours("map", "--output", output, str(top)).stdout
        theirs = run("qemu-img", "map", f"--output={output}", str(top)).stdout
        assert mine.replace(str(tmp_path) + "/", "") == theirs.replace(str(tmp_path) + "/", ""), output


def test_trim_frees_clusters_and_the_image_stays_consistent(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M")
    device = open_image(str(image), ImageFormat.QCOW2)
    device.write(offset=0, data=b"\x11" * 16 * MiB)
    device.flush()
    allocated = json.loads(run("qemu-img", "check", "--output=json", str(image)).stdout)["allocated-clusters"]
    device.trim(offset=0, length=8 * MiB)  # freed: holes in the file, refcounts fall at flush
    device.zero(offset=8 * MiB, length=4 * MiB, may_trim=False)  # kept allocated, zero flag set
    device.close()
    result = json.loads(run("qemu-img", "check", "--output=json", str(image)).stdout)
    assert result["allocated-clusters"] == allocated - 8 * MiB // 65536
    assert image.stat().st_blocks * 512 < 10 * MiB
    data = run("qemu-io", "-c", "read -P 0 0 12M", "-c", "read -P 0x11 12M 4M", str(image)).stdout
    assert "Pattern verification failed" not in data


def test_map_follows_qemu_img_for_json_filenames_and_many_extents(tmp_path: Path) -> None:
    """File names are the image's own (not the json: spec), and a raw layer with more extents
    than one block status answer holds is mapped whole."""
    raw = tmp_path / "holes.raw"
    with open(raw, "wb") as f:
        f.truncate(12 * MiB)
        for block in range(0, 12 * MiB // 4096, 2):  # 1536 data blocks between holes
            f.seek(block * 4096)
            f.write(b"\x01" * 4096)
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", raw.name, "-F", "raw", str(top))
    run("qemu-io", "-c", "write -P 2 64k 64k", "-c", "write -z 1M 64k", str(top))
    for fmt, path in (("raw", raw), ("qcow2", top)):
        name = "json:" + json.dumps({"driver": fmt, "file": {"driver": "file", "filename": str(path)}})
        for image in (str(path), name):
            for output in ("human", "json"):
                mine = ours("map", "--output", output, image).stdout
                theirs = run("qemu-img", "map", f"--output={output}", image).stdout
                assert mine == theirs, (image, output)
