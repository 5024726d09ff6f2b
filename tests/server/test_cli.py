"""``sendense-nbd serve`` and ``create`` as qemu-nbd's callers use them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import random_file, run, server_command, sparse_file, wait_gone
from tests.peers import nbd

pytestmark = pytest.mark.peer

MiB = 1024 * 1024


def _connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_shared_given_as_one_argv_token(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = sparse_file(tmp_path / "d.raw", MiB, [])
    srv = serve("-f", "raw", "-t", "-e 2", str(disk))  # virtnbdbackup passes it this way
    a, b = _connect(srv.uri), _connect(srv.uri)
    assert a.can_multi_conn() and b.can_multi_conn()
    with pytest.raises(nbd.Error):
        _connect(srv.uri)  # the third is over --shared 2
    a.shutdown()
    b.shutdown()


def test_exits_after_last_client_unless_persistent(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = sparse_file(tmp_path / "d.raw", MiB, [])
    srv = serve("-f", "raw", str(disk))
    h = _connect(srv.uri)
    h.pwrite(b"x" * 512, 0)
    h.shutdown()
    assert srv.proc.wait(timeout=10) == 0
    assert disk.read_bytes()[:512] == b"x" * 512

    persistent = serve("-f", "raw", "-t", str(disk))
    for _ in range(2):
        h = _connect(persistent.uri)
        h.shutdown()
    time.sleep(0.3)
    assert persistent.alive()
    assert persistent.stop(signal.SIGINT) == 0


def test_sigterm_finishes_requests_flushes_and_exits_zero(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = sparse_file(tmp_path / "d.raw", 64 * MiB, [])
    srv = serve("-f", "raw", "-t", str(disk))
    h = _connect(srv.uri)
    pattern = bytes(range(256)) * 4096  # 1 MiB
    cookies = [h.aio_pwrite(pattern, i * MiB) for i in range(16)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    assert srv.stop(signal.SIGTERM) == 0
    data = disk.read_bytes()
    assert all(data[i * MiB : (i + 1) * MiB] == pattern for i in range(16))
    with pytest.raises(nbd.Error):
        h.pread(512, 0)


def test_fork_and_pid_file(tmp_path: Path) -> None:
    disk = sparse_file(tmp_path / "d.raw", MiB, [])
    pid_file = tmp_path / "nbd.pid"
    sock = tmp_path / "nbd.sock"
    result = subprocess.run(
        server_command("serve", "-f", "raw", "-t", "--fork", "--pid-file", str(pid_file), "-k", str(sock), str(disk)),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    try:
        h = _connect(f"nbd+unix:///?socket={sock}")  # listening as soon as the parent returned
        h.pwrite(b"forked", 0)
        h.shutdown()
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 10)
    assert not pid_file.exists()
    assert disk.read_bytes()[:6] == b"forked"


def test_systemd_socket_activation(tmp_path: Path) -> None:
    disk = random_file(tmp_path / "d.raw", MiB)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # A tiny stand-in for systemd: the socket becomes fd 3 of the exec'd server.
    launcher = (
        "import os, sys\n"
        "fd = int(sys.argv[1])\n"
        "os.dup2(fd, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            launcher,
            str(listener.fileno()),
            "-m",
            "sendense_nbd",
            "serve",
            "-f",
            "raw",
            "-r",
            "-p",
            "1",
            str(disk),
        ],
        pass_fds=(listener.fileno(),),
        stderr=subprocess.PIPE,
    )
    listener.close()
    try:
        h = _connect(f"nbd://127.0.0.1:{port}/")  # not port 1: the inherited socket
        assert h.pread(MiB, 0) == disk.read_bytes()
        h.shutdown()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_read_only_export_rejects_writes(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = random_file(tmp_path / "d.raw", MiB)
    before = disk.read_bytes()
    srv = serve("-f", "raw", "-t", "-r", str(disk))
    h = _connect(srv.uri)
    assert h.is_read_only()
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as err:
        h.pwrite(b"y" * 512, 0)
    assert err.value.errno == "EPERM"
    assert h.pread(512, 0) == before[:512]
    h.shutdown()
    assert disk.read_bytes() == before


def test_writable_qcow2_is_never_guessed(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(image), "1M")
    probed = subprocess.run(server_command("serve", str(image)), capture_output=True, text=True, timeout=30)
    assert probed.returncode == 1
    assert "looks like qcow2" in probed.stderr and "-f qcow2" in probed.stderr


def test_unformatted_image_served_as_raw_with_warning(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = random_file(tmp_path / "d.raw", MiB)
    srv = serve("-t", "-r", str(disk))
    h = _connect(srv.uri)
    assert h.pread(4096, 4096) == disk.read_bytes()[4096:8192]
    h.shutdown()
    srv.stop()
    assert "was not specified; probed raw" in srv.proc.stderr.read().decode()


def test_missing_image_and_busy_port_are_one_line_errors(tmp_path: Path) -> None:
    missing = subprocess.run(
        server_command("serve", "-f", "raw", str(tmp_path / "nope.raw")), capture_output=True, text=True, timeout=30
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"Error: cannot open {tmp_path / 'nope.raw'}: No such file or directory"
    disk = sparse_file(tmp_path / "d.raw", MiB, [])
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = subprocess.run(
            server_command("serve", "-f", "raw", "-p", str(port), str(disk)), capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize(("size", "expected"), [("1M", MiB), ("3G", 3 << 30), ("4096", 4096), ("1T", 1 << 40)])
def test_create_raw(tmp_path: Path, size: str, expected: int) -> None:
    path = tmp_path / "new.raw"
    run(sys.executable, "-m", "sendense_nbd", "create", "-f", "raw", str(path), size)
    assert path.stat().st_size == expected
    assert path.stat().st_blocks == 0
    again = run(sys.executable, "-m", "sendense_nbd", "create", "-f", "raw", str(path), size, check=False)
    assert again.returncode == 1 and "File exists" in again.stderr


def test_create_rejects_bad_size(tmp_path: Path) -> None:
    result = run(sys.executable, "-m", "sendense_nbd", "create", str(tmp_path / "x.raw"), "12Q", check=False)
    assert result.returncode == 2
    assert "is not a size" in result.stderr


@pytest.mark.parametrize("backing", ["null", "default"])
def test_ovirt_json_filename(tmp_path: Path, serve, backing: str) -> None:  # type: ignore[no-untyped-def]
    base = random_file(tmp_path / "base.raw", MiB)
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    run("qemu-io", "-c", "write -P 0x42 0 4096", str(top))
    tail = ',"backing":null' if backing == "null" else ""
    spec = '{"driver":"qcow2","file":{"driver":"file","filename":"' + str(top) + '"}' + tail + "}"
    srv = serve("-r", "-t", f"json:{spec}")
    h = _connect(srv.uri)
    assert h.pread(4096, 0) == b"\x42" * 4096
    # "backing": null serves the overlay alone, as qemu-nbd does: unallocated clusters read as zeroes
    expected = bytes(4096) if backing == "null" else base.read_bytes()[512 * 1024 : 516 * 1024]
    assert h.pread(4096, 512 * 1024) == expected
    h.shutdown()
