"""The storage contract: the checking adapter's range checks and emulation, filters, and the backends behind them."""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

import sendense_nbd
import sendense_nbd.storage
from sendense_nbd.copy.endpoints import LocalEndpoint
from sendense_nbd.errors import DeviceError, ServerError
from sendense_nbd.protocol.constants import AllocationFlag, Errno
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.server import Export
from sendense_nbd.storage import (
    Backend,
    BlockDevice,
    Capabilities,
    CheckedDevice,
    DetectZeroes,
    Discard,
    Filter,
    ImageFormat,
    Placement,
    PolicyDevice,
    Support,
    create_image,
    memory_device,
    open_image,
)
from sendense_nbd.storage.memory import MemoryDevice

KiB = 1 << 10
MiB = 1 << 20
SIZE = 2 * MiB
HOLE = AllocationFlag.HOLE | AllocationFlag.ZERO


# -- the three backends, each behind the adapter ---------------------------------------------------


@pytest.fixture(params=["memory", "raw", "qcow2"])
def device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockDevice]:
    if request.param == "memory":
        opened: BlockDevice = memory_device(SIZE)
    else:
        fmt = ImageFormat(request.param)
        create_image(str(tmp_path / "disk"), SIZE, fmt)
        opened = open_image(str(tmp_path / "disk"), fmt)
    yield opened
    opened.close()


def read(device: BlockDevice, offset: int = 0, length: int = SIZE) -> bytes:
    buffer = bytearray(length)
    device.read_into(offset=offset, buffer=memoryview(buffer))
    return bytes(buffer)


#: ``(name, call on a device of SIZE bytes, errno)``: every ranged operation just past its limits.
OUT_OF_RANGE: list[tuple[str, Callable[[BlockDevice], object], Errno]] = [
    ("write past the end", lambda d: d.write(offset=SIZE + 4096, data=b"x" * 10), Errno.ENOSPC),
    ("write across the end", lambda d: d.write(offset=SIZE - 5, data=b"x" * 10), Errno.ENOSPC),
    ("write at a negative offset", lambda d: d.write(offset=-1, data=b"x"), Errno.ENOSPC),
    ("zero across the end", lambda d: d.zero(offset=SIZE - 512, length=1024), Errno.ENOSPC),
    ("zero a negative length", lambda d: d.zero(offset=4096, length=-1), Errno.ENOSPC),
    ("read across the end", lambda d: d.read_into(offset=SIZE - 1, buffer=memoryview(bytearray(2))), Errno.EINVAL),
    ("read_cached past the end", lambda d: d.read_cached(offset=SIZE, buffer=memoryview(bytearray(1))), Errno.EINVAL),
    ("trim across the end", lambda d: d.trim(offset=SIZE - 512, length=1024), Errno.EINVAL),
    ("cache across the end", lambda d: d.cache(offset=SIZE, length=1), Errno.EINVAL),
    ("extents of nothing", lambda d: d.extents(offset=0, length=0), Errno.EINVAL),
    ("extents across the end", lambda d: d.extents(offset=1, length=SIZE), Errno.EINVAL),
    ("depth at a negative offset", lambda d: d.allocation_depth(offset=-4096, length=4096), Errno.EINVAL),
]


#: Every filter configuration the server can build, over a memory device.
FILTERS: dict[str, Callable[[BlockDevice], BlockDevice]] = {
    "filter": Filter,
    **{
        f"policy-{discard.value}-{detect.value}": (
            lambda d, discard=discard, detect=detect: PolicyDevice(d, discard=discard, detect_zeroes=detect)
        )
        for discard in Discard
        for detect in DetectZeroes
    },
}


@pytest.mark.parametrize("wrap", FILTERS.values(), ids=FILTERS.keys())
@pytest.mark.parametrize(("what", "call", "errno"), OUT_OF_RANGE, ids=[case[0] for case in OUT_OF_RANGE])
def test_filters_refuse_what_the_adapter_refuses(
    wrap: Callable[[BlockDevice], BlockDevice], what: str, call: Callable[[BlockDevice], object], errno: Errno
) -> None:
    """Even a member that answers without calling ``next`` (a trim under --discard ignore)."""
    inner = memory_device(SIZE)
    device = wrap(inner)
    device.write(offset=SIZE - 4096, data=b"\x5a" * 4096)
    with pytest.raises(DeviceError, match="outside the device") as err:
        call(device)
    assert err.value.errno == errno, what
    assert read(inner, SIZE - 4096, 4096) == b"\x5a" * 4096


def test_discard_ignore_refuses_a_trim_far_past_the_end() -> None:
    device = PolicyDevice(memory_device(SIZE), discard=Discard.IGNORE, detect_zeroes=DetectZeroes.OFF)
    for offset, length in ((10**9, 5), (0, -1), (-1, 1)):
        with pytest.raises(DeviceError, match="outside the device") as err:
            device.trim(offset=offset, length=length)
        assert err.value.errno == Errno.EINVAL


@pytest.mark.parametrize(("what", "call", "errno"), OUT_OF_RANGE, ids=[case[0] for case in OUT_OF_RANGE])
def test_requests_outside_the_device_are_refused_and_change_nothing(
    device: BlockDevice, what: str, call: Callable[[BlockDevice], object], errno: Errno
) -> None:
    device.write(offset=SIZE - 4096, data=b"\x5a" * 4096)
    with pytest.raises(DeviceError, match="outside the device") as err:
        call(device)
    assert err.value.errno == errno, what
    assert device.size == SIZE
    assert read(device, SIZE - 4096, 4096) == b"\x5a" * 4096


def test_a_raw_file_no_longer_grows_from_a_write_past_its_end(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    create_image(str(path), SIZE, ImageFormat.RAW)
    device = open_image(str(path), ImageFormat.RAW)
    try:
        with pytest.raises(DeviceError) as err:
            device.write(offset=SIZE + 4096, data=b"\x01" * 4096)
        assert err.value.errno == Errno.ENOSPC
    finally:
        device.close()
    assert os.path.getsize(path) == SIZE and path.read_bytes() == bytes(SIZE)


def test_a_memory_device_refuses_a_write_past_its_end() -> None:
    device = memory_device(SIZE)
    with pytest.raises(DeviceError) as err:
        device.write(offset=SIZE + 4096, data=b"\x01" * 4096)
    assert err.value.errno == Errno.ENOSPC
    assert device.extents(offset=0, length=SIZE) == [Extent(0, SIZE, HOLE)]  # nothing was stored


def test_in_range_edges_are_accepted(device: BlockDevice) -> None:
    device.write(offset=SIZE - 3, data=b"end")
    device.write(offset=SIZE, data=b"")  # empty, at the very end
    device.zero(offset=0, length=0)
    assert read(device, SIZE - 3, 3) == b"end"
    assert device.extents(offset=SIZE - 1, length=1)[0].offset == SIZE - 1


def test_read_only_devices_refuse_every_change(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_image(str(path), SIZE, ImageFormat.QCOW2)
    for device in (memory_device(SIZE, readonly=True), open_image(str(path), ImageFormat.QCOW2, readonly=True)):
        try:
            for change in (
                lambda: device.write(offset=0, data=b"x"),
                lambda: device.zero(offset=0, length=4096),
                lambda: device.trim(offset=0, length=4096),
            ):
                with pytest.raises(DeviceError, match="read-only") as err:
                    change()
                assert err.value.errno == Errno.EPERM
            assert not device.capabilities.writable
        finally:
            device.close()


def test_maps_are_extents_at_absolute_offsets(device: BlockDevice) -> None:
    device.write(offset=MiB, data=b"\x01" * (64 * KiB))
    extents = device.extents(offset=MiB - 64 * KiB, length=192 * KiB)
    assert extents[0].offset == MiB - 64 * KiB
    assert all(a.end == b.offset for a, b in zip(extents, extents[1:], strict=False))
    data = [e for e in extents if not e.zero]
    assert data and data[0].offset <= MiB < data[0].end
    depth = device.allocation_depth(offset=MiB, length=4096)
    assert depth[0].offset == MiB and depth[0].status >= 1


def test_has_backing_is_a_capability(tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    create_image(str(base), SIZE, ImageFormat.RAW)
    create_image(str(top), None, ImageFormat.QCOW2, backing_file=str(base), backing_format="raw")
    for path, fmt, expected in [(top, ImageFormat.QCOW2, True), (base, ImageFormat.RAW, False)]:
        device = open_image(str(path), fmt, readonly=True)
        try:
            assert device.capabilities.has_backing is expected, path.name
        finally:
            device.close()
    assert not memory_device(SIZE).capabilities.has_backing


def test_a_bare_backend_cannot_be_served_filtered_or_copied() -> None:
    """Every way to use a device takes it opened: a bare backend would skip the range checks."""
    with pytest.raises(ServerError, match="not the bare MemoryDevice backend"):
        Export("disk", MemoryDevice(SIZE))
    with pytest.raises(TypeError, match="PolicyDevice: .* not the bare MemoryDevice backend"):
        PolicyDevice(MemoryDevice(SIZE), discard=Discard.UNMAP, detect_zeroes=DetectZeroes.OFF)
    with pytest.raises(TypeError, match="copy endpoint 'm': .* not the bare MemoryDevice backend"):
        LocalEndpoint(MemoryDevice(SIZE), "m")
    assert Export("disk", memory_device(SIZE)).info(multi_conn=False).size == SIZE


def test_discard_ignore_refuses_a_trim_on_a_read_only_device() -> None:
    """The filter answers the trim itself, so it refuses what the adapter refuses (EPERM) too."""
    device = PolicyDevice(memory_device(SIZE, readonly=True), discard=Discard.IGNORE, detect_zeroes=DetectZeroes.OFF)
    with pytest.raises(DeviceError, match="read-only") as err:
        device.trim(offset=0, length=4096, fua=True)
    assert err.value.errno == Errno.EPERM


# -- emulation: a backend that only reads and writes -----------------------------------------------


class Plain(Backend):
    """The least a writable backend implements: read, write, flush; it records what it was asked."""

    def __init__(self, size: int, *, capabilities: Capabilities | None = None) -> None:
        self.data = bytearray(size)
        self.calls: list[str] = []
        self._capabilities = capabilities or Capabilities(writable=True)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        self.calls.append("read")
        buffer[:] = self.data[offset : offset + len(buffer)]

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.calls.append("write+fua" if fua else "write")
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.calls.append("flush")

    def close(self) -> None:
        self.calls.append("close")


def test_a_plain_backend_gets_the_whole_contract_by_emulation() -> None:
    backend = Plain(3 * MiB)
    device = CheckedDevice(backend)
    caps = device.capabilities
    assert caps.can_flush and not (caps.can_trim or caps.can_fast_zero or caps.can_extents or caps.can_cache)
    device.write(offset=0, data=b"\xff" * (3 * MiB))
    device.zero(offset=100, length=2 * MiB + 1)  # written as zeroes, a MiB at a time
    assert backend.data[:100] == b"\xff" * 100 and backend.data[100 : 101 + 2 * MiB] == bytes(2 * MiB + 1)
    assert backend.data[101 + 2 * MiB :] == b"\xff" * (MiB - 101)
    assert backend.calls == ["write"] * 4
    with pytest.raises(DeviceError) as err:
        device.zero(offset=0, length=4096, fast=True)
    assert err.value.errno == Errno.ENOTSUP and backend.data[:4] == b"\xff" * 4
    assert device.extents(offset=5, length=10) == [Extent(5, 10, 0)]  # all data
    assert device.allocation_depth(offset=5, length=10) == [Extent(5, 10, 1)]  # all this image's
    assert not device.read_cached(offset=0, buffer=memoryview(bytearray(10)))
    backend.calls.clear()
    device.trim(offset=0, length=4096)  # advisory: nothing
    device.cache(offset=0, length=4096)  # not offered: nothing
    assert backend.calls == [] and backend.data[:4] == b"\xff" * 4
    device.close()
    assert backend.calls == ["close"]


@pytest.mark.parametrize("fua", [Support.EMULATE, Support.NATIVE])
def test_fua_is_the_backend_s_or_a_flush_after_the_operation(fua: Support) -> None:
    backend = Plain(MiB, capabilities=Capabilities(writable=True, fua=fua))
    device = CheckedDevice(backend)
    device.write(offset=0, data=b"a", fua=True)
    device.write(offset=1, data=b"b")
    device.zero(offset=0, length=1, fua=True)
    device.trim(offset=0, length=1, fua=True)
    if fua is Support.EMULATE:
        assert backend.calls == ["write", "flush", "write", "write", "flush", "flush"]
    else:
        assert backend.calls == ["write+fua", "write", "write", "flush", "flush"]


def test_emulated_cache_reads_the_range_and_missing_flush_does_nothing() -> None:
    caps = Capabilities(writable=True, cache=Support.EMULATE, flush=Support.NONE)
    backend = Plain(3 * MiB, capabilities=caps)
    device = CheckedDevice(backend)
    assert device.capabilities.can_cache and not device.capabilities.can_flush
    device.cache(offset=1, length=2 * MiB + 1)  # read a MiB at a time
    device.flush()
    assert backend.calls == ["read"] * 3


def test_a_backend_that_describes_nothing_is_an_io_error() -> None:
    class Blank(Plain):
        def extents(self, *, offset: int, length: int) -> list[Extent]:
            return []

    device = CheckedDevice(Blank(MiB, capabilities=Capabilities(writable=True, extents=Support.NATIVE)))
    with pytest.raises(DeviceError, match="described nothing") as err:
        device.extents(offset=0, length=MiB)
    assert err.value.errno == Errno.EIO


#: ``(name, what a lying backend answers for the range [4096, 4096 + 8192))``.
LIES: list[tuple[str, list[tuple[int, int]]]] = [
    ("starts late", [(8192, 4096)]),
    ("starts early", [(0, 12288)]),
    ("a gap", [(4096, 1024), (6144, 6144)]),
    ("an overlap", [(4096, 4096), (4096, 8192)]),
    ("an empty extent", [(4096, 0), (4096, 8192)]),
    ("a negative length", [(4096, -4096), (0, 12288)]),
    ("past the end", [(4096, MiB)]),
]


class Liar(Plain):
    """Every map starts from ``offset`` only when told the truth."""

    def __init__(self, answer: list[tuple[int, int]]) -> None:
        native = Capabilities(writable=True, extents=Support.NATIVE, allocation_depth=Support.NATIVE)
        super().__init__(16 * KiB, capabilities=attrs.evolve(native, layer_map=Support.NATIVE))
        self.answer = answer

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        return [Extent(start, n, 0) for start, n in self.answer]

    def allocation_depth(self, *, offset: int, length: int) -> list[Extent]:
        return [Extent(start, n, 1) for start, n in self.answer]

    def layer_map(self, *, offset: int, length: int) -> list[Placement]:
        return [Placement(start, n, host=start) for start, n in self.answer]


@pytest.mark.parametrize("member", ["extents", "allocation_depth", "layer_map"])
@pytest.mark.parametrize("answer", [lie for _, lie in LIES], ids=[name for name, _ in LIES])
def test_a_map_that_does_not_run_on_from_the_offset_is_an_io_error(member: str, answer: list[tuple[int, int]]) -> None:
    """A block status reply carries only lengths: a wrong start, a gap or an overlap would shift every status."""
    device = CheckedDevice(Liar(answer))
    with pytest.raises(DeviceError, match="the storage described") as err:
        getattr(device, member)(offset=4096, length=8192)
    assert err.value.errno == Errno.EIO
    truthful = CheckedDevice(Liar([(4096, 4096), (8192, 8192)]))  # may describe more than asked, up to the end
    assert getattr(truthful, member)(offset=4096, length=8192)[1].end == 16 * KiB


def test_layer_map_places_a_raw_file_in_place_and_memory_nowhere(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    create_image(str(path), SIZE, ImageFormat.RAW)
    raw = open_image(str(path), ImageFormat.RAW)
    memory = memory_device(SIZE)
    try:
        for device in (raw, memory):
            device.write(offset=64 * KiB, data=b"\x01" * (64 * KiB))
        assert raw.path == str(path) and raw.backing is None
        assert raw.layer_map(offset=32 * KiB, length=160 * KiB) == [
            Placement(32 * KiB, 32 * KiB, zero=True, host=32 * KiB),
            Placement(64 * KiB, 64 * KiB, host=64 * KiB),
            Placement(128 * KiB, 64 * KiB, zero=True, host=128 * KiB),
        ]
        assert memory.path is None
        assert memory.layer_map(offset=0, length=SIZE) == [
            Placement(0, 64 * KiB, zero=True),
            Placement(64 * KiB, 64 * KiB),
            Placement(128 * KiB, SIZE - 128 * KiB, zero=True),
        ]
        with pytest.raises(DeviceError, match="outside the device"):
            raw.layer_map(offset=SIZE, length=1)
    finally:
        raw.close()


def test_layer_map_of_an_overlay_leaves_the_rest_to_its_backing_device(tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    create_image(str(base), SIZE, ImageFormat.RAW)
    create_image(str(top), None, ImageFormat.QCOW2, backing_file=base.name, backing_format="raw")
    device = open_image(str(top), ImageFormat.QCOW2)
    try:
        device.write(offset=0, data=b"\x02" * (64 * KiB))
        device.zero(offset=128 * KiB, length=64 * KiB)
        placed = device.layer_map(offset=0, length=SIZE)
        assert [(p.offset, p.length, p.present, p.zero) for p in placed] == [
            (0, 64 * KiB, True, False),
            (64 * KiB, 64 * KiB, False, False),
            (128 * KiB, 64 * KiB, True, True),
            (192 * KiB, SIZE - 192 * KiB, False, False),
        ]
        assert placed[0].host is not None and placed[0].host % (64 * KiB) == 0 and placed[2].host is None
        backing = device.backing
        assert backing is not None and backing.path == str(base) and backing.backing is None
    finally:
        device.close()


def test_a_backend_must_implement_what_it_declares_native() -> None:
    with pytest.raises(TypeError, match="Plain declares zero, extents but does not implement it"):
        CheckedDevice(Plain(MiB, capabilities=Capabilities(writable=True, zero=Support.NATIVE, extents=Support.NATIVE)))


@pytest.mark.parametrize(
    "field", ["zero", "fua", "extents", "allocation_depth", "layer_map", "trim", "flush", "read_cached"], ids=str
)
def test_capabilities_refuse_a_support_level_the_adapter_cannot_give(field: str) -> None:
    emulated = ("zero", "fua", "extents", "allocation_depth", "layer_map")
    impossible = Support.NONE if field in emulated else Support.EMULATE
    with pytest.raises(ValueError):
        Capabilities(writable=True, **{field: impossible})  # type: ignore[arg-type]


# -- filters --------------------------------------------------------------------------------------


def test_a_filter_that_changes_nothing_is_its_next_device() -> None:
    inner = memory_device(SIZE)
    device = Filter(inner)
    assert (device.size, device.capabilities) == (inner.size, inner.capabilities)
    device.write(offset=4096, data=b"\x07" * 4096, fua=True)
    device.zero(offset=4096, length=512)
    assert read(inner, 4096, 1024) == bytes(512) + b"\x07" * 512
    assert device.extents(offset=0, length=SIZE) == inner.extents(offset=0, length=SIZE)
    with pytest.raises(DeviceError, match="outside the device"):
        device.write(offset=SIZE, data=b"x")  # the next device checks


def test_pass_through_members_are_the_next_device_s_own_and_overrides_can_call_super() -> None:
    class Counting(Filter):
        writes = 0

        def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
            self.writes += 1
            super().write(offset=offset, data=data, fua=fua)

    inner = memory_device(SIZE)
    device = Counting(inner)
    assert device.read_cached == inner.read_cached and device.extents == inner.extents  # no call in between
    device.write(offset=0, data=b"\x09")
    assert device.writes == 1 and read(inner, 0, 1) == b"\x09"


def test_policy_detects_zeroes_and_ignores_discards() -> None:
    inner = memory_device(SIZE)
    device = PolicyDevice(inner, discard=Discard.IGNORE, detect_zeroes=DetectZeroes.ON)
    assert inner.capabilities.can_trim and not device.capabilities.can_trim
    device.write(offset=0, data=b"\x01" * (128 * KiB))
    device.write(offset=0, data=bytes(64 * KiB))  # all zeroes: a zero request on a whole chunk
    assert device.extents(offset=0, length=SIZE)[0] == Extent(0, 64 * KiB, HOLE)
    device.trim(offset=64 * KiB, length=64 * KiB, fua=True)  # ignored
    assert read(device, 64 * KiB, 64 * KiB) == b"\x01" * (64 * KiB)


def test_policy_unmap_trims_and_may_punch_zeroes() -> None:
    inner = memory_device(SIZE)
    device = PolicyDevice(inner, discard=Discard.UNMAP, detect_zeroes=DetectZeroes.OFF)
    device.write(offset=0, data=b"\x01" * (128 * KiB))
    device.trim(offset=64 * KiB, length=64 * KiB)
    assert read(device, 64 * KiB, 64 * KiB) == bytes(64 * KiB)
    assert device.extents(offset=0, length=SIZE)[1] == Extent(64 * KiB, SIZE - 64 * KiB, HOLE)


# -- the adapter is the only way in ---------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[2] / "sendense_nbd"
BACKENDS = {"RawDevice", "MemoryDevice", "Qcow2Device"}


def _called(node: ast.AST) -> str | None:
    """The name a call calls (``f(...)`` or ``x.f(...)``), or None."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def test_the_package_builds_a_backend_only_inside_the_adapter() -> None:
    """Every ``RawDevice(...)``, ``MemoryDevice(...)`` and ``Qcow2Device(...)`` in the package is the
    argument of ``CheckedDevice(...)``, and nothing reaches for the adapter's backend."""
    bare, reach_in = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        wrapped = {id(arg) for node in ast.walk(tree) if _called(node) == "CheckedDevice" for arg in node.args}
        name = str(path.relative_to(PACKAGE))
        for node in ast.walk(tree):
            if _called(node) in BACKENDS and id(node) not in wrapped:
                bare.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("backend", "_backend") and "checked" not in name:
                reach_in.append(f"{name}:{node.lineno}")
    assert not bare, f"bare backends (open them with open_image / memory_device): {bare}"
    assert not reach_in, f"reaching past the adapter: {reach_in}"


def test_the_package_exports_the_adapter_not_the_bare_backends() -> None:
    for module in (sendense_nbd, sendense_nbd.storage):
        assert not BACKENDS & set(module.__all__), module.__name__
        assert not any(hasattr(module, name) for name in BACKENDS), module.__name__
    assert sendense_nbd.Backend is Backend and sendense_nbd.CheckedDevice is CheckedDevice
    assert sendense_nbd.open_image is open_image and sendense_nbd.memory_device is memory_device
