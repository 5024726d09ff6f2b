"""Copy endpoints: an NBD export or a local image behind one small async interface.

Theory of operation:

* :class:`Endpoint` is what the engine sees: a size, block-size limits,
  ``read_into`` / ``write`` / ``zero`` / ``flush`` at explicit offsets, and
  the two allocation maps the planner and the target probe need
  (``base:allocation`` extents and, when known, ``qemu:allocation-depth``).
* :class:`NBDEndpoint` talks through the public client API: a
  :class:`~sendense_nbd.client.ConnectionPool` of up to ``connections``
  connections (the pool opens more than one only when the server advertises
  ``NBD_FLAG_CAN_MULTI_CONN``, so a FLUSH on one covers writes made on all).
  When a connection drops or a request times out the whole pool is dropped
  and the next request opens a new one; :attr:`Endpoint.generation` counts
  these reconnects so the engine can tell which completed writes may have
  been lost with an unflushed server.
* :class:`LocalEndpoint` wraps a :class:`~sendense_nbd.storage.BlockDevice`
  from :func:`~sendense_nbd.storage.open_image` and runs its synchronous
  calls in a small thread pool of its own. An RBD image (qemu's ``rbd:``
  name or its ``json:`` form) is one too: a source opens read-only, and a
  target is used as it is when it exists (as ``qemu-img convert -n``) or
  created with the source's size (as ``qemu-img convert``); it is raw.
* Every failure leaves an endpoint as :class:`EndpointError`, marked
  ``transient`` when retrying can help (EIO, ENOMEM, a lost connection, a
  timeout) and naming the operation and offset.
* Allocation maps are asked for a window at a time: :meth:`Endpoint.extents`
  returns at most :data:`MAX_EXTENTS` extents covering a prefix of the range,
  and the caller goes on from where they end, so memory does not grow with
  the fragmentation of the disk.
* NBD timeouts and the retry budget are options (defaults in
  :data:`DEFAULT_CONNECT_TIMEOUT`, :data:`DEFAULT_REQUEST_TIMEOUT`): a
  stalled server fails a request after ``request_timeout`` seconds, and the
  engine gives up after ``retries`` more attempts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Protocol, TypeVar

from sendense_nbd.client import ClientOptions, ConnectionPool, NBDClient
from sendense_nbd.errors import (
    DeviceError,
    EndpointError,
    ImageError,
    NBDConnectionError,
    NBDRequestError,
    NBDTimeoutError,
    OptionError,
    ProtocolError,
    SendenseError,
    TLSError,
    URIError,
)
from sendense_nbd.protocol.constants import ALLOCATION_DEPTH, BASE_ALLOCATION, Errno
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage import BlockDevice, ImageFormat, require_opened

T = TypeVar("T")

#: NBD errors worth retrying: the next attempt may well succeed.
TRANSIENT_ERRNOS = frozenset({Errno.EIO, Errno.ENOMEM, Errno.ESHUTDOWN})
#: Most extents one :meth:`Endpoint.extents` call returns (about 6 MiB of them).
MAX_EXTENTS = 1 << 16
#: I/O threads of an RBD endpoint at least: each blocking librbd call waits on the network.
RBD_THREADS = 16
#: Seconds to connect and negotiate (a WAN round trip is well under a second).
DEFAULT_CONNECT_TIMEOUT = 30.0
#: Seconds one NBD request may take, queueing at the server included.
DEFAULT_REQUEST_TIMEOUT = 60.0


class Endpoint(Protocol):
    """The source or target of a copy."""

    @property
    def name(self) -> str:
        """What to call the endpoint in messages (its URI or path)."""

    @property
    def size(self) -> int:
        """The disk's size in bytes."""

    @property
    def min_block(self) -> int:
        """Requests are aligned to this."""

    @property
    def max_request(self) -> int:
        """Largest read or write worth sending in one request."""

    @property
    def connections(self) -> int:
        """How many requests streams the endpoint really has open (1 without multi-conn)."""

    @property
    def can_zero(self) -> bool:
        """WRITE_ZEROES is available (else zeroes are written as data)."""

    @property
    def generation(self) -> int:
        """Bumped on every reconnect: writes completed in an older generation
        and not yet flushed may be lost."""

    @property
    def has_backing(self) -> bool | None:
        """True: a backing chain is known; None: cannot tell."""

    async def extents(self, *, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents, consecutive from ``offset``: at most
        :data:`MAX_EXTENTS`, covering a non-empty prefix of the range (the
        last may reach past it)."""

    async def allocation_depth(self, *, offset: int, length: int) -> list[Extent] | None:
        """Extents whose status is the depth, like :meth:`extents`, or None when unknown."""

    async def reopen(self) -> Endpoint:
        """The same disk through new connections (a verify trusts nothing the copy saw).

        May return the endpoint itself when there is nothing to reconnect."""

    async def read_into(self, *, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``."""

    async def write(self, *, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` (durable only after a :meth:`flush`)."""

    async def zero(self, *, offset: int, length: int, punch: bool) -> None:
        """Make the range read zeroes; ``punch`` allows a hole (never over a backing chain)."""

    async def flush(self) -> None:
        """Make every completed write durable."""

    async def close(self) -> None:
        """Release connections or the device."""


def _nbd_error(exc: NBDRequestError, what: str, offset: int) -> EndpointError:
    return EndpointError(
        f"{what} at offset {offset} failed: {exc}", transient=exc.errno in TRANSIENT_ERRNOS, offset=offset
    )


class NBDEndpoint:
    """An NBD export reached through the client (``nbd://``, ``nbd+unix://``, ``nbds://``, ``nbds+unix://``);
    the pool's connections share one TLS context."""

    def __init__(
        self,
        uri: str,
        *,
        connections: int = 4,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.uri = uri
        self._wanted = connections
        self._options = ClientOptions(
            timeout=connect_timeout,
            request_timeout=request_timeout,
            meta_contexts=(BASE_ALLOCATION, ALLOCATION_DEPTH),
            max_in_flight=256,
        )
        self._pool: ConnectionPool | None = None
        self._first: NBDClient | None = None
        self._lock = asyncio.Lock()
        self._generation = 0
        self._closed = False

    async def open(self) -> NBDEndpoint:
        """Connect (the pool) and return the endpoint."""
        await self._ensure()
        return self

    async def __aenter__(self) -> NBDEndpoint:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def _info(self) -> NBDClient:
        if self._first is None:
            raise RuntimeError("the endpoint is not open")
        return self._first

    @property
    def name(self) -> str:
        """The URI."""
        return self.uri

    @property
    def size(self) -> int:
        """The export's size."""
        return self._info.size

    @property
    def min_block(self) -> int:
        """The server's minimum block size."""
        return self._info.min_block

    @property
    def max_request(self) -> int:
        """The server's maximum payload."""
        return self._info.max_block

    @property
    def connections(self) -> int:
        """Connections in the pool (1 without multi-conn)."""
        return len(self._pool) if self._pool is not None else 1

    @property
    def can_zero(self) -> bool:
        """The server has WRITE_ZEROES."""
        return self._info.can_zero

    @property
    def can_multi_conn(self) -> bool:
        """The server set ``NBD_FLAG_CAN_MULTI_CONN``."""
        return self._info.can_multi_conn

    @property
    def generation(self) -> int:
        """Reconnects so far."""
        return self._generation

    @property
    def has_backing(self) -> bool | None:
        """Unknown over NBD (the target probe asks ``qemu:allocation-depth``)."""
        return None

    async def _ensure(self) -> ConnectionPool:
        async with self._lock:
            if self._closed:
                raise EndpointError(f"{self.uri}: the endpoint is closed", transient=False)
            if self._pool is None:
                try:
                    pool = await ConnectionPool(self.uri, self._wanted, options=self._options).open()
                except (OptionError, URIError, TLSError) as exc:  # a refusal; TLS: credentials, certificates, alerts
                    raise EndpointError(f"{self.uri}: {exc}", transient=False) from exc
                except ProtocolError as exc:  # a garbled handshake: worth another try
                    raise EndpointError(f"{self.uri}: {exc}", transient=True) from exc
                except NBDConnectionError as exc:  # refused, reset (also in the TLS handshake), lost
                    named = str(exc) if "://" in str(exc) else f"{self.uri}: {exc}"
                    raise EndpointError(named, transient=True) from exc
                except (NBDTimeoutError, OSError) as exc:
                    raise EndpointError(f"cannot connect to {self.uri}: {exc}", transient=True) from exc
                if self._first is not None and pool.first.size != self._first.size:
                    await pool.close()
                    raise EndpointError(f"{self.uri}: the export changed size after reconnecting", transient=False)
                self._pool = pool
                self._first = pool.first
            return self._pool

    async def _drop(self, generation: int) -> None:
        """Forget a broken pool (once per generation); the next call reconnects."""
        async with self._lock:
            if generation != self._generation or self._pool is None:
                return
            self._generation += 1
            pool, self._pool = self._pool, None
        for client in pool.connections:
            client.abort()
        await asyncio.gather(*(client.wait_closed() for client in pool.connections), return_exceptions=True)

    async def _call(self, what: str, offset: int, operation: Callable[[NBDClient], Awaitable[T]]) -> T:
        pool = await self._ensure()
        generation = self._generation
        try:
            return await operation(pool.next())
        except NBDRequestError as exc:
            raise _nbd_error(exc, what, offset) from exc
        except (NBDConnectionError, NBDTimeoutError) as exc:
            await self._drop(generation)
            raise EndpointError(
                f"{what} at offset {offset} on {self.uri}: {exc}", transient=True, offset=offset
            ) from exc

    async def extents(self, *, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents (all data when the server has no map)."""
        if not self._info.can_block_status or BASE_ALLOCATION not in self._info.meta_contexts:
            return [Extent(offset, length)]
        return await self._map(BASE_ALLOCATION, offset, length)

    async def allocation_depth(self, *, offset: int, length: int) -> list[Extent] | None:
        """``qemu:allocation-depth`` extents, or None when the server does not offer it."""
        if ALLOCATION_DEPTH not in self._info.meta_contexts:
            return None
        return await self._map(ALLOCATION_DEPTH, offset, length)

    async def _map(self, context: str, offset: int, length: int) -> list[Extent]:
        return await self._call(
            "BLOCK_STATUS",
            offset,
            lambda c: c.extents(offset=offset, length=length, context=context, max_extents=MAX_EXTENTS),
        )

    async def reopen(self) -> NBDEndpoint:
        """A new endpoint on the same URI with new connections."""
        options = self._options
        fresh = NBDEndpoint(
            self.uri,
            connections=self._wanted,
            request_timeout=options.request_timeout,
            connect_timeout=options.timeout,
        )
        await fresh.open()
        if fresh.size != self.size:
            await fresh.close()
            raise EndpointError(f"{self.uri}: the export changed size after reconnecting", transient=False)
        return fresh

    async def read_into(self, *, offset: int, buffer: memoryview) -> None:
        """READ into ``buffer``."""
        await self._call("READ", offset, lambda c: c.pread_into(buffer, offset=offset))

    async def write(self, *, offset: int, data: memoryview) -> None:
        """WRITE ``data``."""
        await self._call("WRITE", offset, lambda c: c.pwrite(data, offset=offset))

    async def zero(self, *, offset: int, length: int, punch: bool) -> None:
        """WRITE_ZEROES (with NO_HOLE unless ``punch``)."""
        await self._call("WRITE_ZEROES", offset, lambda c: c.zero(offset=offset, length=length, no_hole=not punch))

    async def flush(self) -> None:
        """FLUSH (nothing when the server has no FLUSH)."""
        if self._info.can_flush:
            await self._call("FLUSH", 0, lambda c: c.flush())

    async def close(self) -> None:
        """Close the pool; later calls fail."""
        async with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except SendenseError:
                pass  # a broken connection has nothing left to say


class LocalEndpoint:
    """A local raw or qcow2 image (a :class:`~sendense_nbd.storage.BlockDevice`)."""

    def __init__(self, device: BlockDevice, name: str, *, threads: int = 4) -> None:
        self.device = require_opened(device, f"copy endpoint {name!r}")
        self._name = name
        self._threads = max(1, threads)
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="copy-io")

    async def __aenter__(self) -> LocalEndpoint:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def name(self) -> str:
        """The image's path."""
        return self._name

    @property
    def size(self) -> int:
        """The device's size."""
        return self.device.size

    @property
    def min_block(self) -> int:
        """The device's minimum block size."""
        return self.device.capabilities.min_block

    @property
    def max_request(self) -> int:
        """32 MiB: larger requests only cost memory."""
        return 32 << 20

    @property
    def connections(self) -> int:
        """The endpoint's I/O threads."""
        return self._threads

    @property
    def can_zero(self) -> bool:
        """Always (the device emulates what it lacks)."""
        return True

    @property
    def generation(self) -> int:
        """Always 0: a local device never reconnects."""
        return 0

    @property
    def has_backing(self) -> bool | None:
        """The image has a backing file."""
        return self.device.capabilities.has_backing

    async def _run(self, what: str, offset: int, function: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, function)
        except DeviceError as exc:
            transient = exc.errno in TRANSIENT_ERRNOS
            raise EndpointError(
                f"{what} at offset {offset} of {self._name}: {exc}", transient=transient, offset=offset
            ) from exc
        except OSError as exc:
            raise EndpointError(
                f"{what} at offset {offset} of {self._name}: {exc}", transient=False, offset=offset
            ) from exc

    async def extents(self, *, offset: int, length: int) -> list[Extent]:
        """The device's allocation map (all data when it has none)."""
        return await self._run("extents", offset, lambda: _walk(self.device.extents, offset, length))

    async def allocation_depth(self, *, offset: int, length: int) -> list[Extent] | None:
        """The device's allocation depth."""
        return await self._run("allocation depth", offset, lambda: _walk(self.device.allocation_depth, offset, length))

    async def reopen(self) -> LocalEndpoint:
        """The endpoint itself: there is nothing to reconnect."""
        return self

    async def read_into(self, *, offset: int, buffer: memoryview) -> None:
        """Read from the device (in the endpoint's threads)."""
        await self._run("read", offset, lambda: self.device.read_into(offset=offset, buffer=buffer))

    async def write(self, *, offset: int, data: memoryview) -> None:
        """Write to the device (in the endpoint's threads)."""
        await self._run("write", offset, lambda: self.device.write(offset=offset, data=data))

    async def zero(self, *, offset: int, length: int, punch: bool) -> None:
        """Zero a range of the device (a hole only with ``punch``)."""
        await self._run("zero", offset, lambda: self.device.zero(offset=offset, length=length, may_trim=punch))

    async def flush(self) -> None:
        """Flush the device."""
        await self._run("flush", 0, self.device.flush)

    async def close(self) -> None:
        """Stop the threads and close the device."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._pool.shutdown)
        self.device.close()


def _walk(describe: Callable[..., list[Extent]], offset: int, length: int) -> list[Extent]:
    """Extents from ``describe(offset=, length=)`` until the range is covered, up to :data:`MAX_EXTENTS`."""
    out: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end and len(out) < MAX_EXTENTS:
        start = pos
        for extent in describe(offset=pos, length=end - pos):
            if extent.end > end:
                extent = Extent(extent.offset, end - extent.offset, extent.status)
            out.append(extent)
            pos = extent.end
            if pos >= end or len(out) >= MAX_EXTENTS:
                break
        if pos <= start:
            raise EndpointError(f"no allocation information at offset {start}", transient=False, offset=start)
    return out


def is_rbd(spec: str) -> bool:
    """True for qemu's ``rbd:`` name of an RBD image (or its ``json:`` form); loads nothing for other names."""
    if not spec.startswith(("rbd:", "json:")):
        return False
    from sendense_nbd.storage.rbd import is_rbd_filename

    return is_rbd_filename(spec)


async def _open_rbd(spec: str, *, readonly: bool, size: int | None, connections: int, trusted: bool) -> LocalEndpoint:
    """An RBD image as an endpoint; a missing target is created with ``size`` bytes (None: it must exist)."""
    from sendense_nbd.storage.rbd import as_spec, create_rbd, open_rbd, rbd_exists

    parsed = as_spec(spec, trusted=trusted)
    if not readonly and parsed.snapshot:
        raise ImageError(f"rbd:{parsed.path}: a snapshot cannot be a copy target (rbd snapshots are read-only)")

    def make() -> BlockDevice:
        if not readonly and not rbd_exists(parsed):
            if size is None:
                raise ImageError(f"rbd:{parsed.path} does not exist")
            create_rbd(parsed, size)
        return open_rbd(parsed, readonly=readonly)

    device = await asyncio.to_thread(make)
    return LocalEndpoint(device, f"rbd:{parsed.path}", threads=max(connections, RBD_THREADS))


def is_uri(spec: str) -> bool:
    """True for an NBD URI (``nbd://``, ``nbd+unix://``), False for a local image path."""
    return "://" in spec


async def open_source(
    spec: str,
    *,
    connections: int = 4,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    trusted: bool = False,
) -> Endpoint:
    """Open an NBD URI, an RBD image, or a local image read-only with its format probed.

    ``trusted``: the operator gave ``spec`` (else an ``rbd:`` name may carry only a few Ceph options:
    ``storage.rbd.as_spec``)."""
    if is_rbd(spec):
        return await _open_rbd(spec, readonly=True, size=None, connections=connections, trusted=trusted)
    if is_uri(spec):
        endpoint = NBDEndpoint(
            spec, connections=connections, request_timeout=request_timeout, connect_timeout=connect_timeout
        )
        return await endpoint.open()
    from sendense_nbd.storage import open_image

    try:
        device = await asyncio.to_thread(open_image, spec, None, readonly=True)
    except OSError as exc:
        raise EndpointError(f"cannot open {spec}: {exc.strerror or exc}", transient=False) from exc
    return LocalEndpoint(device, spec, threads=connections)


async def open_target(
    spec: str,
    *,
    fmt: ImageFormat | None = None,
    size: int | None = None,
    connections: int = 4,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    trusted: bool = False,
) -> Endpoint:
    """Open an NBD URI, an RBD image, or a local image of format ``fmt`` for writing
    (created with ``size`` bytes when it does not exist; an RBD image is raw; ``trusted`` as in
    :func:`open_source`)."""
    if is_rbd(spec):
        if fmt not in (None, ImageFormat.RAW):
            raise ImageError(f"an RBD target is raw, not {fmt.value}")
        return await _open_rbd(spec, readonly=False, size=size, connections=connections, trusted=trusted)
    if is_uri(spec):
        endpoint = NBDEndpoint(
            spec, connections=connections, request_timeout=request_timeout, connect_timeout=connect_timeout
        )
        return await endpoint.open()
    if fmt is None:
        raise ImageError(f"{spec}: give the target's format (-f raw|qcow2) or an NBD URI")
    from sendense_nbd.storage import create_image, open_image

    def make() -> BlockDevice:
        if not os.path.exists(spec):
            if size is None:
                raise ImageError(f"{spec} does not exist")
            create_image(spec, size, fmt)
        return open_image(spec, fmt)

    try:
        device = await asyncio.to_thread(make)
    except OSError as exc:
        raise EndpointError(f"cannot open {spec}: {exc.strerror or exc}", transient=False) from exc
    return LocalEndpoint(device, spec, threads=connections)
