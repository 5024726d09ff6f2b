"""Client behaviour: errors, timeouts, lost connections, old servers, pools,
block-size rules, TCP. Real servers where they can show it (nbdkit filters,
qemu-nbd, nbd-server, ours); a tiny scripted server for what no real one does
on demand (no NBD_OPT_GO, garbage replies, NBD_ESHUTDOWN)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from sendense_nbd import Export, NBDServer, memory_device
from sendense_nbd.client import (
    ClientOptions,
    ConnectionLostError,
    ConnectionPool,
    NBDConnectionError,
    NBDRequestError,
    NBDTimeoutError,
    OptionError,
    connect,
    export_info,
    list_exports,
)
from sendense_nbd.protocol.constants import BASE_ALLOCATION, Errno, Option, OptionReply, TransmissionFlag
from tests.conftest import random_file, start_server
from tests.peers import Processes, unix_uri

pytestmark = pytest.mark.peer

MiB = 1 << 20
READ, WRITE, DISC = 0, 1, 2


# -- a scripted server --------------------------------------------------------------


class ScriptedServer:
    """Refuses every option but NBD_OPT_EXPORT_NAME (like servers before NBD_OPT_GO),
    then answers with simple replies; ``on_request`` may replace a reply."""

    def __init__(self, size: int = MiB, *, fixed: bool = True, no_zeroes: bool = True) -> None:
        self.disk = bytearray(size)
        self.fixed, self.no_zeroes = fixed, no_zeroes
        self.options: list[int] = []
        self.requests: list[int] = []
        self.on_request: Callable[[int, int, int], bytes | None] = lambda command, handle, count: None
        self.server: asyncio.AbstractServer | None = None

    async def start(self, path: str) -> str:
        self.server = await asyncio.start_unix_server(self._serve, path)
        return unix_uri(path, "disk")

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._session(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"NBDMAGICIHAVEOPT" + struct.pack(">H", (1 if self.fixed else 0) | (2 if self.no_zeroes else 0)))
        (client_flags,) = struct.unpack(">I", await reader.readexactly(4))
        while True:
            _, option, length = struct.unpack(">QII", await reader.readexactly(16))
            data = await reader.readexactly(length)
            self.options.append(option)
            if option == Option.EXPORT_NAME:
                break
            writer.write(struct.pack(">QIII", 0x3E889045565A9, option, OptionReply.ERR_UNSUP, 0))
        if data != b"disk":
            return  # the only way to refuse NBD_OPT_EXPORT_NAME
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
        writer.write(struct.pack(">QH", len(self.disk), flags) + (b"" if client_flags & 2 else bytes(124)))
        while True:
            _, _, command, handle, offset, length = struct.unpack(">IHHQQI", await reader.readexactly(28))
            self.requests.append(command)
            if command == DISC:
                return
            payload = await reader.readexactly(length) if command == WRITE else b""
            scripted = self.on_request(command, handle, len(self.requests))
            if scripted is not None:
                writer.write(scripted)
            elif command == READ:
                writer.write(struct.pack(">IIQ", 0x67446698, 0, handle) + self.disk[offset : offset + length])
            else:
                if command == WRITE:
                    self.disk[offset : offset + length] = payload
                writer.write(struct.pack(">IIQ", 0x67446698, 0, handle))
            await writer.drain()


@pytest.mark.parametrize("fixed, no_zeroes", [(True, True), (True, False), (False, False), (False, True)])
async def test_export_name_fallback(spawner: Processes, fixed: bool, no_zeroes: bool) -> None:
    fake = ScriptedServer(fixed=fixed, no_zeroes=no_zeroes)
    uri = await fake.start(spawner.socket_path())
    async with connect(uri) as nbd:
        assert not nbd.used_go and not nbd.structured_replies
        assert nbd.size == MiB and nbd.can_flush and not nbd.can_trim
        assert (nbd.min_block, nbd.preferred_block, nbd.max_block) == (1, 4096, 32 * MiB)
        await nbd.pwrite(b"hello", offset=1000)
        await nbd.flush()
        assert await nbd.pread(offset=999, length=7) == b"\0hello\0"
    assert fake.options == ([Option.STRUCTURED_REPLY, Option.GO] if fixed else []) + [Option.EXPORT_NAME]
    assert fake.requests[-1] == DISC
    await fake.stop()


async def test_export_name_fallback_with_unknown_export(spawner: Processes) -> None:
    fake = ScriptedServer()
    uri = await fake.start(spawner.socket_path())
    with pytest.raises(OptionError) as info:
        await connect(uri.replace("/disk", "/nosuch"))
    assert info.value.unknown_export and info.value.option == Option.EXPORT_NAME
    await fake.stop()


async def test_garbage_reply_fails_every_request_in_flight(spawner: Processes) -> None:
    fake = ScriptedServer()
    fake.on_request = lambda command, handle, count: b"GARBAGE!" * 2 if count == 5 else b""
    uri = await fake.start(spawner.socket_path())
    nbd = await connect(uri)
    results = await asyncio.wait_for(
        asyncio.gather(*(nbd.pread(offset=i * 512, length=512) for i in range(8)), return_exceptions=True), 10
    )
    assert all(isinstance(r, ConnectionLostError) for r in results)
    assert "magic" in str(results[0])
    with pytest.raises(NBDConnectionError):
        await nbd.pread(offset=0, length=512)
    await nbd.close()
    assert nbd.closed
    await fake.stop()


async def test_eshutdown_leads_to_a_soft_disconnect(spawner: Processes) -> None:
    fake = ScriptedServer()
    fake.on_request = lambda command, handle, count: (
        struct.pack(">IIQ", 0x67446698, Errno.ESHUTDOWN, handle) if command == 3 else None
    )
    uri = await fake.start(spawner.socket_path())
    nbd = await connect(uri)
    with pytest.raises(NBDRequestError) as info:
        await nbd.flush()
    assert info.value.errno == Errno.ESHUTDOWN
    await asyncio.wait_for(nbd.wait_closed(), 5)
    assert fake.requests == [3, DISC]
    with pytest.raises(NBDConnectionError, match="shutting down"):
        await nbd.pread(offset=0, length=1)
    await fake.stop()


async def test_connect_failures(spawner: Processes) -> None:
    with pytest.raises(NBDConnectionError, match="cannot connect"):
        await connect(unix_uri(spawner.socket_path()))
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_unix_server(lambda r, w: accepted.append(w), path := spawner.socket_path())
    with pytest.raises(NBDTimeoutError):
        await connect(unix_uri(path), timeout=0.2)
    for writer in accepted:
        writer.close()
    silent.close()
    await silent.wait_closed()


# -- unknown exports on real servers --------------------------------------------------


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit", "nbd-server", "sendense-serve"])
async def test_unknown_export_is_a_clear_error(  # type: ignore[no-untyped-def]
    server: str,
    tmp_path: Path,
    spawner: Processes,
    qemu_nbd,
    nbdkit,
    nbd_server,
) -> None:
    image = random_file(tmp_path / "disk.img", MiB)
    if server == "qemu-nbd":
        uri = qemu_nbd(image, export="disk")
    elif server == "nbdkit":
        uri = nbdkit("--filter=exportname", "memory", "1M", "exportname=disk", "exportname-strict=true")
    elif server == "nbd-server":
        uri = nbd_server(image)()
    else:
        sock = spawner.socket_path()
        spawner.procs.append(start_server("-f", "raw", "-x", "disk", str(image), unix=sock).proc)
        uri = unix_uri(sock, "disk")
    wrong = uri.replace(":///disk?", ":///?").replace(":///?", ":///no-such-disk?")
    with pytest.raises(OptionError, match="no-such-disk") as info:
        await connect(wrong)
    assert info.value.unknown_export and info.value.option == Option.GO


# -- nbdkit's error and delay filters --------------------------------------------------


@pytest.mark.parametrize("structured", [True, False])
async def test_eio_from_the_error_filter(nbdkit, structured: bool) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--filter=error", "memory", "64M", "error-pwrite-rate=100%", "error-trim-rate=100%", "error=EIO")
    async with connect(uri, structured_replies=structured) as nbd:
        with pytest.raises(NBDRequestError) as info:
            await nbd.pwrite(b"x" * 4096, offset=8192)
        assert info.value.errno == Errno.EIO and info.value.raw_errno == 5
        assert "WRITE failed: EIO" in str(info.value)
        with pytest.raises(NBDRequestError) as info:
            await nbd.trim(offset=0, length=MiB)
        assert info.value.errno == Errno.EIO
        assert await nbd.pread(offset=8192, length=4096) == bytes(4096)  # the connection carries on


async def test_some_reads_fail_with_eio_the_rest_are_right(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--filter=error", "pattern", "4M", "error-pread-rate=50%", "error=EIO")
    async with connect(uri) as nbd:
        offsets = [i * 16384 for i in range(100)]
        results = await asyncio.gather(*(nbd.pread(offset=o, length=16384) for o in offsets), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed and len(failed) < 100
    assert all(isinstance(r, NBDRequestError) and r.errno == Errno.EIO for r in failed)
    for offset, data in zip(offsets, results):
        if isinstance(data, bytes):  # the pattern plugin: each 8 bytes hold their offset
            assert data == b"".join(struct.pack(">Q", offset + i) for i in range(0, 16384, 8))


async def test_timeout_abandons_the_read_and_keeps_the_connection(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--filter=delay", "memory", "1M", "rdelay=300ms")
    async with connect(uri, request_timeout=0.1) as nbd:
        await nbd.pwrite(b"\x42" * 4096, offset=0)
        buffer = bytearray(b"\xee") * 4096
        with pytest.raises(NBDTimeoutError, match="READ"):
            await nbd.pread_into(buffer, offset=0)
        with pytest.raises(asyncio.TimeoutError):  # typed, and still an asyncio timeout
            await nbd.pread(offset=0, length=4096)
        await asyncio.sleep(0.5)  # the late replies arrive and are dropped
        assert buffer == b"\xee" * 4096 and nbd.in_flight == 0
        await nbd.pwrite(b"\x43" * 512, offset=0)


async def test_cancelled_read_leaves_its_buffer_alone(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--filter=delay", "data", "( 0x77 )*4096", "rdelay=200ms")
    async with connect(uri) as nbd:
        buffer = bytearray(4096)
        task = asyncio.create_task(nbd.pread_into(buffer, offset=0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await nbd.pread(offset=0, length=4096) == b"\x77" * 4096  # waits behind the abandoned one
        assert buffer == bytes(4096)


async def test_in_flight_bound(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--filter=delay", "pattern", "8M", "rdelay=10ms")
    async with connect(uri, max_in_flight=8) as nbd:
        reads = asyncio.gather(*(nbd.pread(offset=i * 4096, length=4096) for i in range(200)))
        peak = 0
        while not reads.done():
            peak = max(peak, nbd.in_flight)
            await asyncio.sleep(0.001)
        results = await reads
    assert peak == 8
    assert all(r[:8] == struct.pack(">Q", i * 4096) for i, r in enumerate(results))


async def test_killed_server_fails_requests_in_flight(nbdkit, spawner: Processes) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--filter=delay", "memory", "1M", "rdelay=20")
    nbd = await connect(uri)
    reads = [asyncio.create_task(nbd.pread(offset=i * 512, length=512)) for i in range(10)]
    await asyncio.sleep(0.1)
    assert nbd.in_flight == 10
    spawner.procs[-1].kill()
    results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 5)
    assert all(isinstance(r, ConnectionLostError) for r in results), results
    assert "closed the connection" in str(results[0])
    await asyncio.wait_for(nbd.close(), 5)


async def test_close_waits_for_requests_in_flight(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--filter=delay", "pattern", "1M", "rdelay=100ms")
    nbd = await connect(uri)
    reads = [asyncio.create_task(nbd.pread(offset=i * 8, length=8)) for i in range(4)]
    await asyncio.sleep(0.01)
    await asyncio.wait_for(nbd.close(), 5)
    assert [r.result() for r in reads] == [struct.pack(">Q", i * 8) for i in range(4)]
    with pytest.raises(NBDConnectionError, match="closed"):
        await nbd.pread(offset=0, length=8)


# -- block-size rules, capabilities --------------------------------------------------


async def test_block_size_rules_are_checked_before_sending(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit(
        "--filter=blocksize-policy",
        "pattern",
        "8M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=1M",
        "blocksize-error-policy=error",
    )
    async with connect(uri) as nbd:
        assert (nbd.min_block, nbd.preferred_block, nbd.max_block) == (4096, 65536, MiB)
        with pytest.raises(NBDRequestError, match="aligned") as info:
            await nbd.pread(offset=0, length=100)
        assert info.value.errno == Errno.EINVAL
        with pytest.raises(NBDRequestError, match="beyond"):
            await nbd.pread(offset=8 * MiB - 4096, length=8192)
        data = await nbd.pread(offset=4096, length=3 * MiB + 8192)  # four requests of at most 1 MiB
        assert data[:8] == struct.pack(">Q", 4096) and data[-8:] == struct.pack(">Q", 3 * MiB + 12288 - 8)
        with pytest.raises(NBDRequestError) as info:
            await nbd.pwrite(bytes(4096), offset=0)  # the pattern plugin is read-only
        assert info.value.errno == Errno.EPERM
        with pytest.raises(NBDRequestError, match="zero length"):
            await nbd.block_status(offset=0, length=0)
        with pytest.raises(ValueError):
            await nbd.pread(offset=-4096, length=4096)
        assert nbd.in_flight == 0 and await nbd.pread(offset=8 * MiB, length=0) == b""


async def test_unadvertised_commands_fail_locally(tmp_path: Path, nbd_server) -> None:  # type: ignore[no-untyped-def]
    uri = nbd_server(random_file(tmp_path / "disk.img", MiB), readonly="true")()
    async with connect(uri) as nbd:
        assert nbd.is_read_only and not nbd.can_trim and not nbd.can_cache
        with pytest.raises(NBDRequestError) as info:
            await nbd.pwrite(b"x", offset=0)
        assert info.value.errno == Errno.EPERM
        with pytest.raises(NBDRequestError, match="CACHE was not advertised"):
            await nbd.cache(offset=0, length=4096)
        with pytest.raises(NBDRequestError, match="not negotiated"):
            await nbd.block_status(offset=0, length=4096)
        assert await nbd.pread(offset=MiB, length=0) == b""


# -- pools, TCP, listing ---------------------------------------------------------------


async def test_pool_opens_n_connections_with_multi_conn(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("memory", "8M")
    async with ConnectionPool(uri, connections=4) as pool:
        assert len(pool) == 4 and pool.first.can_multi_conn
        turns = [pool.next() for _ in range(8)]
        assert turns[:4] == turns[4:] and len(set(map(id, turns))) == 4
        await asyncio.gather(*(pool.next().pwrite(bytes([i]) * 4096, offset=i * 4096) for i in range(16)))
        await pool.flush()
        for client in pool.connections:
            assert await client.pread(offset=5 * 4096, length=4096) == b"\x05" * 4096


async def test_pool_keeps_one_connection_without_multi_conn(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--filter=multi-conn", "memory", "8M", "multi-conn-mode=disable")
    pool = ConnectionPool(uri, connections=4, options=ClientOptions(max_in_flight=4))
    await pool.open()
    assert len(pool) == 1 and not pool.first.can_multi_conn and pool.next() is pool.next()
    await pool.close()
    await pool.wait_closed()


async def test_tcp_to_our_server() -> None:
    async with NBDServer([Export("disk", memory_device(4 * MiB))], port=0, shared=4, persistent=True) as server:
        async with connect("127.0.0.1", server.port, "disk") as nbd:
            sock = nbd._link.transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert nbd.export_name == "disk" and nbd.size == 4 * MiB
            await nbd.pwrite(b"tcp!", offset=4096, fua=True)
        async with connect(f"nbd://127.0.0.1:{server.port}/disk") as nbd:
            assert await nbd.pread(offset=4096, length=4) == b"tcp!"


async def test_list_exports_and_export_info() -> None:
    exports = [
        Export("a", memory_device(MiB), description="first", allocation_depth=True),
        Export("b", memory_device(2 * MiB), allocation_depth=True),
    ]
    async with NBDServer(exports, port=0, shared=4, persistent=True) as server:
        listed = await list_exports("127.0.0.1", server.port)
        assert [(e.name, e.description) for e in listed] == [("a", "first"), ("b", "")]
        info = await export_info(f"nbd://127.0.0.1:{server.port}/b")
        assert info.export.size == 2 * MiB and info.structured_replies
        assert BASE_ALLOCATION in info.meta_contexts
