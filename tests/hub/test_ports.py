"""The port allocator: never two holders for one port, nothing lost over a restart, busy ports skipped."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendense_nbd.errors import PortError
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.ports import PortAllocator, parse_range
from tests.hub.conftest import free_port_range


def test_parse_range() -> None:
    assert parse_range("10100-10200") == range(10100, 10201)
    assert parse_range("5000") == range(5000, 5001)
    for bad in ("x", "10-5", "0-10", "1-70000"):
        with pytest.raises(PortError):
            parse_range(bad)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    operations=st.lists(
        st.one_of(st.tuples(st.just("allocate"), st.integers(0, 3)), st.tuples(st.just("release"), st.integers(0, 7))),
        min_size=1,
        max_size=40,
    ),
    restart_at=st.integers(0, 40),
)
def test_concurrent_allocate_and_release_never_double_assign(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple[str, int]], restart_at: int
) -> None:
    """Batches of allocations and releases run concurrently; a restart (a new allocator on the same
    store, its predecessor's sockets closed) keeps every lease."""
    pool = free_port_range(6)
    path = str(tmp_path_factory.mktemp("ports") / "hub.db")

    async def scenario() -> None:
        db = Database(path)
        allocator = PortAllocator(db, pool)
        held: dict[int, socket.socket] = {}
        owners: dict[int, str] = {}
        try:
            for step, (operation, n) in enumerate(operations):
                if step == restart_at:
                    for sock in held.values():
                        sock.close()
                    held.clear()
                    db.close()
                    db = Database(path)
                    allocator = PortAllocator(db, pool)
                    status = await allocator.status()
                    assert {lease.port: lease.job_id for lease in status.used} == owners
                if operation == "allocate":
                    results = await asyncio.gather(
                        *(allocator.allocate("hub", f"job{step}-{i}", 2000 + i) for i in range(n + 1)),
                        return_exceptions=True,
                    )
                    for result in results:
                        if isinstance(result, PortError):
                            continue
                        assert not isinstance(result, BaseException), result
                        port = result.lease.port
                        assert port in pool and port not in owners, f"port {port} handed out twice"
                        owners[port] = result.lease.job_id
                        held[port] = result.socket
                    if any(isinstance(r, PortError) for r in results):
                        assert len(owners) == len(pool), "a request was refused while ports were free"
                elif owners:
                    port = sorted(owners)[n % len(owners)]
                    assert await allocator.release(port=port) == [port]
                    del owners[port]
                    sock = held.pop(port, None)
                    if sock is not None:
                        sock.close()
            status = await allocator.status()
            assert status.free == len(pool) - len(owners)
        finally:
            for sock in held.values():
                sock.close()
            db.close()

    asyncio.run(scenario())


async def test_busy_ports_are_skipped_and_exhaustion_is_an_error(tmp_path: Path, store_target: str) -> None:
    pool = free_port_range(3)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", pool[0]))
    squatter.listen()
    db = Database(store_target)
    try:
        allocator = PortAllocator(db, pool)
        first = await allocator.allocate("hub", "j1", 2000)
        second = await allocator.allocate("hub", "j1", 2001)
        assert [first.lease.port, second.lease.port] == [pool[1], pool[2]]
        with pytest.raises(PortError, match=r"2 leased, 1 taken by other processes"):
            await allocator.allocate("hub", "j2", 2000)
        assert await allocator.release(job_id="j1") == [pool[1], pool[2]]
        for allocation in (first, second):
            allocation.socket.close()
        again = await allocator.allocate("hub", "j3", 2000)
        assert again.lease.port == pool[1]
        again.socket.close()
    finally:
        squatter.close()
        db.close()


async def test_expired_and_stale_leases_come_back(tmp_path: Path, store_target: str) -> None:
    pool = free_port_range(2)
    db = Database(store_target)
    try:
        allocator = PortAllocator(db, pool, ttl=0.2)
        lease = await allocator.allocate("crashed-holder", "j1", 2000)
        lease.socket.close()
        await asyncio.sleep(0.3)  # never renewed: it expires
        assert (await allocator.status()).free == 2
        fresh = await allocator.allocate("hub-2", "j2", 2000)
        fresh.socket.close()
        assert fresh.lease.port == pool[0]
        other = await PortAllocator(db, pool).allocate("hub-old", "j3", 2001)
        other.socket.close()
        stale = await allocator.release_stale("hub-2")
        assert [s.port for s in stale] == [pool[1]]
        assert [u.port for u in (await allocator.status()).used] == [pool[0]]
    finally:
        db.close()
