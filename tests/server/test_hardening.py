"""One client must never stop the server serving the others (issue 11).

The server runs in-process so that its budget can be inspected; hostile
clients are raw sockets (no real client misbehaves on purpose), and after
each scenario a fresh client must be served.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from sendense_nbd import Export, NBDServer
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import MAX_PAYLOAD, Command, Option, OptionReply
from sendense_nbd.storage import CheckedDevice
from sendense_nbd.storage.memory import MemoryDevice

MiB = 1 << 20
SIZE = 64 * MiB
GO_DEFAULT = wire.encode_string("") + wire.U16.pack(0)


class GatedDevice(MemoryDevice):
    """Writes wait until the test opens ``gate``."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = threading.Event()

    def write(self, *, offset: int, data, fua: bool = False) -> None:  # type: ignore[no-untyped-def]
        assert self.gate.wait(20), "test gate never opened"
        super().write(offset=offset, data=data, fua=fua)


@contextlib.asynccontextmanager
async def running(device: MemoryDevice | None = None, **options: object) -> AsyncIterator[NBDServer]:
    options.setdefault("persistent", True)
    options.setdefault("shared", 8)
    server = NBDServer([Export("", CheckedDevice(device or MemoryDevice(SIZE)))], port=0, **options)  # type: ignore[arg-type]
    async with server:
        yield server


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.02)


async def negotiate(port: int, *, rcvbuf: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client past NBD_OPT_EXPORT_NAME (simple replies)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    await reader.readexactly(wire.GREETING.size)
    writer.write(wire.CLIENT_FLAGS.pack(3) + wire.encode_option(Option.EXPORT_NAME, b""))
    await asyncio.wait_for(reader.readexactly(wire.EXPORT_NAME_REPLY.size), 5)
    return reader, writer


def reset(writer: asyncio.StreamWriter) -> None:
    """Vanish with a TCP reset, as a dropped tunnel does."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def served(port: int, seed: int = 7, within: float = 2.0, *, write: bool = True) -> None:
    """A fresh client is served within ``within`` seconds: it writes and reads back 4 KiB,
    or only reads (while a hostile client holds the whole budget, writes wait)."""

    async def roundtrip() -> None:
        reader, writer = await negotiate(port)
        data = bytes([seed]) * 4096
        if write:
            writer.write(wire.encode_request(Command.WRITE, 1, SIZE - 4096, 4096) + data)
            reply = await reader.readexactly(wire.SIMPLE_REPLY.size)
            assert wire.decode_simple_reply(reply) == (1, 0)
        writer.write(wire.encode_request(Command.READ, 2, SIZE - 4096, 4096))
        assert wire.decode_simple_reply(await reader.readexactly(wire.SIMPLE_REPLY.size)) == (2, 0)
        got = await reader.readexactly(4096)
        assert got == data or not write
        writer.write(wire.encode_request(Command.DISC, 3, 0, 0))
        assert await reader.read() == b""
        writer.close()

    await asyncio.wait_for(roundtrip(), within)


async def settled(server: NBDServer, within: float = 5.0) -> None:
    """Every hostile connection is gone and gave back all it held."""
    await until(lambda: not server.context.admission.connections, within, "connections closed")
    budget = server.context.budget
    await until(lambda: budget.used == 0, within, f"budget given back ({budget.used} bytes held)")
    assert server.client_count == 0 and not server.context.admission.handshaking


# -- the budget comes back whatever way a connection ends ----------------------------------------


async def _mid_handshake(port: int, vanish: Callable[[asyncio.StreamWriter], None]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readexactly(wire.GREETING.size)
    writer.write(wire.CLIENT_FLAGS.pack(3) + wire.encode_option(Option.LIST)[:10])
    await writer.drain()
    vanish(writer)


async def _mid_payload(port: int, vanish: Callable[[asyncio.StreamWriter], None]) -> None:
    reader, writer = await negotiate(port)
    writer.write(wire.encode_request(Command.WRITE, 1, 0, MAX_PAYLOAD) + b"x" * MiB)
    await writer.drain()
    await asyncio.sleep(0.1)
    vanish(writer)


async def _queued_payloads(port: int, vanish: Callable[[asyncio.StreamWriter], None]) -> None:
    """Writes wait on the gate, more wait in the queue with their payloads, reading is paused."""
    reader, writer = await negotiate(port)
    for i in range(12):
        writer.write(wire.encode_request(Command.WRITE, i, i * 4 * MiB, 4 * MiB) + b"q" * 4 * MiB)
    await asyncio.sleep(0.5)
    vanish(writer)


async def _unread_read(port: int, vanish: Callable[[asyncio.StreamWriter], None]) -> None:
    reader, writer = await negotiate(port, rcvbuf=4096)
    for i in range(4):
        writer.write(wire.encode_request(Command.READ, i, 0, MAX_PAYLOAD))
    await asyncio.sleep(0.5)
    vanish(writer)


@pytest.mark.parametrize("vanish", [reset, lambda w: w.close()], ids=["reset", "close"])
@pytest.mark.parametrize("scenario", [_mid_handshake, _mid_payload, _queued_payloads, _unread_read])
async def test_budget_returns_to_zero_after_every_abrupt_end(scenario, vanish) -> None:  # type: ignore[no-untyped-def]
    device = GatedDevice(SIZE)
    async with running(device, budget=16 * MiB) as server:
        assert server.port is not None
        for _ in range(3):  # the freeze came from accumulated leaks
            await scenario(server.port, vanish)
        device.gate.set()
        await settled(server)
        await served(server.port)
        await settled(server)


async def test_clients_vanishing_mid_payload_do_not_freeze_the_server() -> None:
    """The issue's reproducer: 32 MiB WRITE headers, part of the payload, gone; many times."""
    async with running() as server:
        assert server.port is not None
        for i in range(20):
            await _mid_payload(server.port, reset if i % 2 else lambda w: w.close())
        await served(server.port)
        # A full 32 MiB write still fits afterwards.
        reader, writer = await negotiate(server.port)
        writer.write(wire.encode_request(Command.WRITE, 9, 0, MAX_PAYLOAD) + b"z" * MAX_PAYLOAD)
        reply = await asyncio.wait_for(reader.readexactly(wire.SIMPLE_REPLY.size), 10)
        assert wire.decode_simple_reply(reply) == (9, 0)
        writer.close()
        await settled(server)


# -- deadlines -----------------------------------------------------------------------------------


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> None:
    with contextlib.suppress(ConnectionResetError):
        while await asyncio.wait_for(reader.read(1 << 20), within):
            pass


async def test_stalled_payload_times_out_and_others_are_served() -> None:
    async with running(io_timeout=1.0) as server:
        assert server.port is not None
        reader, writer = await negotiate(server.port)
        writer.write(wire.encode_request(Command.WRITE, 1, 0, MAX_PAYLOAD) + b"s" * MiB)
        await writer.drain()
        await until(lambda: server.context.budget.used >= MAX_PAYLOAD, 5, "payload allocated")
        await served(server.port)  # while the stalled payload holds the whole budget
        await _closed_by_server(reader, 5)
        await settled(server)


async def test_stalled_payloads_do_not_hold_up_other_writes() -> None:
    """Clients stalled mid-payload hold more than the budget; until the I/O timeout (a minute
    here) every other client still writes: one payload at a time each, never frozen."""
    async with running(io_timeout=60.0) as server:
        assert server.port is not None
        stalled = []
        for _ in range(3):
            reader, writer = await negotiate(server.port)
            writer.write(wire.encode_request(Command.WRITE, 1, 0, MAX_PAYLOAD) + b"s" * MiB)
            await writer.drain()
            stalled.append(writer)
        await until(lambda: server.context.budget.used >= 3 * MAX_PAYLOAD, 5, "payloads allocated")
        for seed in range(3):
            await served(server.port, seed)
        reader, writer = await negotiate(server.port)  # a full-size write goes through as well
        writer.write(wire.encode_request(Command.WRITE, 9, 0, MAX_PAYLOAD) + b"z" * MAX_PAYLOAD)
        reply = await asyncio.wait_for(reader.readexactly(wire.SIMPLE_REPLY.size), 10)
        assert wire.decode_simple_reply(reply) == (9, 0)
        writer.close()
        for writer in stalled:
            reset(writer)
        await settled(server)


async def test_unread_replies_time_out() -> None:
    async with running(io_timeout=1.0) as server:
        assert server.port is not None
        reader, writer = await negotiate(server.port, rcvbuf=4096)
        for i in range(8):
            writer.write(wire.encode_request(Command.READ, i, 0, MAX_PAYLOAD))
        await writer.drain()
        await until(lambda: server.context.budget.used > 0, 5, "reads running")
        await served(server.port, write=False)
        await until(lambda: server.client_count == 0, 6, "the non-reading client dropped")
        reset(writer)
        await settled(server)


async def test_a_slow_reader_is_not_a_stalled_one() -> None:
    """Replies that drain, however slowly, never trip the I/O timeout."""
    async with running(io_timeout=0.5) as server:
        assert server.port is not None
        reader, writer = await negotiate(server.port, rcvbuf=4096)
        writer.write(wire.encode_request(Command.READ, 1, 0, 8 * MiB))
        header = await asyncio.wait_for(reader.readexactly(wire.SIMPLE_REPLY.size), 5)
        assert wire.decode_simple_reply(header) == (1, 0)
        received = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        while received < 8 * MiB:
            chunk = await asyncio.wait_for(reader.read(256 * 1024), 5)
            assert chunk, f"the server hung up after {received} bytes"
            received += len(chunk)
            await asyncio.sleep(0.05)  # ~5 MiB/s: slower than the timeout allows for the whole reply
        assert loop.time() - start > 0.5
        writer.close()
        await settled(server)


async def test_handshake_limit_drops_idle_connections() -> None:
    async with running(handshake_limit=0.5) as server:
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await reader.readexactly(wire.GREETING.size)
        writer.write(wire.CLIENT_FLAGS.pack(3))
        start = asyncio.get_running_loop().time()
        await _closed_by_server(reader, 5)
        assert asyncio.get_running_loop().time() - start < 4
        writer.close()
        await served(server.port)  # negotiating in time is fine
        await settled(server)


async def test_handshaking_connections_are_bounded() -> None:
    async with running(max_handshakes=3, handshake_limit=0) as server:
        assert server.port is not None
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        for reader, _ in idle:
            await reader.readexactly(wire.GREETING.size)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await _closed_by_server(reader, 5)  # the fourth is closed without a greeting
        writer.close()
        for _, w in idle:
            w.close()
        await until(lambda: not server.context.admission.connections, 5, "idle connections closed")
        await served(server.port)


async def test_handshake_replies_nobody_reads_are_bounded() -> None:
    """A client that floods options and never reads the replies stops being read."""
    async with running(handshake_limit=1.0) as server:
        assert server.port is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(wire.CLIENT_FLAGS.pack(3))
        flood = wire.encode_option(Option.INFO, GO_DEFAULT) * 20000  # ~0.6 MB in, ~2 MB of replies
        writer.write(flood)
        await asyncio.sleep(0.5)
        transports = [c._transport for c in server.context.admission.connections]
        assert transports and all(t is not None and t.get_write_buffer_size() < 1 * MiB for t in transports)
        await _closed_by_server(reader, 5)  # then the handshake limit ends it
        writer.close()
        await settled(server)


# -- a peer that hangs up while its reading is paused --------------------------------------------


@pytest.mark.parametrize("vanish", [reset, lambda w: w.close()], ids=["reset", "close"])
async def test_hangup_noticed_while_reading_is_paused(vanish) -> None:  # type: ignore[no-untyped-def]
    device = GatedDevice(SIZE)
    async with running(device, budget=256 * 1024) as server:
        assert server.port is not None
        reader, writer = await negotiate(server.port)
        for i in range(5):  # four fill the budget, the fifth header waits
            writer.write(wire.encode_request(Command.WRITE, i, i * MiB, 64 * 1024) + b"p" * 64 * 1024)
        await until(lambda: any(c._reading_paused for c in server.context.admission.clients), 5, "reading paused")
        writer.write(wire.encode_request(Command.FLUSH, 9, 0, 0))  # waits unread in the kernel
        await writer.drain()
        vanish(writer)  # the event loop does not watch a paused socket: this FIN or RST goes unseen
        await until(lambda: server.client_count == 0, 5, "hang-up noticed")
        device.gate.set()
        await settled(server)


# -- admission at NBD_OPT_GO ---------------------------------------------------------------------


async def _probe(port: int) -> None:
    """Connect and close at once, as a 'wait for the port' script does."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


async def test_probes_do_not_count_against_shared() -> None:
    async with running(shared=1) as server:
        assert server.port is not None
        for i in range(10):
            await _probe(server.port)
            await served(server.port, seed=i)  # at once, the real client
        lingering = await asyncio.open_connection("127.0.0.1", server.port)  # negotiating, not a client
        await served(server.port)
        lingering[1].close()
        await settled(server)


async def test_non_persistent_server_exits_only_after_a_negotiated_client() -> None:
    async with running(shared=1, persistent=False) as server:
        assert server.port is not None
        await _probe(server.port)
        await asyncio.sleep(0.2)
        assert not server._stop.is_set(), "a probe made the non-persistent server exit"
        reader, writer = await negotiate(server.port)
        await _probe(server.port)
        await asyncio.sleep(0.2)
        assert not server._stop.is_set()
        writer.write(wire.encode_request(Command.DISC, 1, 0, 0))
        assert await reader.read() == b""
        writer.close()
        await asyncio.wait_for(server.wait_closed(), 10)  # the last negotiated client left


async def _option(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, option: int, data: bytes) -> list[int]:
    """Send one option; the reply types up to the final one."""
    writer.write(wire.encode_option(option, data))
    replies = []
    while True:
        header = wire.decode_option_reply_header(await reader.readexactly(wire.OPTION_REPLY_HEADER.size))
        payload = await reader.readexactly(header.length)
        replies.append(header.reply)
        if header.reply not in (OptionReply.INFO, OptionReply.SERVER):
            if header.reply == OptionReply.ERR_POLICY:
                assert b"--shared" in payload
            return replies


async def test_over_shared_only_go_is_refused() -> None:
    async with running(shared=1) as server:
        assert server.port is not None
        reader, writer = await negotiate(server.port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)
        await r2.readexactly(wire.GREETING.size)
        w2.write(wire.CLIENT_FLAGS.pack(3))
        assert (await _option(r2, w2, Option.LIST, b""))[-1] == OptionReply.ACK
        assert (await _option(r2, w2, Option.INFO, GO_DEFAULT))[-1] == OptionReply.ACK
        assert await _option(r2, w2, Option.GO, GO_DEFAULT) == [OptionReply.ERR_POLICY]
        writer.close()  # the slot frees up: the same connection may now GO
        await until(lambda: server.client_count == 0, 5, "first client gone")
        assert (await _option(r2, w2, Option.GO, GO_DEFAULT))[-1] == OptionReply.ACK
        assert server.client_count == 1
        w2.close()
        await settled(server)
