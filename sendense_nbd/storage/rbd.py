"""RBD images (Ceph block devices) behind the block-device contract, named as qemu names them.

* **Names.** :func:`parse_rbd_filename` reads qemu's ``rbd:`` filename,
  ``rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT][:KEY=VALUE...]`` (``\\`` escapes the
  next character, so ``\\:`` is a colon inside a value; ``conf`` is the
  ceph.conf, ``id`` the user without ``client.``, every other key a Ceph
  option such as ``keyring`` or ``mon_host``), exactly as qemu's rbd driver
  splits it, and its ``json:`` form (``{"driver": "rbd", "pool": ..., "image":
  ..., "snapshot", "namespace", "conf", "user", "server": [{"host", "port"}],
  "auth-client-required"}``, also as the ``file`` of a ``raw`` driver). A
  snapshot is always opened read-only; a writable open of one is refused, as
  qemu refuses it.
* **Connection.** :func:`connect` opens a ``rados.Rados`` and an ``Ioctx``
  (Debian's python3-rados and python3-rbd, imported on first use so nothing
  else pays for them): the ceph.conf named (else Ceph's default search, a
  missing one ignored, as qemu does), the options of the name, and
  ``client_mount_timeout`` 30 s unless the name sets it, so an unreachable
  cluster is an error, not a hang. The ``Ioctx`` is marked *full-try*
  (``rados_set_pool_full_try``): a write to a full pool or cluster then fails
  with ``EDQUOT``/``ENOSPC`` (the client sees ``ENOSPC``) instead of waiting
  for space forever, which is librados' default.
* **I/O.** One ``rbd.Image`` per device, shared by every caller thread
  (librbd is thread-safe and releases the GIL). A request up to one object
  (4 MiB by default) is one blocking call in the caller's thread; a larger
  one is split at object boundaries into ``aio_read``/``aio_write`` parts
  that run concurrently. Every call and part holds one of ``queue_depth``
  slots (default 32) while it runs, so the operations in flight on an image
  stay bounded however many threads call. Zeroing is librbd's
  ``write_zeroes`` (with ``THICK_PROVISION`` unless trimming is allowed, so
  the range then stays allocated), TRIM is ``discard`` (librbd skips
  partial discards below ``rbd_discard_granularity_bytes``: TRIM is
  advisory), FLUSH is ``flush``, and FUA a flush after the operation. There
  is no fast zero (qemu's rbd driver offers none either).
* **Block status** comes from ``diff_iterate`` from the image's creation
  (``include_parent``, so a clone shows its parent's data) with
  ``whole_object=True``, as qemu does: an object that exists is data as a
  whole, one that does not is a hole reading zeroes. With the object map
  (``fast-diff``) that is a map lookup; without it librbd lists objects, so
  one answer then covers less (:data:`MAP_WINDOW` vs
  :data:`MAP_WINDOW_SLOW`). librbd is asked for a whole window at a time and
  the answer is kept (:class:`_MapCache`): a server asks before every sparse
  read, and each question would read the object map from the cluster.
* **Cache.** ``cache=none`` sets ``rbd_cache=false`` and the other modes
  ``rbd_cache=true`` (qemu's mapping); ``writethrough`` flushes after every
  change. Under ``writeback`` (the default) ``rbd_cache_writethrough_until_flush``
  is off: librbd's safety net for guests that never flush would keep every
  write waiting for the OSDs until the first FLUSH, and an NBD client is
  told the export has a write cache (``SEND_FLUSH``) and flushes, as it does
  with qemu-nbd over a file. A write then returns once librbd holds it (up
  to ``rbd_cache_max_dirty`` in flight), so the device declares
  ``serial_writes``: the server runs its changes in order on one thread,
  which is as fast and costs less CPU than many threads waiting on librbd.
* **Errors.** Opening fails with :class:`~sendense_nbd.errors.RbdSpecError`,
  :class:`~sendense_nbd.errors.RbdNotFound`,
  :class:`~sendense_nbd.errors.RbdPermissionDenied` or
  :class:`~sendense_nbd.errors.RbdError`; I/O failures are
  :class:`~sendense_nbd.errors.DeviceError` with the NBD errno (``EDQUOT``
  and ``ENOSPC`` as ``ENOSPC``, ``EACCES``/``EPERM``/``EROFS`` as ``EPERM``,
  the rest ``EIO`` or their own).
"""

from __future__ import annotations

import bisect
import contextlib
import errno as os_errno
import importlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from sendense_nbd.errors import DeviceError, RbdError, RbdNotFound, RbdPermissionDenied, RbdSpecError
from sendense_nbd.protocol.constants import AllocationFlag, Errno
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import Backend, Capabilities, Support
from sendense_nbd.storage.checked import CheckedDevice
from sendense_nbd.storage.modes import CacheMode

#: Operations (blocking calls and aio parts) in flight on one image at most.
DEFAULT_QUEUE_DEPTH = 32
#: Seconds to reach the monitors unless the name sets ``client_mount_timeout``.
CONNECT_TIMEOUT = 30
#: Most bytes one block-status answer covers with the object map (a map lookup)...
MAP_WINDOW = 64 << 30
#: ... and without it (librbd lists every object of the window).
MAP_WINDOW_SLOW = 1 << 30
_HOLE = int(AllocationFlag.HOLE | AllocationFlag.ZERO)
#: Most data runs one answer from the block-status cache spans.
_CACHED_EXTENTS = 1024
#: qemu's json: keys of the rbd driver this device understands.
_JSON_KEYS = frozenset(
    {
        "driver",
        "pool",
        "image",
        "snapshot",
        "namespace",
        "conf",
        "user",
        "server",
        "auth-client-required",
        "=keyvalue-pairs",
    }
)
_OS_TO_NBD = {
    os_errno.EPERM: Errno.EPERM,
    os_errno.EACCES: Errno.EPERM,
    os_errno.EROFS: Errno.EPERM,
    os_errno.ENOSPC: Errno.ENOSPC,
    os_errno.EDQUOT: Errno.ENOSPC,
    os_errno.EFBIG: Errno.ENOSPC,
    os_errno.ENOMEM: Errno.ENOMEM,
    os_errno.EINVAL: Errno.EINVAL,
    os_errno.EOPNOTSUPP: Errno.ENOTSUP,
    os_errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def _lib(name: str) -> Any:
    """Debian's ``rados`` or ``rbd`` module (system Python 3.11 only), imported on first use."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RbdError(f"RBD needs Debian's python3-{name} (system Python 3.11; run ./setup.sh): {exc}") from exc


# -- names ---------------------------------------------------------------------


def _escape(text: str, special: str) -> str:
    return "".join("\\" + c if c == "\\" or c in special else c for c in text)


@attrs.frozen
class RbdSpec:
    """An RBD image (or a snapshot of one) and how to reach its cluster: what an ``rbd:`` filename says.

    ``user`` is qemu's ``id`` (``admin`` for ``client.admin``); ``options`` are the
    other ``key=value`` pairs, in order, each a Ceph option set on the connection.
    """

    pool: str
    image: str
    snapshot: str | None = None
    namespace: str | None = None
    conf: str | None = None
    user: str | None = None
    keyring: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        """``POOL[/NAMESPACE]/IMAGE[@SNAPSHOT]``: the image, without how to reach it (for messages)."""
        namespace = f"{self.namespace}/" if self.namespace else ""
        snapshot = f"@{self.snapshot}" if self.snapshot else ""
        return f"{self.pool}/{namespace}{self.image}{snapshot}"

    @property
    def filename(self) -> str:
        """qemu's ``rbd:`` filename of this spec, escaped so that :func:`parse_rbd_filename` gives it back."""
        name = _escape(self.pool, "/@:")
        if self.namespace:
            name += "/" + _escape(self.namespace, "/@:")
        name += "/" + _escape(self.image, "/@:")
        if self.snapshot:
            name += "@" + _escape(self.snapshot, ":@")
        pairs = [("conf", self.conf), ("id", self.user), ("keyring", self.keyring), *self.options]
        for key, value in pairs:
            if value is not None:
                name += f":{_escape(key, '=:@')}={_escape(value, ':@')}"
        return "rbd:" + name

    def at(self, snapshot: str | None) -> RbdSpec:
        """The same image at ``snapshot`` (None: its head)."""
        return attrs.evolve(self, snapshot=snapshot)


def _next_token(text: str, delim: str) -> tuple[str, str | None]:
    """qemu's ``qemu_rbd_next_tok``: the text before the first unescaped ``delim`` and the rest after it
    (None when there is none)."""
    i = 0
    while i < len(text):
        if text[i] == delim:
            return text[:i], text[i + 1 :]
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        i += 1
    return text, None


def _unescape(text: str) -> str:
    """qemu's ``qemu_rbd_unescape``: drop each backslash that has a character after it."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def _parse_options(rest: str | None) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The ``:key=value`` pairs: ``conf``, ``id`` and ``keyring`` by name, the others in order."""
    named: dict[str, str] = {}
    others: list[tuple[str, str]] = []
    while rest is not None:
        raw_key, rest = _next_token(rest, "=")
        key = _unescape(raw_key)
        if rest is None:
            raise RbdSpecError(f"rbd: option {key!r} has no value")
        if not key:
            raise RbdSpecError("rbd: an option has an empty name")
        raw_value, rest = _next_token(rest, ":")
        value = _unescape(raw_value)
        if key in ("conf", "id", "keyring"):
            named[key] = value
        else:
            others.append((key, value))
    return named, others


def _parse_rbd_colon(text: str) -> RbdSpec:
    """qemu's ``qemu_rbd_parse_filename``, token by token (an ``@`` anywhere after the pool starts the snapshot)."""
    pool, rest = _next_token(text.removeprefix("rbd:"), "/")
    if rest is None:
        raise RbdSpecError(f"{text!r}: a pool name is required (rbd:POOL/IMAGE)")
    snapshot = None
    if _next_token(rest, "@")[1] is not None:
        image, after = _next_token(rest, "@")
        raw_snapshot, rest = _next_token(after or "", ":")
        snapshot = _unescape(raw_snapshot)
    else:
        image, rest = _next_token(rest, ":")
    namespace = None
    if _next_token(image, "/")[1] is not None:
        raw_namespace, image_rest = _next_token(image, "/")
        namespace, image = _unescape(raw_namespace) or None, image_rest or ""
    named, others = _parse_options(rest)
    return _checked(
        RbdSpec(
            pool=_unescape(pool),
            image=_unescape(image),
            snapshot=snapshot,
            namespace=namespace,
            conf=named.get("conf"),
            user=named.get("id"),
            keyring=named.get("keyring"),
            options=tuple(others),
        ),
        text,
    )


def _checked(spec: RbdSpec, text: str) -> RbdSpec:
    if not spec.pool:
        raise RbdSpecError(f"{text!r}: the pool name is empty")
    if not spec.image:
        raise RbdSpecError(f"{text!r}: the image name is empty")
    if spec.snapshot == "":
        raise RbdSpecError(f"{text!r}: the snapshot name is empty")
    return spec


def _rbd_json_object(text: str) -> dict[str, Any] | None:
    """The rbd driver's object of a ``json:`` filename (top level, or a ``raw`` driver's ``file``), else None."""
    try:
        spec = json.loads(text[5:])
    except ValueError as exc:
        raise RbdSpecError(f"json: filename is not JSON ({exc})") from exc
    if not isinstance(spec, dict):
        return None
    if any("." in key for key in spec):  # qemu's flattened form: {"file.driver": "rbd", "file.pool": ...}
        nested: dict[str, Any] = {}
        for key, value in spec.items():
            head, _, tail = key.partition(".")
            if tail:
                nested.setdefault(head, {})[tail] = value
            else:
                nested[key] = value
        spec = nested
    if spec.get("driver") == "rbd":
        return dict(spec)
    file = spec.get("file")
    if spec.get("driver", "raw") == "raw" and isinstance(file, dict) and file.get("driver") == "rbd":
        if set(spec) - {"driver", "file"}:
            raise RbdSpecError(f"json: raw driver options {sorted(set(spec) - {'driver', 'file'})} are not supported")
        return dict(file)
    return None


def _json_options(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """Ceph options from the json: keys qemu turns into options (``server``, ``auth-client-required``, pairs)."""
    options: list[tuple[str, str]] = []
    servers = obj.get("server")
    if servers is not None:
        hosts = [
            f"[{s['host']}]:{s.get('port', '6789')}"
            if ":" in str(s["host"])
            else f"{s['host']}:{s.get('port', '6789')}"
            for s in servers
        ]
        options.append(("mon_host", ",".join(hosts)))
    auth = obj.get("auth-client-required")
    if auth is not None:
        options.append(("auth_client_required", ";".join(str(a) for a in auth)))
    pairs = obj.get("=keyvalue-pairs")
    if pairs is not None:
        flat = json.loads(pairs) if isinstance(pairs, str) else pairs
        options.extend((str(k), str(v)) for k, v in zip(flat[::2], flat[1::2], strict=True))
    return options


def _parse_rbd_json(text: str, obj: dict[str, Any]) -> RbdSpec:
    unknown = set(obj) - _JSON_KEYS
    if unknown:
        raise RbdSpecError(f"json: rbd options {sorted(unknown)} are not supported (key-secret, encrypt, ...)")
    try:
        for key in ("pool", "image"):
            if not isinstance(obj.get(key), str):
                raise RbdSpecError(f"json: rbd needs a string {key!r}")
        options = _json_options(obj)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RbdSpecError(f"json: rbd server/auth options are malformed ({exc})") from exc
    keyring = dict(options).get("keyring")
    return _checked(
        RbdSpec(
            pool=obj["pool"],
            image=obj["image"],
            snapshot=obj.get("snapshot"),
            namespace=obj.get("namespace") or None,
            conf=obj.get("conf"),
            user=obj.get("user"),
            keyring=keyring,
            options=tuple((k, v) for k, v in options if k != "keyring"),
        ),
        text,
    )


def is_rbd_filename(name: str) -> bool:
    """``name`` names an RBD image: ``rbd:...``, or ``json:`` with the rbd driver (malformed JSON: False)."""
    if name.startswith("rbd:"):
        return True
    if not name.startswith("json:"):
        return False
    try:
        return _rbd_json_object(name) is not None
    except RbdSpecError:
        return False


def parse_rbd_filename(text: str) -> RbdSpec:
    """The :class:`RbdSpec` of qemu's ``rbd:`` filename or its ``json:`` form (:class:`RbdSpecError` if malformed)."""
    if text.startswith("rbd:"):
        return _parse_rbd_colon(text)
    if text.startswith("json:"):
        obj = _rbd_json_object(text)
        if obj is not None:
            return _parse_rbd_json(text, obj)
    raise RbdSpecError(f"{text!r} is not an rbd: filename")


def as_spec(name: str | RbdSpec) -> RbdSpec:
    """``name`` parsed, or itself when it is a spec already."""
    return name if isinstance(name, RbdSpec) else parse_rbd_filename(name)


# -- connections ---------------------------------------------------------------


def _errno(exc: BaseException) -> int:
    return abs(int(getattr(exc, "errno", 0) or 0))


def _open_error(exc: BaseException, what: str, spec: RbdSpec) -> RbdError:
    """The typed error of a failed open step: not found, permission, or the rest."""
    code = _errno(exc)
    if code == os_errno.ENOENT:
        return RbdNotFound(f"{what}: not found")
    if code in (os_errno.EACCES, os_errno.EPERM):
        return RbdPermissionDenied(
            f"{what}: permission denied for client.{spec.user or 'admin'} "
            f"(a device needs the caps `mon 'profile rbd' osd 'profile rbd pool={spec.pool}'`)"
        )
    return RbdError(f"{what}: {exc}")


def _new_cluster(spec: RbdSpec, cache: CacheMode) -> Any:
    """A configured, not yet connected ``rados.Rados``."""
    rados = _lib("rados")
    cluster = rados.Rados(rados_id=spec.user or None)
    try:
        if spec.conf:
            cluster.conf_read_file(spec.conf)
        else:
            with contextlib.suppress(rados.Error):  # Ceph's default search; none found is fine (qemu's way)
                cluster.conf_read_file()
    except rados.Error as exc:
        raise RbdError(f"cannot read the Ceph configuration {spec.conf}: {exc}") from exc
    settings = [("client_mount_timeout", str(CONNECT_TIMEOUT)), ("rbd_cache", str(cache is not CacheMode.NONE).lower())]
    if cache is CacheMode.WRITEBACK:  # NBD clients flush: no writethrough until a first FLUSH (see the docstring)
        settings.append(("rbd_cache_writethrough_until_flush", "false"))
    if spec.keyring is not None:
        settings.append(("keyring", spec.keyring))
    for key, value in [*settings, *spec.options]:
        try:
            cluster.conf_set(key, value)
        except rados.Error as exc:
            raise RbdSpecError(f"Ceph option {key}={value!r} of rbd:{spec.path} is not accepted: {exc}") from exc
    return cluster


def _open_ioctx(cluster: Any, spec: RbdSpec) -> Any:
    """The pool's ``Ioctx`` (full-try, in the namespace), or a typed error."""
    rados = _lib("rados")
    try:
        ioctx = cluster.open_ioctx(spec.pool)
    except rados.Error as exc:
        raise _open_error(exc, f"pool {spec.pool!r}", spec) from exc
    try:
        ioctx.set_osdmap_full_try()  # a full pool fails writes (EDQUOT/ENOSPC) instead of blocking them
        if spec.namespace:
            if not _lib("rbd").RBD().namespace_exists(ioctx, spec.namespace):
                raise RbdNotFound(f"namespace {spec.namespace!r} of pool {spec.pool!r}: not found")
            ioctx.set_namespace(spec.namespace)
    except BaseException:
        ioctx.close()
        raise
    return ioctx


def _connect(spec: RbdSpec, cache: CacheMode) -> tuple[Any, Any]:
    rados = _lib("rados")
    cluster = _new_cluster(spec, cache)
    try:
        try:
            cluster.connect()
        except rados.Error as exc:
            where = f"conf {spec.conf}" if spec.conf else "Ceph's default conf"
            raise _open_error(
                exc, f"cannot connect to the Ceph cluster ({where}, client.{spec.user or 'admin'})", spec
            ) from exc
        return cluster, _open_ioctx(cluster, spec)
    except BaseException:
        cluster.shutdown()
        raise


@contextlib.contextmanager
def connect(spec: RbdSpec | str, *, cache: CacheMode = CacheMode.WRITEBACK) -> Iterator[tuple[Any, Any]]:
    """``(rados.Rados, rados.Ioctx)`` of the spec's cluster and pool (namespace set, full-try), closed on exit."""
    cluster, ioctx = _connect(as_spec(spec), cache)
    try:
        yield cluster, ioctx
    finally:
        ioctx.close()
        cluster.shutdown()


def create_rbd(spec: RbdSpec | str, size: int) -> None:
    """Create the image (the pool's default features) of ``size`` bytes; it must not exist."""
    spec = as_spec(spec)
    if spec.snapshot:
        raise RbdSpecError(f"cannot create rbd:{spec.path}: a snapshot is made from an image, not created")
    if not 0 <= size < 1 << 63:
        raise RbdError(f"size {size} is not an image size")
    rbd = _lib("rbd")
    with connect(spec) as (_, ioctx):
        try:
            rbd.RBD().create(ioctx, spec.image, size)
        except rbd.ImageExists as exc:
            raise RbdError(f"cannot create rbd:{spec.path}: it exists") from exc
        except rbd.Error as exc:
            raise _open_error(exc, f"cannot create rbd:{spec.path}", spec) from exc


def rbd_exists(spec: RbdSpec | str) -> bool:
    """The image (and the snapshot, if named) exists; the pool and namespace must."""
    spec = as_spec(spec)
    rbd = _lib("rbd")
    with connect(spec) as (_, ioctx):
        try:
            with rbd.Image(ioctx, spec.image, snapshot=spec.snapshot, read_only=True):
                return True
        except rbd.ImageNotFound:
            return False
        except rbd.Error as exc:
            raise _open_error(exc, f"rbd:{spec.path}", spec) from exc


# -- the device ----------------------------------------------------------------


class _Batch:
    """The aio parts of one request: counts them in and out, keeps the first error."""

    def __init__(self) -> None:
        self._pending = 0
        self._done = threading.Condition()
        self.errno = 0

    def add(self) -> None:
        with self._done:
            self._pending += 1

    def finish(self, result: int) -> None:
        with self._done:
            if result < 0 and not self.errno:
                self.errno = -result
            self._pending -= 1
            if not self._pending:
                self._done.notify_all()

    def wait(self) -> None:
        with self._done:
            while self._pending:
                self._done.wait()


class _MapCache:
    """The last block-status answer of a device, reused where that cannot mislead a reader.

    A server asks for block status before each sparse read, and asking librbd means
    reading the object map from the cluster each time. What it said is reused for a
    query inside the same window: in full for a snapshot, which never changes; for the
    head only the data run the query starts in, because saying "data" is always safe
    (at worst zeroes are read as data) while a hole may have been written since, by
    another client. Our own zero and trim clear it.
    """

    def __init__(self, *, immutable: bool) -> None:
        self._immutable = immutable
        self._lock = threading.Lock()
        self._window = (0, 0)
        self._starts: list[int] = []
        self._runs: list[tuple[int, int]] = []

    def store(self, offset: int, end: int, ranges: list[tuple[int, int]]) -> None:
        """Remember the data ``ranges`` diff_iterate found in ``[offset, end)``."""
        runs = [(e.offset, e.length) for e in map_from_ranges(ranges, offset, end) if not e.zero]
        with self._lock:
            self._window, self._runs, self._starts = (offset, end), runs, [start for start, _ in runs]

    def clear(self) -> None:
        """Forget everything (the device freed space)."""
        with self._lock:
            self._window, self._runs, self._starts = (0, 0), [], []

    def answer(self, offset: int, end: int) -> list[Extent] | None:
        """Extents from ``offset`` known without asking librbd, or None."""
        with self._lock:
            (start, stop), runs, starts = self._window, self._runs, self._starts
        if not start <= offset < stop:
            return None
        end = min(end, stop)
        first = max(bisect.bisect_right(starts, offset) - 1, 0)
        last = bisect.bisect_left(starts, end)
        if last - first > _CACHED_EXTENTS:
            last = first + _CACHED_EXTENTS
            end = starts[last]
        extents = map_from_ranges(runs[first:last], offset, end)
        if self._immutable:
            return extents
        return extents[:1] if not extents[0].zero else None


def _device_error(exc: BaseException, action: str) -> DeviceError:
    code = _errno(exc)
    return DeviceError(_OS_TO_NBD.get(code, Errno.EIO), f"{action}: {exc}")


class RbdDevice(Backend):
    """A backend over one RBD image or snapshot (open it with :func:`open_rbd` or ``open_image``)."""

    def __init__(
        self,
        spec: RbdSpec,
        *,
        readonly: bool = False,
        cache: CacheMode = CacheMode.WRITEBACK,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
    ) -> None:
        if spec.snapshot and not readonly:
            raise RbdError(f"rbd:{spec.path}: rbd snapshots are read-only (serve one with -r)")
        if queue_depth < 1:
            raise RbdError(f"queue depth {queue_depth} must be at least 1")
        self.spec = spec
        self.path = f"rbd:{spec.path}"  # no conf or options: they may hold a key
        self._cluster, self._ioctx = _connect(spec, cache)
        try:
            self._image = self._open_image(spec, readonly)
            stat = self._image.stat()
            self._size = int(stat["size"])
            self._part = int(stat["obj_size"])
            fast_map = self._image.features() & _lib("rbd").RBD_FEATURE_FAST_DIFF
        except BaseException:
            self._ioctx.close()
            self._cluster.shutdown()
            raise
        self._map_window = MAP_WINDOW if fast_map else MAP_WINDOW_SLOW
        self._map = _MapCache(immutable=spec.snapshot is not None)
        self._slots = threading.BoundedSemaphore(queue_depth)
        self._writethrough = cache is CacheMode.WRITETHROUGH
        self._closed = False
        self._capabilities = Capabilities(
            writable=not readonly,
            zero=Support.NATIVE,
            trim=Support.NATIVE,
            fua=Support.EMULATE,
            extents=Support.NATIVE,
            fast_zero=False,
            preferred_block=4096,
            # Under writeback a write returns once librbd holds it: one thread in order is as fast, and cheaper.
            serial_writes=cache is CacheMode.WRITEBACK,
        )

    def _open_image(self, spec: RbdSpec, readonly: bool) -> Any:
        """``rbd.Image`` of the spec; a missing snapshot is told apart from a missing image."""
        rbd = _lib("rbd")
        try:
            return rbd.Image(self._ioctx, spec.image, snapshot=spec.snapshot, read_only=readonly)
        except rbd.ImageNotFound as exc:
            if spec.snapshot and rbd_image_exists(self._ioctx, spec.image):
                raise RbdNotFound(f"snapshot {spec.snapshot!r} of rbd:{spec.at(None).path}: not found") from exc
            raise RbdNotFound(f"image rbd:{spec.at(None).path}: not found") from exc
        except rbd.Error as exc:
            raise _open_error(exc, f"cannot open rbd:{spec.path}", spec) from exc

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # -- data ------------------------------------------------------------------

    def _parts(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(start, length)`` pieces of a request, relative to ``offset``, cut at object boundaries."""
        parts, pos, end = [], offset, offset + length
        while pos < end:
            stop = min(end, (pos // self._part + 1) * self._part)
            parts.append((pos - offset, stop - pos))
            pos = stop
        return parts

    def _blocking(self, call: Callable[[], Any], action: str) -> Any:
        with self._slots:
            try:
                return call()
            except _lib("rbd").Error as exc:
                raise _device_error(exc, action) from exc

    def _run_parts(self, offset: int, length: int, submit: Callable[[int, int, _Batch], None], action: str) -> None:
        """Submit each part (holding a slot until it completes), wait for all, raise the first failure."""
        batch = _Batch()
        try:
            for start, size in self._parts(offset, length):
                self._slots.acquire()
                batch.add()
                try:
                    submit(start, size, batch)
                except BaseException:
                    self._slots.release()
                    batch.finish(0)
                    raise
        except _lib("rbd").Error as exc:
            raise _device_error(exc, action) from exc
        finally:
            batch.wait()  # never return while a part may still write into (or read from) the caller's buffer
        if batch.errno:
            raise _device_error(OSError(batch.errno, os_errno.errorcode.get(batch.errno, "error")), action)

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        length = len(buffer)
        action = f"read {length} bytes at {offset} of rbd:{self.spec.path}"
        if length <= self._part:
            data = self._blocking(lambda: self._image.read(offset, length), action)
            buffer[: len(data)] = data
            if len(data) < length:
                buffer[len(data) :] = bytes(length - len(data))
            return

        def submit(start: int, size: int, batch: _Batch) -> None:
            def done(completion: Any, data: bytes | None) -> None:
                self._slots.release()
                result = completion.get_return_value()
                if result >= 0 and data is not None:
                    buffer[start : start + len(data)] = data
                    if len(data) < size:
                        buffer[start + len(data) : start + size] = bytes(size - len(data))
                batch.finish(min(result, 0))

            self._image.aio_read(offset + start, size, done)

        self._run_parts(offset, length, submit, action)

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        view = memoryview(data)
        length = len(view)
        action = f"write {length} bytes at {offset} of rbd:{self.spec.path}"
        if length <= self._part:
            payload = data if isinstance(data, bytes) else view.tobytes()
            self._blocking(lambda: self._image.write(payload, offset), action)
        else:
            pieces: list[bytes] = []  # referenced until every part completed

            def submit(start: int, size: int, batch: _Batch) -> None:
                def done(completion: Any) -> None:
                    self._slots.release()
                    batch.finish(min(completion.get_return_value(), 0))

                pieces.append(view[start : start + size].tobytes())
                self._image.aio_write(pieces[-1], offset + start, done)

            self._run_parts(offset, length, submit, action)
        if self._writethrough:
            self.flush()

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        if fast:
            raise DeviceError(Errno.ENOTSUP, "RBD has no fast zero")
        flags = 0 if may_trim else _lib("rbd").RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        action = f"zero {length} bytes at {offset} of rbd:{self.spec.path}"
        self._map.clear()
        self._blocking(lambda: self._image.write_zeroes(offset, length, flags), action)
        if self._writethrough:
            self.flush()

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        self._map.clear()
        self._blocking(lambda: self._image.discard(offset, length), f"trim {length} bytes at {offset}")
        if self._writethrough:
            self.flush()

    def flush(self) -> None:
        self._blocking(self._image.flush, f"flush rbd:{self.spec.path}")

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        end = offset + min(length, self._map_window)
        cached = self._map.answer(offset, end)
        if cached is not None:
            return cached
        # Ask for a whole window (one object-map read either way) and keep it for the next queries.
        window = min(offset + self._map_window, self._size)
        found: list[tuple[int, int]] = []

        def seen(start: int, size: int, exists: bool) -> int:
            if exists:
                found.append((start, size))
            return 0

        self._blocking(
            lambda: self._image.diff_iterate(
                offset, window - offset, None, seen, include_parent=True, whole_object=True
            ),
            f"block status at {offset} of rbd:{self.spec.path}",
        )
        self._map.store(offset, window, found)
        return map_from_ranges(found, offset, end)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._image.close()
        except _lib("rbd").Error as exc:
            raise _device_error(exc, f"close rbd:{self.spec.path}") from exc
        finally:
            self._ioctx.close()
            self._cluster.shutdown()


def map_from_ranges(ranges: list[tuple[int, int]], offset: int, end: int) -> list[Extent]:
    """Extents covering ``[offset, end)``: the data ``ranges`` (clipped, merged) and holes between them."""
    out: list[Extent] = []
    pos = offset
    for start, size in sorted(ranges):
        start, stop = max(start, pos), min(start + size, end)
        if stop <= start:
            continue
        if start > pos:
            out.append(Extent(pos, start - pos, _HOLE))
        if out and out[-1].status == 0 and out[-1].end == start:
            out[-1] = Extent(out[-1].offset, stop - out[-1].offset, 0)
        else:
            out.append(Extent(start, stop - start, 0))
        pos = stop
    if pos < end:
        out.append(Extent(pos, end - pos, _HOLE))
    return out


def rbd_image_exists(ioctx: Any, name: str) -> bool:
    """An image of this name exists in the ``ioctx``'s pool and namespace."""
    rbd = _lib("rbd")
    try:
        with rbd.Image(ioctx, name, read_only=True):
            return True
    except rbd.ImageNotFound:
        return False


def open_rbd(
    spec: RbdSpec | str,
    *,
    readonly: bool = False,
    cache: CacheMode = CacheMode.WRITEBACK,
    queue_depth: int = DEFAULT_QUEUE_DEPTH,
) -> CheckedDevice:
    """Open an RBD image (or a snapshot, read-only) as a block device: the backend behind the checking adapter."""
    return CheckedDevice(RbdDevice(as_spec(spec), readonly=readonly, cache=cache, queue_depth=queue_depth))
