"""``sendense-nbd serve`` against real peers: port probes, deadlines, the TRIM flag as qemu-nbd."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import random_file, require, run, server_command, stop_process
from tests.peers import nbd

pytestmark = pytest.mark.peer

MiB = 1 << 20


def _probe(port: int) -> None:
    """Connect and close at once, as systemd, a monitor or a 'wait for the port' script does."""
    socket.create_connection(("127.0.0.1", port), timeout=5).close()


def _nbdinfo(uri: str) -> dict:  # type: ignore[type-arg]
    info = json.loads(run("nbdinfo", "--json", uri, timeout=20).stdout)
    [export] = info["exports"]
    return export  # type: ignore[no-any-return]


def test_probe_then_client_with_default_shared(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    """qemu-nbd serves the client 10 times out of 10; a probe must not take the only slot."""
    disk = random_file(tmp_path / "d.raw", MiB)
    srv = serve("-f", "raw", "-t", str(disk))
    for _ in range(10):
        _probe(srv.port)
        assert _nbdinfo(srv.uri)["export-size"] == MiB
    # A connection that never negotiates cannot keep the real client out, however long it stays.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5):
        assert _nbdinfo(srv.uri)["export-size"] == MiB
    assert srv.alive()


def test_non_persistent_server_survives_a_probe(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = random_file(tmp_path / "d.raw", MiB)
    srv = serve("-f", "raw", str(disk))
    _probe(srv.port)
    time.sleep(0.3)
    assert srv.alive(), "the probe made the server exit"
    assert _nbdinfo(srv.uri)["export-size"] == MiB  # not ECONNRESET
    assert srv.proc.wait(timeout=10) == 0  # the negotiated client left: now it exits


def test_handshake_limit_flag(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    disk = random_file(tmp_path / "d.raw", MiB)
    srv = serve("-f", "raw", "-t", "--handshake-limit", "0.5", "--io-timeout", "5", str(disk))
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    start = time.monotonic()
    with idle:
        assert idle.recv(18)  # the greeting
        while idle.recv(4096):
            pass  # closed by the server
    assert time.monotonic() - start < 4
    assert _nbdinfo(srv.uri)["export-size"] == MiB


def test_help_documents_the_limits() -> None:
    result = subprocess.run(server_command("serve", "--help"), capture_output=True, text=True, timeout=30)
    text = " ".join(result.stdout.split())
    assert "--handshake-limit SECONDS" in text and "[default: 10" in text
    assert "--io-timeout SECONDS" in text and "[default: 60" in text
    assert "--max-handshakes" in text and "[default: 128" in text


def _qemu_nbd(tmp_path: Path, image: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = tmp_path / f"qemu-{image.name}.sock"
    proc = subprocess.Popen(
        [require("qemu-nbd"), "-f", "raw", "-k", str(sock), "-t", *args, str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.02)
    return proc, f"nbd+unix:///?socket={sock}"


@pytest.mark.parametrize("options", [["--discard", "ignore"], ["--discard", "unmap"], ["--read-only"]])
def test_trim_advertised_as_qemu_nbd_does(tmp_path: Path, serve, options: list[str]) -> None:  # type: ignore[no-untyped-def]
    ours_image = random_file(tmp_path / "ours.raw", MiB, seed=3)
    theirs_image = random_file(tmp_path / "theirs.raw", MiB, seed=3)
    qemu_options = [o.replace("--discard", "--discard=") for o in options]
    qemu_options = ["".join(qemu_options)] if options[0] == "--discard" else ["-r"]
    proc, qemu_uri = _qemu_nbd(tmp_path, theirs_image, *qemu_options)
    try:
        theirs = _nbdinfo(qemu_uri)
    finally:
        stop_process(proc)
    srv = serve("-f", "raw", "-t", *options, str(ours_image))
    ours = _nbdinfo(srv.uri)
    assert ours["can_trim"] == theirs["can_trim"] == ("--read-only" not in options)
    assert ours["is_read_only"] == theirs["is_read_only"]


@pytest.mark.parametrize("discard", ["ignore", "unmap"])
def test_trim_under_each_discard_policy(tmp_path: Path, serve, discard: str) -> None:  # type: ignore[no-untyped-def]
    image = random_file(tmp_path / "d.raw", MiB, seed=4)
    before = image.read_bytes()
    srv = serve("-f", "raw", "-t", "--discard", discard, str(image))
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    assert h.can_trim()
    h.trim(256 * 1024, 0)
    h.flush()
    head = h.pread(4096, 0)
    h.shutdown()
    if discard == "ignore":  # a no-op that succeeds, as in qemu-nbd
        assert head == before[:4096]
        assert image.read_bytes() == before
    else:  # the hole is punched
        assert head == bytes(4096)
        assert os.stat(image).st_blocks * 512 <= MiB - 256 * 1024
