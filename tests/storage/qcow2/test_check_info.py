"""``check_image``/``repair_refcounts``/``image_info`` judged by ``qemu-img check`` and ``qemu-img info``.

qemu made the images (and, for corruptions, we poke bytes into them by hand);
both sides check them and must report the same counts, the same exit status,
the same human text. A repaired image must pass ``qemu-img check`` and read
back, through ``qemu-img convert``, exactly as before. A missing peer fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.errors import ImageError
from sendense_nbd.storage.qcow2.check import CheckResult, check_image, exit_code, format_human, repair_refcounts
from sendense_nbd.storage.qcow2.info import ImageFile, bitmap_directory, format_info_human, image_info, load_header
from tests.conftest import require, run

pytestmark = pytest.mark.peer

MiB = 1 << 20
COPIED = 1 << 63


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(require("qemu-img"), *args, check=check)


def qemu_io(path: Path, *commands: str) -> None:
    args: list[str | Path] = [require("qemu-io"), "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    result = run(*args, path)
    assert "failed" not in result.stdout + result.stderr, result.stdout + result.stderr


def create(path: Path, size: str, options: str = "") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []), path, size)
    return path


def qemu_check(path: Path) -> tuple[dict[str, Any] | None, int, str]:
    result = qemu_img("check", "--output=json", path, check=False)
    try:
        return json.loads(result.stdout), result.returncode, result.stderr
    except json.JSONDecodeError:
        return None, result.returncode, result.stderr


def assert_agrees(path: Path) -> CheckResult | None:
    """Our check and qemu's report the same; None when neither can check the image."""
    theirs, rc, stderr = qemu_check(path)
    before = sha256(path)
    try:
        ours = check_image(str(path))
    except ImageError:
        assert theirs is None, f"qemu checked what we refused:\n{theirs}\n{stderr}"
        return None
    assert sha256(path) == before, "check_image changed the image"
    if theirs is None:  # qemu could not even open it; we must call the check failed
        assert rc == 1 and exit_code(ours) == 1, (rc, ours)
        return ours
    assert ours.to_json() == theirs, f"\nqemu: {theirs}\nours: {ours.to_json()}\n{stderr}\n{ours.errors[:20]}"
    assert exit_code(ours) == rc
    assert format_human(ours) == qemu_img("check", path, check=False).stdout
    return ours


def assert_info_agrees(path: Path, fmt: str | None = None) -> dict[str, Any]:
    flag = ["-f", fmt] if fmt else []
    theirs = json.loads(qemu_img("info", *flag, "--output=json", path).stdout)
    ours = image_info(str(path), fmt)
    assert ours == theirs
    assert format_info_human(ours) == qemu_img("info", *flag, path).stdout
    return ours


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def keep_copy(path: Path) -> Path:
    copy = path.with_name(path.name + ".before")
    copy.write_bytes(path.read_bytes())
    return copy


def assert_same_guest_data(before: Path, after: Path) -> None:
    """qemu reads the same guest bytes from both (``qemu-img compare``, sparse-aware)."""
    result = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", before, after, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- 1. images qemu made are clean for both, and described alike --------------------------


WRITES = ("write -P 1 0 192k", "write -P 2 1M 64k", "write -z 2M 64k", "write -P 3 3M 8k", "discard 1M 64k")


def _plain(options: str, size: str = "4M") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = create(tmp / "img.qcow2", size, options)
        qemu_io(path, *WRITES)
        return path

    return make


def _compressed(tmp: Path) -> Path:
    src = _plain("cluster_size=4096")(tmp)
    out = tmp / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, out)
    return out


def _snapshot(tmp: Path) -> Path:
    path = _plain("cluster_size=4096")(tmp)
    qemu_img("snapshot", "-c", "one", path)
    qemu_io(path, "write -P 9 0 64k", "write -P 8 3M 4k")
    qemu_img("snapshot", "-c", "two", path)
    qemu_io(path, "write -P 7 4k 4k")
    return path


def _bitmaps(tmp: Path) -> Path:
    path = _plain("")(tmp)
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", path, "b1")
    return path


def _overlay(tmp: Path) -> Path:
    base = _plain("")(tmp)
    (tmp / "sub").mkdir()
    top = tmp / "sub" / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "../img.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 5 64k 64k")
    assert base.exists()
    return top


MADE: dict[str, Callable[[Path], Path]] = {
    "512": _plain("cluster_size=512"),
    "4k": _plain("cluster_size=4096"),
    "64k": _plain(""),
    "2M": _plain("cluster_size=2M", "8M"),
    "compat-0.10": _plain("compat=0.10,cluster_size=4096"),
    "preallocation-metadata": _plain("preallocation=metadata,cluster_size=16k"),
    "extended-l2": _plain("extended_l2=on,cluster_size=64k"),
    "lazy-refcounts": _plain("lazy_refcounts=on"),
    "refcount-1": _plain("refcount_bits=1,cluster_size=4096"),
    "refcount-64": _plain("refcount_bits=64,cluster_size=1024"),
    "compressed": _compressed,
    "snapshots": _snapshot,
    "bitmaps": _bitmaps,
    "overlay": _overlay,
}


@pytest.mark.parametrize("name", sorted(MADE))
def test_qemu_made_image_checks_and_describes_like_qemu(tmp_path: Path, name: str) -> None:
    path = MADE[name](tmp_path)
    result = assert_agrees(path)
    assert result is not None and result.corruptions == result.leaks == 0 and not result.errors
    assert_info_agrees(path)
    # An absolute path too: full-backing-filename is resolved against it.
    assert_info_agrees(path.resolve())


def test_raw_info_and_forced_format(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    qemu_img("create", "-q", "-f", "raw", raw, "5M")
    assert assert_info_agrees(raw)["format"] == "raw"
    qcow2 = _plain("")(tmp_path)
    assert assert_info_agrees(qcow2, "raw")["virtual-size"] == qcow2.stat().st_size


# -- 2. corruptions made by hand: the same counts as qemu -------------------------------------


@dataclass
class Layout:
    cluster: int
    l1: int
    reftable: int
    refblock: int
    l2: int
    data: int  # host offset of guest cluster 0

    def refcount_at(self, cluster: int) -> int:
        """File offset of a (16-bit) refcount in the first refcount block."""
        return self.refblock + 2 * cluster


def read_u64(path: Path, offset: int) -> int:
    with path.open("rb") as fh:
        fh.seek(offset)
        return int(struct.unpack(">Q", fh.read(8))[0])


def poke(path: Path, offset: int, fmt: str, value: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))


def set_dirty(path: Path) -> None:
    poke(path, 72, ">Q", read_u64(path, 72) | 1)


def layout(path: Path) -> Layout:
    head = path.read_bytes()[:104]
    cluster = 1 << struct.unpack_from(">I", head, 20)[0]
    l1, reftable = struct.unpack_from(">QQ", head, 40)
    l2 = read_u64(path, l1) & ~COPIED
    return Layout(cluster, l1, reftable, read_u64(path, reftable), l2, read_u64(path, l2) & 0x00FFFFFFFFFFFE00)


def victim(tmp: Path, options: str = "") -> Path:
    """64 KiB clusters, two L2 tables, a few data clusters, 16-bit refcounts."""
    path = create(tmp / "victim.qcow2", "1G", options)
    qemu_io(path, "write -P 1 0 192k", "write -P 2 600M 64k")
    return path


Corruption = Callable[[Path, Layout], None]


def _grow_and_leak(path: Path, lay: Layout) -> None:
    end = path.stat().st_size
    os.truncate(path, end + lay.cluster)
    poke(path, lay.refcount_at(end // lay.cluster), ">H", 1)


def _set_dirty_and_forget(path: Path, lay: Layout) -> None:
    """What a killed writer with lazy refcounts leaves: dirty bit, data clusters unaccounted."""
    set_dirty(path)
    for k in range(3):
        poke(path, lay.refcount_at(lay.data // lay.cluster + k), ">H", 0)


def _truncate(at: Callable[[Layout], int]) -> Corruption:
    return lambda path, lay: os.truncate(path, at(lay))


CORRUPTIONS: dict[str, Corruption] = {
    "leak-past-used-end": _grow_and_leak,
    "refcount-bumped": lambda p, lay: poke(p, lay.refcount_at(lay.data // lay.cluster), ">H", 2),
    "refcount-zeroed": lambda p, lay: poke(p, lay.refcount_at(lay.data // lay.cluster), ">H", 0),
    "metadata-refcount-zeroed": lambda p, lay: poke(p, lay.refcount_at(lay.l1 // lay.cluster), ">H", 0),
    "dirty-bit-and-lost-refcounts": _set_dirty_and_forget,
    "l1-entry-past-eof": lambda p, lay: poke(p, lay.l1, ">Q", COPIED | 1 << 40),
    "l1-entry-unaligned": lambda p, lay: poke(p, lay.l1, ">Q", COPIED | lay.l2 + 512),
    "l1-entries-share-l2": lambda p, lay: poke(p, lay.l1 + 8, ">Q", COPIED | lay.l2),
    "l2-entry-past-eof": lambda p, lay: poke(p, lay.l2, ">Q", COPIED | 1 << 40),
    "l2-entry-on-l1-table": lambda p, lay: poke(p, lay.l2, ">Q", COPIED | lay.l1),
    "l2-entry-reserved-bits": lambda p, lay: poke(p, lay.l2, ">Q", COPIED | lay.data | 2),
    "copied-flag-cleared": lambda p, lay: poke(p, lay.l2, ">Q", lay.data),
    "truncated-in-data": _truncate(lambda lay: lay.data + lay.cluster + 1000),
    "truncated-before-tables": _truncate(lambda lay: 200),
    "truncated-header": _truncate(lambda lay: 50),
    "header-l1-past-eof": lambda p, lay: poke(p, 40, ">Q", 1 << 30),
    "header-l1-unaligned": lambda p, lay: poke(p, 40, ">Q", lay.l1 + 8),
    "header-reftable-past-eof": lambda p, lay: poke(p, 48, ">Q", 1 << 30),
    "refblock-is-reftable-loop": lambda p, lay: poke(p, lay.reftable, ">Q", lay.reftable),
    "refblock-shared-by-two-entries": lambda p, lay: poke(p, lay.reftable + 8, ">Q", lay.refblock),
    "refblock-unaligned": lambda p, lay: poke(p, lay.reftable, ">Q", lay.refblock + 512),
    "refblock-past-eof": lambda p, lay: poke(p, lay.reftable, ">Q", 1 << 40),
    "bad-magic": lambda p, lay: poke(p, 0, ">I", 0x12345678),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_counts_agree_with_qemu(tmp_path: Path, name: str) -> None:
    path = victim(tmp_path)
    CORRUPTIONS[name](path, layout(path))
    result = assert_agrees(path)
    if result is not None and name not in ("leak-past-used-end",):
        assert result.corruptions, result
    if name == "leak-past-used-end":
        assert result is not None and result.leaks == 1 and result.corruptions == 0 and exit_code(result) == 3


def test_compressed_cluster_with_copied_flag(tmp_path: Path) -> None:
    path = _compressed(tmp_path)
    lay = layout(path)
    poke(path, lay.l2, ">Q", read_u64(path, lay.l2) | COPIED)
    result = assert_agrees(path)
    assert result is not None and result.corruptions == 1


@pytest.mark.parametrize("extended", [False, True])
def test_external_data_file_offset_zero_is_a_host_cluster_when_copied(tmp_path: Path, extended: bool) -> None:
    """In an external data file, offset 0 is a real host cluster: COPIED tells it from unallocated."""
    data_file = tmp_path / "data.raw"
    path = create(tmp_path / "img.qcow2", "4M", f"data_file={data_file},extended_l2={'on' if extended else 'off'}")
    qemu_io(path, "write -P 1 0 64k")
    lay = layout(path)
    assert read_u64(path, lay.l2) == COPIED  # guest cluster 0 lies at offset 0 of the data file
    zero_bitmap = 0xFFFFFFFF << 32
    # (entry, extended L2 bitmap, allocated clusters): the zero flag makes a standard entry
    # plain zeroes, while an extended entry still holds its cluster when the bitmap says zero.
    cases = [(COPIED, 0xFFFFFFFF, 1), (0, 0, 0)]
    cases += [(COPIED, zero_bitmap, 1)] if extended else [(COPIED | 1, 0, 0)]
    for entry, bitmap, allocated in cases:
        poke(path, lay.l2, ">Q", entry)
        if extended:
            poke(path, lay.l2 + 8, ">Q", bitmap)
        result = assert_agrees(path)
        assert result is not None and result.allocated_clusters == allocated, (hex(entry), result)


def test_broken_bitmap_directory_is_a_failed_check_not_a_crash(tmp_path: Path) -> None:
    path = _bitmaps(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        directory = bitmap_directory(load_header(ImageFile(fd)))
    finally:
        os.close(fd)
    assert directory is not None
    poke(path, directory.offset + 16, ">B", 7)  # bitmap type 7 does not exist
    result = assert_agrees(path)  # qemu refuses to open it: the check fails (exit 1) on both sides
    assert result is not None and result.check_errors == 1 and exit_code(result) == 1


def test_refcount_overflow_with_one_bit_refcounts(tmp_path: Path) -> None:
    path = victim(tmp_path, "refcount_bits=1")
    lay = layout(path)
    poke(path, lay.l2 + 8, ">Q", read_u64(path, lay.l2))  # two guest clusters, one host cluster
    result = assert_agrees(path)
    assert result is not None and any("overflow" in e for e in result.errors)


# -- 3. repair -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "leak-past-used-end",
        "refcount-bumped",
        "refcount-zeroed",
        "metadata-refcount-zeroed",
        "dirty-bit-and-lost-refcounts",
        "refblock-is-reftable-loop",
        "refblock-shared-by-two-entries",
        "refblock-unaligned",
        "header-reftable-past-eof",
        "copied-flag-cleared",
    ],
)
def test_repair_makes_qemu_check_clean_and_keeps_data(tmp_path: Path, name: str) -> None:
    path = victim(tmp_path)
    before = keep_copy(path)
    CORRUPTIONS[name](path, layout(path))
    result = repair_refcounts(str(path))
    assert exit_code(result) == 0 and result.corruptions == result.leaks == 0, result.errors
    assert qemu_check(path)[1] == 0, qemu_check(path)
    assert qemu_check(path)[0] == result.to_json()
    assert_same_guest_data(before, path)
    assert image_info(str(path))["dirty-flag"] is False


def test_repair_after_qemu_io_killed_with_lazy_refcounts(tmp_path: Path) -> None:
    path = create(tmp_path / "lazy.qcow2", "8M", "lazy_refcounts=on,cluster_size=4096")
    qemu_io(path, "write -P 3 0 64k")
    result = run(require("qemu-io"), "-f", "qcow2", "-c", "write -P 5 256k 320k", "-c", "sigraise 9", path, check=False)
    assert result.returncode == -9, result
    assert assert_info_agrees(path)["dirty-flag"] is True
    dirty = assert_agrees(path)
    assert dirty is not None and dirty.corruptions > 0
    before = keep_copy(path)
    repaired = repair_refcounts(str(path))
    assert exit_code(repaired) == 0 and qemu_check(path)[1] == 0
    assert_same_guest_data(before, path)
    assert assert_info_agrees(path)["dirty-flag"] is False
    qemu_io(path, "read -P 5 256k 320k", "read -P 3 0 64k")


def test_repair_of_snapshot_and_extended_l2_images(tmp_path: Path) -> None:
    for name in ("snapshots", "extended-l2", "refcount-64"):
        sub = tmp_path / name
        sub.mkdir()
        path = MADE[name](sub)
        before = keep_copy(path)
        set_dirty(path)  # and all refcounts gone
        lay = layout(path)
        with path.open("r+b") as fh:
            fh.seek(lay.refblock)
            fh.write(bytes(lay.cluster))
        assert repair_refcounts(str(path)).corruptions == 0
        assert qemu_check(path)[1] == 0, qemu_check(path)
        assert_same_guest_data(before, path)


def test_repair_refuses_what_refcounts_cannot_fix(tmp_path: Path) -> None:
    path = victim(tmp_path)
    CORRUPTIONS["l2-entry-past-eof"](path, layout(path))
    digest = sha256(path)
    with pytest.raises(ImageError, match="cannot repair"):
        repair_refcounts(str(path))
    assert sha256(path) == digest


# -- 4. garbage: a result or ImageError, never anything else ---------------------------------


def test_garbage_gives_results_or_image_errors(tmp_path: Path) -> None:
    for data in (b"", b"QFI", b"QFI\xfb", b"QFI\xfb" + bytes(100), b"\0" * 4096):
        path = tmp_path / "tiny.qcow2"
        path.write_bytes(data)
        with pytest.raises(ImageError):
            check_image(str(path))
        with pytest.raises(ImageError):
            image_info(str(path), "qcow2")
    with pytest.raises(ImageError):
        check_image(str(tmp_path / "missing.qcow2"))
    base = victim(tmp_path).read_bytes()
    rng = random.Random(7)
    for i in range(150):
        mutant = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            at = rng.choice([rng.randrange(112), rng.randrange(len(mutant))])
            mutant[at] = rng.randrange(256)
        if i % 5 == 0:
            del mutant[rng.randrange(len(mutant)) :]
        path = tmp_path / f"garbage{i}.qcow2"
        path.write_bytes(mutant)
        try:
            check_image(str(path))
            image_info(str(path))
        except ImageError:
            pass
        path.unlink()


def _mutate(data: bytearray, rng: random.Random) -> bytearray:
    """Hit the metadata: an L1, L2, refcount table or block entry, a header field, or the length."""
    cluster = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_size, l1, reftable = struct.unpack_from(">IQQ", data, 36)
    l2s = [struct.unpack_from(">Q", data, l1 + 8 * i)[0] & 0x00FFFFFFFFFFFE00 for i in range(min(l1_size, 8))]
    blocks = [struct.unpack_from(">Q", data, reftable + 8 * i)[0] for i in range(4)]
    kind = rng.randrange(4)
    if kind == 0:
        return data[: rng.randrange(cluster, len(data))]
    if kind == 1:
        at, fmt = rng.choice([(36, ">I"), (40, ">Q"), (48, ">Q"), (56, ">I"), (60, ">I"), (64, ">Q")])
        struct.pack_into(fmt, data, at, rng.choice([0, 1, cluster, len(data) // cluster * cluster, 1 << 30]))
        return data
    base = rng.choice([l1, reftable, *[o for o in l2s + blocks if o and o + cluster <= len(data)]])
    at = base + 8 * rng.randrange(min(cluster, 512) // 8)
    if kind == 2:
        old = struct.unpack_from(">Q", data, at)[0]
        new = rng.choice([0, old ^ COPIED, old + cluster, old | 1, old | 2, reftable, l1, len(data) + cluster, 1 << 62])
        struct.pack_into(">Q", data, at, new % (1 << 64))
    else:
        data[at + rng.randrange(8)] = rng.randrange(256)
    return data


BASES: dict[str, Callable[[Path], Path]] = {
    "512": MADE["512"],
    "snapshots": _snapshot,
    "extended-l2": MADE["extended-l2"],
    "compressed": _compressed,
    "refcount-4": _plain("refcount_bits=4,cluster_size=1024"),
    "compat-0.10": MADE["compat-0.10"],
}


@pytest.mark.parametrize("name", sorted(BASES))
def test_random_metadata_corruptions_agree_with_qemu(tmp_path: Path, name: str) -> None:
    base = BASES[name](tmp_path).read_bytes()
    rng = random.Random(name)
    for i in range(60):
        path = tmp_path / f"mutant{i}.qcow2"
        path.write_bytes(_mutate(bytearray(base), rng))
        assert_agrees(path)
        path.unlink()
