"""The server as a library: concurrency, reply order, the in-flight bound."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import attrs
import pytest

from sendense_nbd import Export, NBDServer, ServerError, memory_device
from sendense_nbd.errors import DeviceError
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import Command, CommandFlag, Errno, Option, TransmissionFlag
from sendense_nbd.storage import CheckedDevice, DetectZeroes, Discard, PolicyDevice
from sendense_nbd.storage.memory import MemoryDevice

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


class GatedDevice(MemoryDevice):
    """A memory device whose writes wait until the test opens a gate."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gates: dict[int, threading.Event] = {}
        self.active = 0
        self.max_active = 0
        self._count_lock = threading.Lock()

    def write(self, *, offset: int, data, fua: bool = False) -> None:  # type: ignore[no-untyped-def]
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            gate = self.gates.get(offset)
            if gate is not None:
                assert gate.wait(10), "test gate never opened"
            super().write(offset=offset, data=data, fua=fua)
        finally:
            with self._count_lock:
                self.active -= 1


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readexactly(wire.GREETING.size)
    writer.write(wire.CLIENT_FLAGS.pack(3) + wire.encode_option(Option.EXPORT_NAME, b""))
    size, flags = wire.EXPORT_NAME_REPLY.unpack(await reader.readexactly(wire.EXPORT_NAME_REPLY.size))
    assert flags & TransmissionFlag.HAS_FLAGS
    return reader, writer


async def _reply(reader: asyncio.StreamReader) -> tuple[int, int]:
    return wire.decode_simple_reply(await asyncio.wait_for(reader.readexactly(wire.SIMPLE_REPLY.size), 10))


async def test_replies_come_back_in_completion_order() -> None:
    device = GatedDevice(8 * MiB)
    gate = device.gates[0] = threading.Event()
    async with NBDServer([Export("", CheckedDevice(device))], port=0, persistent=True) as server:
        reader, writer = await _connect(server.port)  # type: ignore[arg-type]
        writer.write(wire.encode_request(Command.WRITE, 1, 0, 4096) + b"a" * 4096)
        writer.write(wire.encode_request(Command.WRITE, 2, MiB, 4096) + b"b" * 4096)
        assert await _reply(reader) == (2, 0)  # the second finished first
        gate.set()
        assert await _reply(reader) == (1, 0)
        writer.close()


class SerialDevice(GatedDevice):
    """A gated memory device that declares serial writes; a write at ``fail_at`` fails with EIO."""

    fail_at = 3 * MiB

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._capabilities = attrs.evolve(self._capabilities, serial_writes=True)

    def write(self, *, offset: int, data, fua: bool = False) -> None:  # type: ignore[no-untyped-def]
        if offset == self.fail_at:
            raise DeviceError(Errno.EIO, "injected write error")
        super().write(offset=offset, data=data, fua=fua)


async def test_serial_writes_run_one_at_a_time_in_order_while_the_pool_serves_the_rest() -> None:
    """A device that writes one request at a time gets its WRITEs queued on one thread: in order,
    never two at once, one failure answered as an error without stopping the queue; a FLUSH and a
    READ meanwhile run in the pool, and one device exported twice has one queue."""
    device = SerialDevice(8 * MiB)
    gate = device.gates[0] = threading.Event()
    checked = CheckedDevice(device)
    exports = [Export("", checked), Export("again", checked)]
    async with NBDServer(exports, port=0, persistent=True, shared=2) as server:
        queues = server.context.write_queues
        assert set(queues) == {"", "again"} and queues[""] is queues["again"]
        reader, writer = await _connect(server.port)  # type: ignore[arg-type]
        writer.write(wire.encode_request(Command.WRITE, 1, 0, 4096) + b"a" * 4096)  # holds the queue
        for handle, offset in ((2, MiB), (3, device.fail_at), (4, 2 * MiB)):
            writer.write(wire.encode_request(Command.WRITE, handle, offset, 4096) + bytes([handle]) * 4096)
        writer.write(wire.encode_request(Command.FLUSH, 5, 0, 0))
        assert await _reply(reader) == (5, 0)  # not behind the queued writes
        gate.set()
        assert [await _reply(reader) for _ in range(4)] == [(1, 0), (2, 0), (3, Errno.EIO), (4, 0)]
        assert device.max_active == 1
        writer.close()
    for offset, byte in ((0, b"a"), (MiB, b"\x02"), (2 * MiB, b"\x04")):
        check = bytearray(4096)
        device.read_into(offset=offset, buffer=memoryview(check))
        assert check == byte * 4096


async def test_a_trim_that_does_nothing_never_waits_for_the_thread_pool() -> None:
    """--discard ignore: a TRIM is answered at once, even while the only worker is busy; with FUA it
    waits for the flush, which runs in the pool after the write ahead of it."""
    device = GatedDevice(8 * MiB)
    gate = device.gates[0] = threading.Event()
    export = Export("", PolicyDevice(CheckedDevice(device), discard=Discard.IGNORE, detect_zeroes=DetectZeroes.OFF))
    async with NBDServer([export], port=0, persistent=True, workers=1) as server:
        reader, writer = await _connect(server.port)  # type: ignore[arg-type]
        writer.write(wire.encode_request(Command.WRITE, 1, 0, 4096) + b"a" * 4096)  # holds the worker
        writer.write(wire.encode_request(Command.TRIM, 2, MiB, 4096))
        writer.write(wire.encode_request(Command.TRIM, 3, MiB, 4096, CommandFlag.FUA))
        assert await _reply(reader) == (2, 0)
        gate.set()
        assert [await _reply(reader) for _ in range(2)] == [(1, 0), (3, 0)]
        writer.close()


async def test_bytes_in_flight_are_bounded() -> None:
    device = GatedDevice(64 * MiB)
    gates = {i * MiB: threading.Event() for i in range(24)}
    device.gates.update(gates)
    async with NBDServer([Export("", CheckedDevice(device))], port=0, persistent=True, budget=4 * MiB) as server:
        reader, writer = await _connect(server.port)  # type: ignore[arg-type]
        for i in range(24):
            writer.write(wire.encode_request(Command.WRITE, i, i * MiB, MiB) + bytes([i]) * MiB)
        await asyncio.sleep(0.5)
        # Writes wait on their gates: the server holds at most the budget plus
        # the one payload whose header made it go over.
        assert server.context.budget.used <= 4 * MiB + MiB
        assert device.active <= 4
        for gate in gates.values():
            gate.set()
        handles = {(await _reply(reader))[0] for _ in range(24)}
        assert handles == set(range(24))
        assert server.context.budget.used == 0
        assert 1 < device.max_active <= 4  # concurrent, and bounded
        check = bytearray(1)
        device.read_into(offset=23 * MiB, buffer=memoryview(check))
        assert check == bytes([23])
        writer.close()


async def test_many_clients_share_one_export_and_the_server_outlives_them() -> None:
    device = memory_device(16 * MiB)
    async with NBDServer([Export("", device)], port=0, shared=8) as server:
        assert server.context.catalog[""].flags & TransmissionFlag.CAN_MULTI_CONN

        async def client(i: int) -> None:
            reader, writer = await _connect(server.port)  # type: ignore[arg-type]
            writer.write(wire.encode_request(Command.WRITE, i, i * MiB, 512) + bytes([i + 1]) * 512)
            writer.write(wire.encode_request(Command.FLUSH, 100 + i, 0, 0))
            replies = {await _reply(reader), await _reply(reader)}
            assert replies == {(i, 0), (100 + i, 0)}
            writer.write(wire.encode_request(Command.DISC, 0, 0, 0))
            await writer.drain()
            assert await reader.read() == b""  # the server closed after DISC
            writer.close()

        await asyncio.gather(*(client(i) for i in range(8)))
        await asyncio.wait_for(server.wait_closed(), 10)  # not persistent: all left
    for i in range(8):
        check = bytearray(512)
        device.read_into(offset=i * MiB, buffer=memoryview(check))
        assert check == bytes([i + 1]) * 512


async def test_single_client_server_does_not_advertise_multi_conn() -> None:
    server = NBDServer([Export("a", memory_device(MiB)), Export("b", memory_device(2 * MiB), readonly=True)], port=0)
    assert not server.context.catalog["a"].flags & TransmissionFlag.CAN_MULTI_CONN
    assert server.context.catalog["b"].flags & TransmissionFlag.READ_ONLY
    assert server.context.catalog[""].name == "a"  # the first export is the default


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ServerError, match="at least one export"):
        NBDServer([])
    with pytest.raises(ServerError, match="unique"):
        NBDServer([Export("x", memory_device(1)), Export("x", memory_device(1))])
    with pytest.raises(ServerError, match="--shared"):
        NBDServer([Export("x", memory_device(1))], shared=0)


PIPELINE_DONE = (
    "Pipeline (hub, node, SSH tunnel, simulated VM), full then incremental, by API and by policy: verified: OK"
)


@pytest.mark.peer  # the backup examples run qemu-img and nbdkit
@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(example: str) -> None:
    args = ["--size", "32"] if example == "main_job.py" else []
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expected = {
        "main_job.py": PIPELINE_DONE,
        "pipeline.py": PIPELINE_DONE,
        "memory_server.py": "the device holds b'sendense'",
        "sans_io_handshake.py": "transmission starts",
        "vmware_backup.py": "VMware backup, full then incremental: verified: OK",
    }[example]
    assert expected in result.stdout
