"""ConnectionPool against real servers: every handshake starts at once; without multi-conn the extra
connections are closed with NBD_CMD_DISC before carrying a request (nbdkit's own log shows it), and a
single-client server (qemu-nbd -e 1, qemu-nbd's default, our own server with shared=1, even when the
server sees another connection before the first one started) still gets a working pool; a multi-conn
server with fewer free slots gives fewer connections; nbd-server (forking) allows multi-conn. Over a
unix socket only one handshake starts unless the server shows multi-conn (at_once=True overrides)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sendense_nbd import Export, NBDServer, memory_device
from sendense_nbd.client import ConnectionPool, connect
from sendense_nbd.errors import OptionError
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
    async with ConnectionPool(uri, connections=4, at_once=True) as pool:
        elapsed = time.monotonic() - started
        assert len(pool) == 4 and pool.first.can_multi_conn
        assert elapsed < 3.6, f"4 handshakes of 2 s each took {elapsed:.1f} s: not concurrent"


async def test_unix_socket_starts_one_handshake_and_the_others_only_with_multi_conn(
    spawner: Processes, nbdkit: Callable[..., str], tmp_path: Path
) -> None:
    # Over a unix socket a round trip costs nothing, a handshake may cost the server a lot (nbdkit-vddk
    # opens the disk in VDDK for each): without multi-conn the server sees a single connection.
    log = tmp_path / "nbdkit.log"
    uri = _verbose_nbdkit(spawner, log, "--filter=multi-conn", "memory", "8M", "multi-conn-mode=disable")
    async with ConnectionPool(uri, connections=4) as pool:
        assert len(pool) == 1 and not pool.first.can_multi_conn
        await pool.next().pwrite(b"\x11" * 4096, offset=0)
    assert _wait_for_lines(log, DISC_LINE, 1) == 1
    assert log.read_text().count("accepted connection") == 1
    async with ConnectionPool(nbdkit("memory", "8M"), connections=4) as pool:
        assert len(pool) == 4 and pool.first.can_multi_conn


async def test_extras_are_closed_with_disc_without_multi_conn(spawner: Processes, tmp_path: Path) -> None:
    # delay-open keeps every handshake in progress when the first one is ready; dropping them there
    # would crash nbdkit 1.32's multi-conn filter (an assertion in multi_conn_close).
    log = tmp_path / "nbdkit.log"
    uri = _verbose_nbdkit(
        spawner, log, "--filter=multi-conn", "--filter=delay", "memory", "8M", "multi-conn-mode=disable", "delay-open=1"
    )
    pool = await ConnectionPool(uri, connections=4, at_once=True).open()
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
        async with ConnectionPool(uri, connections=4, at_once=True) as pool:
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


class _HoldFirstRelay:
    """A unix-socket relay to ``upstream`` that holds back the first connection it accepts (the pool's
    first started handshake: a unix connect is queued at once, in order): it reaches the server only after
    ``hold`` seconds, unless its client hangs up first. The server thus serves another connection first."""

    def __init__(self, path: str, upstream: str, hold: float = 5.0) -> None:
        self.path, self.upstream, self.hold = path, upstream, hold
        self.accepted = 0
        self.first_dropped = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> _HoldFirstRelay:
        self._server = await asyncio.start_unix_server(self._handle, path=self.path)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.accepted == 1:
            # An NBD client sends nothing before the server's greeting: b"" here means it hung up.
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), self.hold) == b"":
                    self.first_dropped.set()
                    writer.close()
                    return
        up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(_pump(source, sink))
            self._tasks.add(task)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    finally:
        sink.close()


async def test_single_client_server_that_serves_another_handshake_first(spawner: Processes) -> None:
    # Our server with shared=1 accepts the first NBD_OPT_GO it gets and refuses the others
    # (NBD_REP_ERR_POLICY). The relay lets a later handshake reach it first: the pool must take that
    # one, not wait for (and fail with) the one it started first.
    served, relayed = spawner.socket_path(), spawner.socket_path()
    async with NBDServer([Export("disk", memory_device(4 * MiB))], port=None, unix_path=served, shared=1) as server:
        async with _HoldFirstRelay(relayed, served) as relay:
            started = time.monotonic()
            async with ConnectionPool(unix_uri(relayed, "disk"), connections=4, at_once=True) as pool:
                assert time.monotonic() - started < 4, "the pool waited for the handshake the server had not served"
                assert len(pool) == 1 and not pool.first.can_multi_conn
                await asyncio.wait_for(relay.first_dropped.wait(), 5)  # it never reached the server
                assert relay.accepted == 4
                await pool.next().pwrite(b"\x33" * 4096, offset=0)
                await pool.flush()
                assert await pool.next().pread(offset=0, length=4096) == b"\x33" * 4096
                assert server.client_count == server.clients_served == 1


async def test_default_qemu_nbd_serves_the_pool_and_exits(spawner: Processes, tmp_path: Path) -> None:
    # qemu-nbd's defaults: one client (-e 1) and exit when it leaves (no -t). The others wait in its
    # listen queue unanswered; the pool must not wait for them.
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * (4 * MiB))
    sock = spawner.socket_path()
    proc = spawner.start_unix([require("qemu-nbd"), "-f", "raw", "-k", sock, str(image)], sock)
    started = time.monotonic()
    async with ConnectionPool(unix_uri(sock), connections=4, at_once=True) as pool:
        assert time.monotonic() - started < 10
        assert len(pool) == 1 and not pool.first.can_multi_conn
        await pool.next().pwrite(b"\x44" * 4096, offset=MiB)
        await pool.flush()
    assert await asyncio.to_thread(proc.wait, 15) == 0
    assert image.read_bytes()[MiB : MiB + 4096] == b"\x44" * 4096


async def test_multi_conn_server_with_fewer_slots_gives_fewer_connections(spawner: Processes, tmp_path: Path) -> None:
    # qemu-nbd -e 2 advertises multi-conn and leaves a third client unanswered in its listen queue;
    # our server with shared=2 refuses it (NBD_REP_ERR_POLICY). Either way the pool gets two connections,
    # whether it starts every handshake at once or the others after the first.
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * (4 * MiB))
    sock = spawner.socket_path()
    spawner.start_unix([require("qemu-nbd"), "-f", "raw", "-k", sock, "-t", "-e", "2", str(image)], sock)
    ours = spawner.socket_path()
    async with NBDServer(
        [Export("disk", memory_device(4 * MiB))], port=None, unix_path=ours, shared=2, persistent=True
    ) as server:
        for uri, at_once in itertools.product((unix_uri(sock), unix_uri(ours, "disk")), (False, True)):
            started = time.monotonic()
            async with ConnectionPool(uri, connections=4, at_once=at_once) as pool:
                assert time.monotonic() - started < 10
                assert len(pool) == 2 and pool.first.can_multi_conn
                first, second = pool.connections
                await first.pwrite(b"\x55" * 4096, offset=0)
                await pool.flush()
                assert await second.pread(offset=0, length=4096) == b"\x55" * 4096
        assert server.clients_served == 4  # two per pool; the others were refused, not admitted


async def test_pool_fails_when_every_handshake_fails() -> None:
    async with NBDServer([Export("disk", memory_device(MiB))], port=0, shared=4) as server:
        with pytest.raises(OptionError) as caught:
            await ConnectionPool(f"nbd://127.0.0.1:{server.port}/nope", connections=3).open()
        assert caught.value.unknown_export
