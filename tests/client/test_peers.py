"""The client against real servers, judged by nbdinfo and nbdcopy.

Every peer gets the same four checks: handshake facts agree with
``nbdinfo --json``; reads (whole export, and 200 random reads with 64 in
flight) agree with ``nbdcopy``; block status agrees with ``nbdinfo --map``
for each meta context; writes, zeroes and trims read back byte for byte and
are seen by ``nbdcopy`` afterwards.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from sendense_nbd.client import NBDClient, NBDRequestError, connect
from sendense_nbd.protocol.constants import ALLOCATION_DEPTH, BASE_ALLOCATION, Errno
from tests.client.conftest import merge_runs, nbdcopy_bytes, nbdinfo_json, nbdinfo_map
from tests.conftest import random_file, require, run, sparse_file, start_server
from tests.peers import Processes

pytestmark = pytest.mark.peer

MiB = 1 << 20
BOTH = (BASE_ALLOCATION, ALLOCATION_DEPTH)


@attrs.frozen
class Peer:
    """A running server: ``uri()`` gives a URI good for one connection."""

    uri: Callable[[], str]
    writable: bool = True
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    #: nbd-server answers NBD_OPT_INFO with size 0 (nbdinfo --json shows it).
    info_size_is_zero: bool = False


def _qcow2_chain(tmp_path: Path) -> Path:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", str(base), "8M")
    run(require("qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 3M 64k", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 512k 1M", "-c", "write -z 6M 512k", str(top))
    return top


PEERS = [
    "qemu-nbd-raw",
    "qemu-nbd-raw-allocation-depth",
    "qemu-nbd-qcow2-chain",
    "nbdkit-memory",
    "nbdkit-data",
    "nbdkit-sparse-random",
    "nbdkit-blocksize-policy",
    "nbd-server",
    "sendense-serve",
]


@pytest.fixture(params=PEERS)
def peer(request, tmp_path: Path, spawner: Processes, nbdkit, qemu_nbd, nbd_server) -> Peer:  # type: ignore[no-untyped-def]
    name = request.param
    sparse = [(0, 64 * 1024), (MiB, 3 * MiB), (6 * MiB + 4096, 8192)]
    if name == "qemu-nbd-raw":
        uri = qemu_nbd(sparse_file(tmp_path / "disk.raw", 8 * MiB, sparse))
        return Peer(lambda: uri)
    if name == "qemu-nbd-raw-allocation-depth":
        uri = qemu_nbd(sparse_file(tmp_path / "disk.raw", 8 * MiB, sparse), "--allocation-depth", export="disk")
        return Peer(lambda: uri, contexts=BOTH)
    if name == "qemu-nbd-qcow2-chain":
        uri = qemu_nbd(_qcow2_chain(tmp_path), "--allocation-depth", fmt="qcow2")
        return Peer(lambda: uri, contexts=BOTH)
    if name == "nbdkit-memory":
        uri = nbdkit("memory", "8M")
        return Peer(lambda: uri)
    if name == "nbdkit-data":
        uri = nbdkit("data", ' ( "abc" )*1000 @1048576 ( 0x55 0xAA )*2048 ', "size=4M")
        return Peer(lambda: uri)
    if name == "nbdkit-sparse-random":
        # Writes that differ from the generated data fail: read-only for these checks.
        uri = nbdkit("sparse-random", "size=16M", "seed=4242", "runlength=65536")
        return Peer(lambda: uri, writable=False)
    if name == "nbdkit-blocksize-policy":
        uri = nbdkit(
            "--filter=blocksize-policy",
            "memory",
            "8M",
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=1M",
            "blocksize-error-policy=error",
        )
        return Peer(lambda: uri)
    if name == "nbd-server":
        image = random_file(tmp_path / "disk.img", 4 * MiB)
        return Peer(nbd_server(image, flush="true", fua="true", trim="true"), info_size_is_zero=True)
    assert name == "sendense-serve"
    sock = spawner.socket_path()
    image = sparse_file(tmp_path / "disk.raw", 8 * MiB, sparse)
    server = start_server("-f", "raw", "-t", "-e", "8", "-A", "--discard", "unmap", str(image), unix=sock)
    spawner.procs.append(server.proc)  # killed, and its pipes closed, at teardown
    return Peer(lambda: server.uri, contexts=BOTH)


FLAG_PROPERTIES = {
    "is_read_only": "is_read_only",
    "is_rotational": "is_rotational",
    "can_cache": "can_cache",
    "can_df": "can_df",
    "can_fast_zero": "can_fast_zero",
    "can_flush": "can_flush",
    "can_fua": "can_fua",
    "can_multi_conn": "can_multi_conn",
    "can_trim": "can_trim",
    "can_zero": "can_zero",
}


async def test_handshake_facts_agree_with_nbdinfo(peer: Peer) -> None:
    info = nbdinfo_json(peer.uri())
    async with connect(peer.uri(), meta_contexts=peer.contexts) as nbd:
        if peer.info_size_is_zero:
            assert info["export-size"] == 0
            assert nbd.size == int(run(require("nbdinfo"), "--size", peer.uri()).stdout)
        else:
            assert nbd.size == info["export-size"]
        for key, prop in FLAG_PROPERTIES.items():
            assert getattr(nbd, prop) == info[key], key
        assert nbd.structured_replies == info["structured"]
        assert nbd.used_go
        if "block_size_minimum" in info:
            sizes = (info["block_size_minimum"], info["block_size_preferred"], info["block_size_maximum"])
            assert (nbd.min_block, nbd.preferred_block, nbd.max_block) == sizes
        else:
            assert (nbd.min_block, nbd.preferred_block, nbd.max_block) == (1, 4096, 32 * MiB)
        if nbd.structured_replies:
            assert set(nbd.meta_contexts) == set(peer.contexts)
            assert set(nbd.meta_contexts) <= set(info["contexts"])
        else:
            assert dict(nbd.meta_contexts) == {} and not nbd.can_block_status


async def _peak_in_flight(nbd: NBDClient, done: asyncio.Event) -> int:
    peak = 0
    while not done.is_set():
        peak = max(peak, nbd.in_flight)
        await asyncio.sleep(0)
    return peak


async def test_reads_agree_with_nbdcopy_with_many_in_flight(peer: Peer) -> None:
    expected = nbdcopy_bytes(peer.uri())
    async with connect(peer.uri(), max_in_flight=64) as nbd:
        assert nbd.size == len(expected)
        whole = bytearray(nbd.size)
        await nbd.pread_into(whole, offset=0)  # split at the server's maximum payload
        assert whole == expected
        rng = random.Random(3)
        # 4 KiB units: nbdkit 1.32's sparse-random returns other bytes for reads that
        # start inside one of its 4 KiB blocks (libnbd sees the same).
        unit = max(nbd.min_block, 4096)
        requests = []
        for _ in range(200):
            length = rng.choice([1, 2, 16, 75]) * unit
            requests.append((rng.randrange(0, (nbd.size - length) // unit + 1) * unit, length))
        done = asyncio.Event()
        sampler = asyncio.create_task(_peak_in_flight(nbd, done))
        results = await asyncio.gather(*(nbd.pread(offset=offset, length=length) for offset, length in requests))
        done.set()
        peak = await sampler
        for (offset, length), data in zip(requests, results):
            assert data == expected[offset : offset + length], (offset, length)
        assert 1 < peak <= 64


async def test_block_status_agrees_with_nbdinfo_map(peer: Peer) -> None:
    async with connect(peer.uri(), meta_contexts=peer.contexts) as nbd:
        if not nbd.structured_replies:
            with pytest.raises(NBDRequestError) as info:
                await nbd.block_status(offset=0, length=4096)
            assert info.value.errno == Errno.EINVAL and "not negotiated" in str(info.value)
            return
        ours = {
            context: merge_runs((e.offset, e.length, e.status) for e in await nbd.extents(context=context))
            for context in peer.contexts
        }
        first = await nbd.block_status(offset=0, length=nbd.size)
        assert first[0].offset == 0 and 0 < sum(e.length for e in first) == first[-1].end <= nbd.size
        (one,) = await nbd.block_status(offset=0, length=nbd.size, req_one=True)
        run_offset, run_length, run_flags = ours[BASE_ALLOCATION][0]
        assert one.offset == 0 and one.status == run_flags and 0 < one.length <= run_length
    for context in peer.contexts:
        assert ours[context] == nbdinfo_map(peer.uri(), context), context


async def test_writes_zeroes_and_trims_read_back(peer: Peer) -> None:
    if not peer.writable:
        return
    model = bytearray(nbdcopy_bytes(peer.uri()))
    rng = random.Random(5)
    async with connect(peer.uri()) as nbd:
        unit = max(nbd.min_block, 512)
        size = nbd.size
        writes = [(0, unit), (3 * unit, 5 * unit), (size // 2, min(size // 4, 3 * MiB)), (size - 2 * unit, 2 * unit)]
        for offset, length in writes:
            data = rng.randbytes(length)
            await nbd.pwrite(data, offset=offset, fua=nbd.can_fua)
            model[offset : offset + length] = data
        await asyncio.gather(*(nbd.pwrite(b"\x5a" * unit, offset=o) for o in range(8 * unit, 24 * unit, unit)))
        model[8 * unit : 24 * unit] = b"\x5a" * (16 * unit)
        if nbd.can_zero:
            await nbd.zero(offset=4 * unit, length=2 * unit)
            await nbd.zero(offset=10 * unit, length=unit, no_hole=True)
            model[4 * unit : 6 * unit] = bytes(2 * unit)
            model[10 * unit : 11 * unit] = bytes(unit)
        if nbd.can_trim:
            await nbd.trim(offset=16 * unit, length=4 * unit)
            await nbd.pwrite(bytes(4 * unit), offset=16 * unit)  # trimmed data is undefined until rewritten
            model[16 * unit : 20 * unit] = bytes(4 * unit)
        if nbd.can_fast_zero:
            try:
                await nbd.zero(offset=12 * unit, length=unit, fast=True)
                model[12 * unit : 13 * unit] = bytes(unit)
            except NBDRequestError as exc:  # allowed: "not faster than writing zeroes"
                assert exc.errno == Errno.ENOTSUP
        if nbd.can_cache:
            await nbd.cache(offset=0, length=2 * unit)
        if nbd.can_flush:
            await nbd.flush()
        for offset, length in [*writes, (0, 32 * unit)]:
            assert await nbd.pread(offset=offset, length=length) == model[offset : offset + length]
        back = bytearray(size)
        await nbd.pread_into(back, offset=0)
        assert back == model
    assert nbdcopy_bytes(peer.uri()) == model
