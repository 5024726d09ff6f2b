"""Our server judged by the clients the world trusts: qemu-img, qemu-io,
nbdinfo, nbdcopy and qemu-nbd -L."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import random_file, require, run, sparse_file

pytestmark = pytest.mark.peer

MiB = 1024 * 1024


def test_qemu_img_convert_into_and_out_of_export(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    src = sparse_file(tmp_path / "src.raw", 32 * MiB, [(0, 3 * MiB), (10 * MiB, 512 * 1024), (31 * MiB, MiB)])
    target = sparse_file(tmp_path / "target.raw", 32 * MiB, [])
    srv = serve("-f", "raw", "-t", str(target))
    run(require("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.qemu_uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.qemu_uri)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.qemu_uri, str(back))
    assert back.read_bytes() == src.read_bytes()
    assert srv.stop() == 0
    assert target.read_bytes() == src.read_bytes()


def test_qemu_img_map_reports_holes_and_data(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    image = sparse_file(tmp_path / "img.raw", 16 * MiB, [(2 * MiB, MiB), (8 * MiB, 2 * MiB)])
    srv = serve("-f", "raw", "-t", "-r", str(image))
    result = run("qemu-img", "map", "--output=json", "-f", "raw", srv.qemu_uri)
    extents = json.loads(result.stdout)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data == [(2 * MiB, MiB), (8 * MiB, 2 * MiB)]
    holes = [(e["start"], e["length"]) for e in extents if not e["data"]]
    assert all(e["zero"] for e in extents if not e["data"])
    assert sum(length for _, length in holes) == 13 * MiB


def test_qemu_io_patterns_zeroes_discard_flush_aio(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    image = random_file(tmp_path / "img.raw", 16 * MiB)
    srv = serve("-f", "raw", "-t", "--discard", "unmap", str(image))
    commands = [
        "write -P 0xab 1M 64k",
        "read -P 0xab 1M 64k",
        "write -P 0x11 100 3000",  # unaligned
        "read -P 0x11 100 3000",
        "write -z 2M 1M",
        "read -P 0 2M 1M",
        "discard 4M 1M",
        "read -P 0 4M 1M",
        "flush",
        "aio_write -P 0xcd 8M 1M",
        "aio_write -P 0xce 9M 1M",
        "aio_flush",
        "aio_read -P 0xcd 8M 1M",
        "aio_read -P 0xce 9M 1M",
        "aio_flush",
        "write -z -u 12M 2M",
        "read -P 0 12M 2M",
    ]
    args: list[str] = []
    for c in commands:
        args += ["-c", c]
    result = run(require("qemu-io"), "-f", "raw", *args, srv.qemu_uri)
    assert "Pattern verification failed" not in result.stdout + result.stderr
    assert result.stdout.count("read ") == 7
    assert srv.stop() == 0
    data = image.read_bytes()
    assert data[1 * MiB : 1 * MiB + 65536] == b"\xab" * 65536
    assert data[2 * MiB : 3 * MiB] == bytes(MiB)
    assert data[4 * MiB : 5 * MiB] == bytes(MiB)
    assert data[8 * MiB : 9 * MiB] == b"\xcd" * MiB
    assert data[9 * MiB : 10 * MiB] == b"\xce" * MiB
    # discard=unmap punched a real hole
    assert os.stat(image).st_blocks * 512 < 16 * MiB


def test_nbdinfo_list_json_map_can(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = sparse_file(tmp_path / "disk.raw", 8 * MiB, [(MiB, MiB)])
    other = sparse_file(tmp_path / "other.raw", 4 * MiB, [])
    srv = serve(
        "-f", "raw", "-t", "-e", "4", "-x", "disk", "-D", "the system disk", "-x", "data", str(disk), str(other)
    )
    listing = json.loads(run(require("nbdinfo"), "--list", "--json", srv.uri).stdout)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"disk", "data"}
    assert exports["disk"]["export-size"] == 8 * MiB
    assert exports["disk"]["description"] == "the system disk"
    assert exports["data"]["export-size"] == 4 * MiB

    info = json.loads(run("nbdinfo", "--json", srv.uri_for("disk")).stdout)
    assert info["protocol"] == "newstyle-fixed"
    export = info["exports"][0]
    assert export["can_multi_conn"] is True
    assert export["can_flush"] is True and export["can_fua"] is True and export["can_zero"] is True
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]
    assert export["block_size_maximum"] == 32 * MiB

    mapping = json.loads(run("nbdinfo", "--map", "--json", srv.uri_for("disk")).stdout)
    assert [(m["offset"], m["length"], m["type"]) for m in mapping] == [
        (0, MiB, 3),
        (MiB, MiB, 0),
        (2 * MiB, 6 * MiB, 3),
    ]
    for flag, expected in [("flush", 0), ("fua", 0), ("zero", 0), ("multi-conn", 0), ("df", 0), ("write", 0)]:
        assert run("nbdinfo", "--can", flag, srv.uri_for("disk"), check=False).returncode == expected, flag
    assert run("nbdinfo", "--is", "read-only", srv.uri_for("disk"), check=False).returncode == 2


def test_nbdinfo_read_only_and_single_client_flags(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = sparse_file(tmp_path / "disk.raw", MiB, [])
    srv = serve("-f", "raw", "-t", "-r", str(disk))
    assert run("nbdinfo", "--is", "read-only", srv.uri, check=False).returncode == 0
    assert run("nbdinfo", "--can", "write", srv.uri, check=False).returncode == 2
    assert run("nbdinfo", "--can", "zero", srv.uri, check=False).returncode == 2
    # --shared 1 (the default): multi-conn would be a lie about a single client.
    assert run("nbdinfo", "--can", "multi-conn", srv.uri, check=False).returncode == 2


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_nbdcopy_round_trip_four_connections(tmp_path: Path, serve, unix: bool) -> None:  # type: ignore[no-untyped-def]
    src = sparse_file(tmp_path / "src.raw", 48 * MiB, [(0, 8 * MiB), (20 * MiB, 5 * MiB + 123), (47 * MiB, MiB)])
    target = sparse_file(tmp_path / "target.raw", 48 * MiB, [])
    srv = serve(
        "-f",
        "raw",
        "-t",
        "-e",
        "8",
        "--discard",
        "unmap",
        str(target),
        unix=str(tmp_path / "nbd.sock") if unix else None,
    )
    run(require("nbdcopy"), "--flush", "--connections=4", str(src), srv.uri)
    back = tmp_path / "back.raw"
    run("nbdcopy", "--connections=4", srv.uri, str(back))
    run("cmp", str(src), str(back))
    assert srv.stop() == 0
    run("cmp", str(src), str(target))
    # holes stayed holes: nbdcopy zeroed them with WRITE_ZEROES, punched with --discard unmap
    assert os.stat(target).st_blocks * 512 <= 16 * MiB


def test_qemu_nbd_list_against_our_server(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = sparse_file(tmp_path / "disk.raw", 2 * MiB, [])
    srv = serve("-f", "raw", "-t", "-e", "2", "-x", "vm-disk-2000", "-D", "backup target", str(disk))
    out = run(require("qemu-nbd"), "-L", "-b", "127.0.0.1", "-p", str(srv.port)).stdout
    assert "exports available: 1" in out
    assert "export: 'vm-disk-2000'" in out
    assert "description: backup target" in out
    assert f"size:  {2 * MiB}" in out
    assert "base:allocation" in out


def test_qemu_img_info_over_nbd(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = sparse_file(tmp_path / "disk.raw", 5 * MiB, [])
    srv = serve("-f", "raw", "-t", str(disk))
    info = json.loads(run("qemu-img", "info", "--output=json", srv.qemu_uri).stdout)
    assert info["virtual-size"] == 5 * MiB


def test_cache_none_round_trip(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    src = random_file(tmp_path / "src.raw", 8 * MiB + 4096 * 3)
    target = sparse_file(tmp_path / "target.raw", src.stat().st_size, [])
    srv = serve("-f", "raw", "-t", "--cache", "none", str(target))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000 5000", srv.qemu_uri)  # unaligned path
    run("nbdcopy", "--flush", str(src), srv.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.qemu_uri)
    assert srv.stop() == 0
    run("cmp", str(src), str(target))
