"""ConnectionPool against real servers: every handshake starts at once; without multi-conn the extra
connections are closed with NBD_CMD_DISC before carrying a request (nbdkit's own log shows it), and a
single-client server (qemu-nbd -e 1) still gets a working pool; nbd-server (forking) allows multi-conn."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sendense_nbd.client import ConnectionPool, connect
from tests.conftest import require
from tests.peers import Processes, unix_listening, unix_uri

pytestmark = pytest.mark.peer

MiB = 1 << 20
DISC_LINE = "client sent NBD_CMD_DISC"


def _verbose_nbdkit(spawner: Processes, log: Path, *args: str) -> str:
    """nbdkit -v with its debug log in ``log`` (a file: a pipe nobody reads would fill up)."""
    sock = spawner.socket_path()
    command = [require("nbdkit"), "-f", "-v", "-U", sock, "--exit-with-parent", *args]
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    spawner.procs.append(proc)
    deadline = time.monotonic() + 15
    while not unix_listening(sock):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    return unix_uri(sock)


def _wait_for_lines(log: Path, text: str, count: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (found := log.read_text().count(text)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


async def test_every_handshake_starts_at_once(nbdkit: Callable[..., str]) -> None:
    # Each handshake takes 2 s at the server: one after another (the old way: the first, then the rest)
    # would take at least 4 s; all at once take about 2 s.
    uri = nbdkit("--filter=delay", "memory", "8M", "delay-open=2")
    started = time.monotonic()
    async with ConnectionPool(uri, connections=4) as pool:
        elapsed = time.monotonic() - started
        assert len(pool) == 4 and pool.first.can_multi_conn
        assert elapsed < 3.6, f"4 handshakes of 2 s each took {elapsed:.1f} s: not concurrent"


async def test_extras_are_closed_with_disc_without_multi_conn(spawner: Processes, tmp_path: Path) -> None:
    # delay-open keeps every handshake in progress when the first one is ready; dropping them there
    # would crash nbdkit 1.32's multi-conn filter (an assertion in multi_conn_close).
    log = tmp_path / "nbdkit.log"
    uri = _verbose_nbdkit(
        spawner, log, "--filter=multi-conn", "--filter=delay", "memory", "8M", "multi-conn-mode=disable", "delay-open=1"
    )
    pool = await ConnectionPool(uri, connections=4).open()
    try:
        assert len(pool) == 1 and not pool.first.can_multi_conn
        assert _wait_for_lines(log, DISC_LINE, 3) == 3, log.read_text()[-3000:]
        await pool.next().pwrite(b"\x5a" * 4096, offset=MiB)
        await pool.flush()
        assert await pool.next().pread(offset=MiB, length=4096) == b"\x5a" * 4096
    finally:
        await pool.close()
    assert _wait_for_lines(log, DISC_LINE, 4) == 4, log.read_text()[-3000:]
    assert "Assertion" not in log.read_text()


async def test_single_client_qemu_nbd_gets_one_working_connection(spawner: Processes, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * (4 * MiB))
    sock = spawner.socket_path()
    spawner.start_unix([require("qemu-nbd"), "-f", "raw", "-k", sock, "-t", "-e", "1", str(image)], sock)
    uri = unix_uri(sock)
    for round_ in range(2):  # the server serves the next pool too: the dropped handshakes did not wedge it
        started = time.monotonic()
        async with ConnectionPool(uri, connections=4) as pool:
            assert time.monotonic() - started < 10
            assert len(pool) == 1 and not pool.first.can_multi_conn
            await pool.next().pwrite(bytes([round_ + 1]) * 4096, offset=round_ * 4096)
            await pool.flush()
    async with connect(uri) as nbd:
        assert await nbd.pread(offset=0, length=8192) == b"\x01" * 4096 + b"\x02" * 4096


@pytest.fixture
def forking_nbd_server(spawner: Processes, tmp_path: Path) -> Iterator[str]:
    """nbd-server as a daemon (one process per client) over an 8 MiB file; killed by its pid file."""
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * (8 * MiB))
    sock, pid_file = spawner.socket_path(), tmp_path / "nbd-server.pid"
    conf = tmp_path / "nbd-server.conf"
    conf.write_text(f"[generic]\nunixsock = {sock}\nallowlist = true\n[disk]\nexportname = {image}\nflush = true\n")
    subprocess.run([require("nbd-server"), "-C", str(conf), "-p", str(pid_file)], check=True, timeout=30)
    deadline = time.monotonic() + 15
    while not (unix_listening(sock) and pid_file.exists()):
        assert time.monotonic() < deadline, "nbd-server did not start listening"
        time.sleep(0.01)
    pid = int(pid_file.read_text())
    try:
        yield unix_uri(sock, "disk")
    finally:
        os.kill(pid, signal.SIGTERM)


async def test_nbd_server_gets_every_connection(forking_nbd_server: str) -> None:
    async with ConnectionPool(forking_nbd_server, connections=4) as pool:
        assert len(pool) == 4 and pool.first.can_multi_conn
        for i, client in enumerate(pool.connections):
            await client.pwrite(bytes([i + 1]) * 4096, offset=i * 4096)
        await pool.flush()
        for client in pool.connections:
            assert await client.pread(offset=0, length=4 * 4096) == b"".join(bytes([i + 1]) * 4096 for i in range(4))
