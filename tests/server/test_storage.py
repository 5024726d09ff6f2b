"""Raw storage behind the server: zeroing over NBD, policies, a full disk and a
dropped connection. Nothing may be lost or half-written."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import Command, Option
from tests.conftest import random_file, server_command
from tests.peers import nbd

pytestmark = pytest.mark.peer

MiB = 1 << 20


@pytest.mark.parametrize(
    ("detect", "discard", "hole"),
    [("off", "unmap", False), ("on", "unmap", False), ("unmap", "unmap", True), ("unmap", "ignore", False)],
)
def test_detect_zeroes_policy(tmp_path: Path, serve, detect: str, discard: str, hole: bool) -> None:  # type: ignore[no-untyped-def]
    image = random_file(tmp_path / "d.raw", 4 * MiB)
    srv = serve("-f", "raw", "-t", "--detect-zeroes", detect, "--discard", discard, str(image))
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(bytes(2 * MiB), MiB)
    h.flush()
    assert h.pread(2 * MiB, MiB) == bytes(2 * MiB)
    h.shutdown()
    assert srv.stop() == 0
    allocated = os.stat(image).st_blocks * 512
    assert (allocated <= 2 * MiB + 65536) == hole, allocated
    assert image.read_bytes()[MiB : 3 * MiB] == bytes(2 * MiB)


def test_fast_zero_over_nbd_on_tmpfs(shm_image: Path, serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve("-f", "raw", "-t", "--discard", "unmap", str(shm_image))
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    before = h.pread(MiB, 0)
    with pytest.raises(nbd.Error) as err:
        h.zero(MiB, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert err.value.errno == "ENOTSUP"
    assert h.pread(MiB, 0) == before
    h.zero(MiB, 0, nbd.CMD_FLAG_NO_HOLE)  # without FAST_ZERO the slow path zeroes
    h.zero(MiB, MiB, nbd.CMD_FLAG_FAST_ZERO)  # may punch: fast
    assert h.pread(2 * MiB, 0) == bytes(2 * MiB)
    h.shutdown()


def test_full_disk_gets_enospc_and_the_server_carries_on(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes past 1 MiB fail with EFBIG, as a full disk would."""
    image = tmp_path / "d.raw"
    with open(image, "wb") as f:
        f.write(b"\x01" * MiB)
        f.truncate(4 * MiB)

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))

    proc = subprocess.Popen(
        server_command("serve", "-f", "raw", "-e", "2", "-p", "0", str(image)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit_file_size,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        uri = f"nbd://127.0.0.1:{port}/"
        h, other = nbd.NBD(), nbd.NBD()
        h.connect_uri(uri)
        other.connect_uri(uri)
        with pytest.raises(nbd.Error) as err:
            h.pwrite(b"\x02" * 65536, 2 * MiB)
        assert err.value.errno == "ENOSPC"
        h.pwrite(b"\x03" * 4096, 0)  # below the limit: fine
        h.flush()
        assert other.pread(4096, 0) == b"\x03" * 4096
        assert other.pread(65536, 2 * MiB) == bytes(65536)  # nothing half-written
        h.shutdown()
        other.shutdown()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_connection_dropped_mid_payload_writes_nothing(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    image = random_file(tmp_path / "d.raw", 4 * MiB)
    before = image.read_bytes()
    srv = serve("-f", "raw", "-t", "-e", "2", str(image))
    witness = nbd.NBD()
    witness.connect_uri(srv.uri)
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.recv(wire.GREETING.size, socket.MSG_WAITALL)
        sock.sendall(wire.CLIENT_FLAGS.pack(3) + wire.encode_option(Option.EXPORT_NAME, b""))
        sock.recv(wire.EXPORT_NAME_REPLY.size, socket.MSG_WAITALL)
        sock.sendall(wire.encode_request(Command.WRITE, 1, MiB, MiB) + b"\xee" * (MiB // 2))
    time.sleep(0.3)
    assert witness.pread(MiB, MiB) == before[MiB : 2 * MiB]  # the half request never reached the disk
    witness.pwrite(b"\x05" * 512, 0)
    witness.shutdown()
    assert srv.stop() == 0
    after = image.read_bytes()
    assert after[:512] == b"\x05" * 512 and after[512:] == before[512:]
