"""RBD images (Ceph block devices) behind the block-device contract, named as qemu names them.

* **Names.** :func:`parse_rbd_filename` reads qemu's ``rbd:`` filename,
  ``rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT][:KEY=VALUE...]`` (``\\`` escapes the
  next character, so ``\\:`` is a colon inside a value; ``conf`` is the
  ceph.conf, ``id`` the user without ``client.``, every other key a Ceph
  option such as ``keyring`` or ``mon_host``), exactly as qemu's rbd driver
  splits it, and its ``json:`` form (``{"driver": "rbd", "pool": ..., "image":
  ..., "snapshot", "namespace", "conf", "user", "server": [{"host", "port"}],
  "auth-client-required", "=keyvalue-pairs"}``, also as the ``file`` of a
  ``raw`` driver, and in qemu's flattened form with dotted keys such as
  ``file.server.0.host``); values are type-checked, a server needs its port
  and the servers become ``mon_host`` joined with ``;``, as in qemu. An empty
  ``id`` is refused (qemu would pass it on; it never names a user). A
  snapshot is always opened read-only; a writable open of one is refused, as
  qemu refuses it.
* **Connection.** :func:`connect` opens a ``rados.Rados`` and an ``Ioctx``
  (Debian's python3-rados and python3-rbd, imported on first use so nothing
  else pays for them): the ceph.conf named (else Ceph's default search, a
  missing one ignored, as qemu does), ``client_mount_timeout`` 30 s, then the
  options of the name. The Ioctx is marked *full-try*
  (``rados_set_pool_full_try``): a write to a full pool or cluster then fails
  with ``EDQUOT``/``ENOSPC`` (the client sees ``ENOSPC``) instead of waiting
  for space forever, which is librados' default.
* **Closing.** A read-only image, and every Ceph client, is closed :data:`CLOSE_GRACE` seconds after its
  user let go of it, by one thread (:class:`_Closer`; :func:`settle` waits for them, as the process's
  exit does): librbd 16 finishes an open, a refresh or a snapshot switch in a librados thread after it
  has answered its caller, and an image closed at once could be freed under that thread (the process
  aborts). A read-only image holds no lock and no watch, so nobody waits for it; a writable one is closed
  at once, releasing its exclusive lock and its watch for the next user.
* **Timeouts.** Every wait on the cluster ends: ``rados_osd_op_timeout`` and
  ``rados_mon_op_timeout`` are :data:`OP_TIMEOUT` (60 s) unless the name or
  the conf set them, and a timeout of 0 (Ceph's "never") is replaced by ours.
  A request to OSDs that do not answer fails with ``ETIMEDOUT`` (``EIO`` to an
  NBD client); the device waits for a read's aio parts and for its slots at
  most :data:`OPS_PER_CALL` op timeouts, and for a blocking call or a write
  as long as librbd takes to end it (its op timeouts).
* **Untrusted names.** A name that does not come from the operator (an API
  caller's) is parsed with ``as_spec(name, trusted=False)``: it may carry only
  ``conf``, ``id``, ``keyring`` and the options in :data:`UNTRUSTED_OPTIONS`.
  ``open_image``, ``open_source`` and ``open_target`` treat names so unless
  their caller says ``trusted=True`` (the command line does).
* **I/O.** One ``rbd.Image`` per device, shared by every caller thread
  (librbd is thread-safe and releases the GIL). A read up to one object
  (4 MiB by default) is one blocking call in the caller's thread; a larger
  one is split at object boundaries into ``aio_read`` parts that run
  concurrently. Every call and part holds one of ``queue_depth`` slots
  (default 32) while it runs, so the operations in flight on an image stay
  bounded however many threads call. Zeroing is librbd's ``write_zeroes``
  (with ``THICK_PROVISION`` unless trimming is allowed, so the range then
  stays allocated), TRIM is ``discard`` (librbd skips partial discards below
  ``rbd_discard_granularity_bytes``: TRIM is advisory), FLUSH is ``flush``,
  and FUA a flush after the operation. There is no fast zero (qemu's rbd
  driver offers none either).
* **Writes** are zero-copy: a write of any size is one ``aio_write`` of the
  caller's own ``bytes`` or ``bytearray`` (a server's request buffer; a view
  of a part of one is copied first, as python-rbd takes nothing else), with
  ``rbd_disable_zero_copy_writes=false`` (set over the conf's; a name may
  set it back, which only adds librbd's copy), and the caller's thread waits
  for it in librbd with the GIL released, as a blocking call does. librbd completes a zero-copy write only
  once it holds no reference to the buffer any more, so the caller may reuse
  the buffer as soon as the write returns, failed or not, and no copy of the
  data is made in this process (a blocking ``write`` would copy it into a
  ``bytes`` and again inside librbd). librbd splits the write at object
  boundaries itself; it holds one slot.
* **Request size.** The preferred block size advertised to NBD clients is
  the image's object size (at most 32 MiB): librbd and the OSD pay per
  operation, so clients that follow it (nbdcopy, libnbd) send one request
  per object instead of 16 of 256 KiB, and the server's per-request work
  shrinks with them. qemu-nbd advertises 4096 whatever the driver.
* **Block status** comes from ``diff_iterate`` from the image's creation
  (``include_parent``, so a clone shows its parent's data) with
  ``whole_object=True``, as qemu does: an object that exists is data as a
  whole, one that does not is a hole reading zeroes. With a valid object map
  (``fast-diff``, not flagged invalid) that is a map lookup; without it
  librbd lists objects, so one answer then covers less (:data:`MAP_WINDOW`
  vs :data:`MAP_WINDOW_SLOW`). librbd is asked for a whole window at a time
  and the answer is kept (:class:`_MapCache`): a server asks before every
  sparse read, and each question would read the object map from the cluster.
* **Cache.** librbd's cache is off (``rbd_cache=false``, set after the name's
  options, so no name turns it on) whatever the cache mode: a write returns
  once the OSDs have it, and its error (a full pool's ``ENOSPC``) goes to
  that write. With the cache on, Ceph 16 answers a write before the OSDs do
  (its write-around policy) and a failure it meets later reaches only a
  FLUSH that finds writes still in flight: a FLUSH after the failure could
  succeed and the data be lost. Its ``writethrough`` policy reports errors
  but keeps the failed data in its read cache. The device therefore takes
  writes from many threads at once (``serial_writes`` is False): each one
  waits for the OSDs.
* **Errors.** Opening fails with :class:`~sendense_nbd.errors.RbdSpecError`,
  :class:`~sendense_nbd.errors.RbdNotFound`,
  :class:`~sendense_nbd.errors.RbdPermissionDenied` or
  :class:`~sendense_nbd.errors.RbdError`; I/O failures are
  :class:`~sendense_nbd.errors.DeviceError` with the NBD errno (``EDQUOT``
  and ``ENOSPC`` as ``ENOSPC``, ``EACCES``/``EPERM``/``EROFS`` as ``EPERM``,
  the rest ``EIO`` or their own).
"""

from __future__ import annotations

import atexit
import bisect
import collections
import contextlib
import errno as os_errno
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from sendense_nbd.errors import DeviceError, RbdError, RbdNotFound, RbdPermissionDenied, RbdSpecError
from sendense_nbd.protocol.constants import MAX_PAYLOAD, AllocationFlag, Errno
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import Backend, Capabilities, Support
from sendense_nbd.storage.checked import CheckedDevice
from sendense_nbd.storage.modes import CacheMode

log = logging.getLogger(__name__)

#: Operations (blocking calls and aio parts) in flight on one image at most.
DEFAULT_QUEUE_DEPTH = 32
#: Seconds to reach the monitors unless the name sets ``client_mount_timeout``.
CONNECT_TIMEOUT = 30
#: Seconds one OSD or monitor operation may take (``rados_osd_op_timeout``, ``rados_mon_op_timeout``)
#: unless the name or the conf sets them: then it fails with ``ETIMEDOUT`` (``EIO`` to NBD clients).
OP_TIMEOUT = 60
#: A librbd call can chain a few OSD operations (the exclusive lock, the object map, the data): a
#: request, or a slot, is waited for at most this many :data:`OP_TIMEOUT` (the connection's) plus a second.
OPS_PER_CALL = 3
#: Ceph options (besides ``conf``, ``id`` and ``keyring``) a name that does not come from the operator
#: may carry: where the monitors are, how to authenticate, the timeouts (see :func:`as_spec`).
UNTRUSTED_OPTIONS = frozenset(
    {"mon_host", "auth_client_required", "client_mount_timeout", "rados_osd_op_timeout", "rados_mon_op_timeout"}
)
#: Seconds an image (and then its client) stays open after its user let go of it (see :class:`_Closer`).
CLOSE_GRACE = 1.0
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
        if key == "id" and not value:
            raise RbdSpecError("rbd: id= is empty (the Ceph user without 'client.', such as id=admin)")
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


def _merge(into: dict[str, Any], key: str, value: Any) -> None:
    """Put ``value`` at ``key`` of ``into``, merging objects; a key given twice is an error (as in qemu)."""
    if isinstance(value, dict) and isinstance(into.get(key), dict):
        for sub_key, sub_value in value.items():
            _merge(into[key], sub_key, sub_value)
    elif key in into:
        raise RbdSpecError(f"json: key {key!r} is given twice")
    else:
        into[key] = value


def _as_lists(value: Any) -> Any:
    """Objects whose keys are 0, 1, ... n-1 (qemu's flattened lists: ``server.0.host``) as lists."""
    if not isinstance(value, dict):
        return value
    value = {key: _as_lists(item) for key, item in value.items()}
    if value and all(key.isdigit() for key in value) and sorted(map(int, value)) == list(range(len(value))):
        return [value[str(i)] for i in range(len(value))]
    return value


def _unflatten(spec: dict[str, Any]) -> dict[str, Any]:
    """qemu's dotted keys (``{"file.driver": "rbd", "file.server.0.host": ...}``) as nested objects."""
    nested: dict[str, Any] = {}
    for key, value in spec.items():
        parts = key.split(".")
        for part in reversed(parts[1:]):
            value = {part: value}
        _merge(nested, parts[0], value)
    return {key: _as_lists(value) for key, value in nested.items()}


def _rbd_json_object(text: str) -> dict[str, Any] | None:
    """The rbd driver's object of a ``json:`` filename (top level, or a ``raw`` driver's ``file``), else None."""
    try:
        spec = json.loads(text[5:])
    except ValueError as exc:
        raise RbdSpecError(f"json: filename is not JSON ({exc})") from exc
    if not isinstance(spec, dict):
        return None
    spec = _unflatten(spec)
    if spec.get("driver") == "rbd":
        return spec
    file = spec.get("file")
    if spec.get("driver", "raw") == "raw" and isinstance(file, dict) and file.get("driver") == "rbd":
        if set(spec) - {"driver", "file"}:
            raise RbdSpecError(f"json: raw driver options {sorted(set(spec) - {'driver', 'file'})} are not supported")
        return dict(file)
    return None


def _json_string(obj: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    """``obj[key]``: a string, or None when absent and not ``required``."""
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise RbdSpecError(f"json: rbd needs a string {key!r}" + ("" if required else f", not {value!r}"))
    return value


def _json_servers(servers: Any) -> str:
    """qemu's ``mon_host`` of the ``server`` list: ``host:port`` (IPv6 bracketed) joined with ``;``."""
    if not isinstance(servers, list) or not servers:
        raise RbdSpecError('json: rbd "server" is a non-empty list of {"host", "port"}')
    hosts = []
    for server in servers:
        if not isinstance(server, dict) or set(server) != {"host", "port"}:
            raise RbdSpecError(f'json: rbd server {server!r} needs "host" and "port" (and nothing else)')
        host, port = server["host"], server["port"]
        if not isinstance(host, str) or not host or not isinstance(port, str | int) or isinstance(port, bool):
            raise RbdSpecError(f"json: rbd server {server!r}: host is a string, port a string or number")
        hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return ";".join(hosts)


def _json_pairs(pairs: Any) -> list[tuple[str, str]]:
    """qemu's ``=keyvalue-pairs``: a JSON array (or its text) of option names and values, alternating."""
    try:
        flat = json.loads(pairs) if isinstance(pairs, str) else pairs
    except ValueError as exc:
        raise RbdSpecError(f"json: rbd =keyvalue-pairs is not JSON ({exc})") from exc
    if not isinstance(flat, list) or len(flat) % 2 or not all(isinstance(item, str) for item in flat):
        raise RbdSpecError("json: rbd =keyvalue-pairs is a list of strings: option, value, option, value...")
    return list(zip(flat[::2], flat[1::2], strict=True))


def _json_options(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """Ceph options from the json: keys qemu turns into options (``server``, ``auth-client-required``, pairs)."""
    options: list[tuple[str, str]] = []
    if obj.get("server") is not None:
        options.append(("mon_host", _json_servers(obj["server"])))
    auth = obj.get("auth-client-required")
    if auth is not None:
        if not isinstance(auth, list) or not all(isinstance(a, str) for a in auth):
            raise RbdSpecError('json: rbd "auth-client-required" is a list of strings (cephx, none)')
        options.append(("auth_client_required", ";".join(auth)))
    if obj.get("=keyvalue-pairs") is not None:
        options.extend(_json_pairs(obj["=keyvalue-pairs"]))
    return options


def _parse_rbd_json(text: str, obj: dict[str, Any]) -> RbdSpec:
    unknown = set(obj) - _JSON_KEYS
    if unknown:
        raise RbdSpecError(f"json: rbd options {sorted(unknown)} are not supported (key-secret, encrypt, ...)")
    pool, image = _json_string(obj, "pool", required=True), _json_string(obj, "image", required=True)
    assert pool is not None and image is not None
    user = _json_string(obj, "user")
    if user == "":
        raise RbdSpecError('json: rbd "user" is empty (the Ceph user without "client.", such as "admin")')
    options = _json_options(obj)
    keyring = dict(options).get("keyring")
    return _checked(
        RbdSpec(
            pool=pool,
            image=image,
            snapshot=_json_string(obj, "snapshot"),
            namespace=_json_string(obj, "namespace") or None,
            conf=_json_string(obj, "conf"),
            user=user,
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


def _option_name(key: str) -> str:
    """A Ceph option's name as Ceph compares it (``mon host``, ``mon-host`` and ``mon_host`` are one)."""
    return key.replace(" ", "_").replace("-", "_")


def as_spec(name: str | RbdSpec, *, trusted: bool = True) -> RbdSpec:
    """``name`` parsed, or itself when it is a spec already.

    ``trusted=False`` is for names that do not come from the operator (an API caller's): their Ceph
    options must be in :data:`UNTRUSTED_OPTIONS` (any other option, such as ``admin_socket``, would let
    the caller act on this host's files as this process), else :class:`RbdSpecError`.
    """
    spec = name if isinstance(name, RbdSpec) else parse_rbd_filename(name)
    if not trusted:
        refused = sorted({key for key, _ in spec.options if _option_name(key) not in UNTRUSTED_OPTIONS})
        if refused:
            raise RbdSpecError(
                f"rbd:{spec.path}: Ceph options {refused} are not accepted here "
                f"(allowed: conf, id, keyring, {', '.join(sorted(UNTRUSTED_OPTIONS))})"
            )
    return spec


# -- connections ---------------------------------------------------------------


def _errno(exc: BaseException) -> int:
    return abs(int(getattr(exc, "errno", 0) or 0))


def _open_error(exc: BaseException, what: str, spec: RbdSpec, *, connecting: bool = False) -> RbdError:
    """The typed error of a failed open step: not found, permission, or the rest."""
    code = _errno(exc)
    if code == os_errno.ENOENT:
        return RbdNotFound(f"{what}: not found")
    if code in (os_errno.EACCES, os_errno.EPERM):
        user = f"client.{spec.user or 'admin'}"
        if connecting:
            return RbdPermissionDenied(f"{what}: the monitors refused {user}'s key (check id= and keyring=)")
        namespace = f" namespace={spec.namespace}" if spec.namespace else ""
        return RbdPermissionDenied(
            f"{what}: permission denied for {user} "
            f"(a device needs the caps `mon 'profile rbd' osd 'profile rbd pool={spec.pool}{namespace}'`)"
        )
    return RbdError(f"{what}: {exc}")


def _conf_set(cluster: Any, spec: RbdSpec, key: str, value: str) -> None:
    try:
        cluster.conf_set(key, value)
    except _lib("rados").Error as exc:
        raise RbdSpecError(f"Ceph option {key}={value!r} of rbd:{spec.path} is not accepted: {exc}") from exc


def _configure(cluster: Any, spec: RbdSpec) -> None:
    """Read the conf; set our defaults, then the name's options, then what the device depends on."""
    rados = _lib("rados")
    try:
        if spec.conf:
            cluster.conf_read_file(spec.conf)
        else:
            with contextlib.suppress(rados.Error):  # Ceph's default search; none found is fine (qemu's way)
                cluster.conf_read_file()
    except rados.Error as exc:
        raise RbdError(f"cannot read the Ceph configuration {spec.conf}: {exc}") from exc
    settings = [("client_mount_timeout", str(CONNECT_TIMEOUT)), ("rbd_disable_zero_copy_writes", "false")]
    if spec.keyring is not None:
        settings.append(("keyring", spec.keyring))
    for key, value in [*settings, *spec.options]:
        _conf_set(cluster, spec, key, value)
    # Every wait on the cluster ends: 0 (Ceph's default for the op timeouts) would mean never.
    timeouts = {
        "client_mount_timeout": CONNECT_TIMEOUT,
        "rados_osd_op_timeout": OP_TIMEOUT,
        "rados_mon_op_timeout": OP_TIMEOUT,
    }
    for key, default in timeouts.items():
        if _conf_seconds(cluster, key) <= 0:
            _conf_set(cluster, spec, key, str(default))
    # Last, so that no name or conf turns it back on: librbd's cache may answer a write before the OSDs
    # do and lose its error (see "Cache" above).
    _conf_set(cluster, spec, "rbd_cache", "false")


def _conf_seconds(cluster: Any, key: str) -> float:
    """A duration option of the configured cluster, in seconds."""
    return float(cluster.conf_get(key) or 0)


def _open_ioctx(cluster: Any, spec: RbdSpec) -> Any:
    """The pool's ``Ioctx`` (full-try, in the namespace), or a typed error."""
    rados, rbd = _lib("rados"), _lib("rbd")
    try:
        ioctx = cluster.open_ioctx(spec.pool)
    except rados.Error as exc:
        raise _open_error(exc, f"pool {spec.pool!r}", spec) from exc
    try:
        ioctx.set_osdmap_full_try()  # a full pool fails writes (EDQUOT/ENOSPC) instead of blocking them
        if spec.namespace:
            try:
                found = rbd.RBD().namespace_exists(ioctx, spec.namespace)
            except (rados.Error, rbd.Error) as exc:
                raise _open_error(exc, f"namespace {spec.namespace!r} of pool {spec.pool!r}", spec) from exc
            if not found:
                raise RbdNotFound(f"namespace {spec.namespace!r} of pool {spec.pool!r}: not found")
            ioctx.set_namespace(spec.namespace)
    except BaseException:
        ioctx.close()
        raise
    return ioctx


class _Closer:
    """Closes images, and the Ceph clients they were opened on, :data:`CLOSE_GRACE` seconds after their users
    let go of them, in order, in a thread of its own.

    librbd 16 completes an open, a refresh or a snapshot switch to its caller first and takes the image's
    state lock again afterwards, in a librados thread. An image closed (and freed) by its caller in between
    makes that thread lock freed memory: an abort (``std::system_error``: Invalid argument) or a corrupt
    heap, seen in hubs that open snapshots for a moment several times a second on a loaded machine. A close
    that comes later leaves that thread the time to finish.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._queue: collections.deque[tuple[float, str, Callable[[], None]]] = collections.deque()
        self._thread: threading.Thread | None = None

    def later(self, name: str, close: Callable[[], None]) -> None:
        """Run ``close`` (of the image or client ``name``) :data:`CLOSE_GRACE` seconds from now."""
        with self._lock:
            self._queue.append((time.monotonic() + CLOSE_GRACE, name, close))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rbd-closer", daemon=True)
                self._thread.start()
                atexit.register(self.settle, CLOSE_GRACE + OP_TIMEOUT)
            self._lock.notify_all()

    def settle(self, timeout: float | None = None) -> bool:
        """Until everything let go of so far is closed (:data:`CLOSE_GRACE` seconds, unless a close hangs in
        librados), or ``timeout`` seconds passed (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._queue, timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._queue))
                due, name, close = self._queue[0]
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - the data was flushed before; the next ones still close
                log.warning("closing %s failed: %s", name, exc)
            with self._lock:
                self._queue.popleft()
                self._lock.notify_all()


_CLOSER = _Closer()


def close_image(image: Any, name: str, *, read_only: bool) -> None:
    """Close ``image`` (``rbd.Image`` of the image ``name``): a read-only one once librbd is surely done
    with it (:class:`_Closer`: it holds no lock and no watch, so nobody waits for it); a writable one now,
    releasing its exclusive lock and its watch for the next user."""
    if read_only:
        _CLOSER.later(name, image.close)
    else:
        image.close()


def release_client(cluster: Any, ioctx: Any) -> None:
    """Close the Ioctx and shut the client down after the images let go of before (see :class:`_Closer`)."""

    def close() -> None:
        ioctx.close()
        _shutdown(cluster)

    _CLOSER.later("a Ceph client", close)


def settle(timeout: float | None = None) -> bool:
    """Until every image and client this process let go of is closed (:data:`CLOSE_GRACE` seconds, unless a
    close hangs in librados), or ``timeout`` seconds passed (False)."""
    return _CLOSER.settle(timeout)


@contextlib.contextmanager
def opened_image(ioctx: Any, name: str, *, snapshot: str | None = None, read_only: bool = False) -> Iterator[Any]:
    """``rbd.Image`` of ``name`` on ``ioctx`` (read-only at ``snapshot``), closed by :func:`close_image`."""
    read_only = read_only or snapshot is not None
    image = _lib("rbd").Image(ioctx, name, snapshot=snapshot, read_only=read_only)
    try:
        yield image
    finally:
        close_image(image, name, read_only=read_only)


#: Held while a Ceph client is made, configured and connected, and while one shuts down: librados (Ceph 16)
#: does neither safely in several threads of a process at once (seen in a hub making clients in threads: the
#: config schema's check aborts, "Schema is missing legacy field"; an op submitted after its Objecter shut down).
_CLIENTS = threading.Lock()


def _shutdown(cluster: Any) -> None:
    """Shut a Ceph client down (one at a time in the process, see :data:`_CLIENTS`)."""
    with _CLIENTS:
        cluster.shutdown()


def _connect(spec: RbdSpec) -> tuple[Any, Any]:
    """A connected, configured ``rados.Rados`` and the spec's ``Ioctx``; nothing is left open on failure."""
    rados = _lib("rados")
    with _CLIENTS:
        try:
            cluster = rados.Rados(rados_id=spec.user or None)
        except rados.Error as exc:
            raise RbdError(f"cannot make a Ceph client for client.{spec.user or 'admin'}: {exc}") from exc
    try:
        with _CLIENTS:
            _configure(cluster, spec)
        try:
            with _CLIENTS:
                cluster.connect()
        except rados.Error as exc:
            where = f"conf {spec.conf}" if spec.conf else "Ceph's default conf"
            user = f"client.{spec.user or 'admin'}"
            raise _open_error(
                exc, f"cannot connect to the Ceph cluster ({where}, {user})", spec, connecting=True
            ) from exc
        return cluster, _open_ioctx(cluster, spec)
    except BaseException:
        _shutdown(cluster)
        raise


@contextlib.contextmanager
def connect(spec: RbdSpec | str, *, cache: CacheMode = CacheMode.WRITEBACK) -> Iterator[tuple[Any, Any]]:
    """``(rados.Rados, rados.Ioctx)`` of the spec's cluster and pool (namespace set, full-try), closed on exit.

    ``cache`` is accepted for the block-device options and changes nothing: librbd's cache stays off.
    """
    cluster, ioctx = _connect(as_spec(spec))
    try:
        yield cluster, ioctx
    finally:
        release_client(cluster, ioctx)


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
            with opened_image(ioctx, spec.image, snapshot=spec.snapshot, read_only=True):
                return True
        except rbd.ImageNotFound:
            return False
        except rbd.Error as exc:
            raise _open_error(exc, f"rbd:{spec.path}", spec) from exc


# -- the device ----------------------------------------------------------------


class _Batch:
    """The aio parts of one request: counts them in and out, keeps the first error.

    A caller that stops waiting (:meth:`wait` timed out) *abandons* the batch: a part that
    completes later must not touch the caller's buffer any more (:meth:`deliver`).
    """

    def __init__(self) -> None:
        self._pending = 0
        self._done = threading.Condition()
        self._abandoned = False
        self.errno = 0

    def add(self) -> None:
        with self._done:
            self._pending += 1

    def deliver(self, copy: Callable[[], None]) -> None:
        """Run ``copy`` (a part's data into the caller's buffer) unless the caller gave up on the batch."""
        with self._done:
            if not self._abandoned:
                copy()

    def finish(self, result: int) -> None:
        with self._done:
            if result < 0 and not self.errno:
                self.errno = -result
            self._pending -= 1
            if not self._pending:
                self._done.notify_all()

    def wait(self, timeout: float) -> bool:
        """Until every part finished (True), or ``timeout`` seconds passed (False: the batch is abandoned)."""
        with self._done:
            if self._done.wait_for(lambda: not self._pending, timeout):
                return True
            self._abandoned = True
            return False


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
    """A backend over one RBD image or snapshot (open it with :func:`open_rbd` or ``open_image``).

    ``cache`` is accepted like every backend's and changes nothing: librbd's cache stays off (see the
    module's "Cache"), so every mode writes through to the OSDs.
    """

    def __init__(
        self,
        spec: RbdSpec,
        *,
        readonly: bool = False,
        cache: CacheMode = CacheMode.WRITEBACK,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
    ) -> None:
        if spec.snapshot and not readonly:
            raise RbdError(f"rbd:{spec.path}: rbd snapshots are read-only; open one read-only (serve -r)")
        if queue_depth < 1:
            raise RbdError(f"queue depth {queue_depth} must be at least 1")
        self.spec = spec
        self.path = f"rbd:{spec.path}"  # no conf or options: they may hold a key
        self._cluster, self._ioctx = _connect(spec)
        try:
            self._image = self._open_image(spec, readonly)
            try:
                self._size, self._part, self._map_window = self._geometry()
            except BaseException:
                with contextlib.suppress(_lib("rbd").Error):
                    close_image(self._image, spec.image, read_only=readonly)
                raise
        except BaseException:
            release_client(self._cluster, self._ioctx)
            raise
        #: Seconds a request waits for its parts, or for a slot, at most (librbd times out its own calls).
        self._wait = OPS_PER_CALL * _conf_seconds(self._cluster, "rados_osd_op_timeout") + 1
        self._map = _MapCache(immutable=spec.snapshot is not None)
        self._slots = threading.BoundedSemaphore(queue_depth)
        self._lock = threading.Lock()
        #: The first change since the last FLUSH that failed in a way that may have lost data.
        self._unflushed: DeviceError | None = None
        self._closed = False
        self._capabilities = Capabilities(
            writable=not readonly,
            zero=Support.NATIVE,
            trim=Support.NATIVE,
            fua=Support.EMULATE,
            extents=Support.NATIVE,
            fast_zero=False,
            preferred_block=max(4096, min(self._part, MAX_PAYLOAD)),  # see "Request size" above
            serial_writes=False,  # each write waits for the OSDs: concurrency comes from the caller's threads
        )

    def _open_image(self, spec: RbdSpec, readonly: bool) -> Any:
        """``rbd.Image`` of the spec; a missing snapshot is told apart from a missing image."""
        rbd = _lib("rbd")
        try:
            return rbd.Image(self._ioctx, spec.image, snapshot=spec.snapshot, read_only=readonly)
        except rbd.ImageNotFound as exc:
            try:
                image_exists = bool(spec.snapshot) and rbd_image_exists(self._ioctx, spec.image)
            except rbd.Error as again:
                raise _open_error(again, f"cannot open rbd:{spec.at(None).path}", spec) from exc
            if image_exists:
                raise RbdNotFound(f"snapshot {spec.snapshot!r} of rbd:{spec.at(None).path}: not found") from exc
            raise RbdNotFound(f"image rbd:{spec.at(None).path}: not found") from exc
        except rbd.Error as exc:
            raise _open_error(exc, f"cannot open rbd:{spec.path}", spec) from exc

    def _geometry(self) -> tuple[int, int, int]:
        """Size, object size, and the block-status window (smaller when the object map cannot be used)."""
        rbd = _lib("rbd")
        try:
            stat = self._image.stat()
            fast_map = self._image.features() & rbd.RBD_FEATURE_FAST_DIFF
            map_valid = not self._image.flags() & rbd.RBD_FLAG_FAST_DIFF_INVALID  # else librbd lists objects
        except rbd.Error as exc:
            raise _open_error(exc, f"cannot open rbd:{self.spec.path}", self.spec) from exc
        return int(stat["size"]), int(stat["obj_size"]), MAP_WINDOW if fast_map and map_valid else MAP_WINDOW_SLOW

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

    def _acquire(self, action: str) -> None:
        """One of the ``queue_depth`` slots, or EIO once the operations holding them outlived their timeouts."""
        if not self._slots.acquire(timeout=self._wait):
            raise DeviceError(Errno.EIO, f"{action}: no librbd slot came free in {self._wait:g} s")

    def _blocking(self, call: Callable[[], Any], action: str) -> Any:
        self._acquire(action)
        try:
            return call()
        except _lib("rbd").Error as exc:
            raise _device_error(exc, action) from exc
        finally:
            self._slots.release()

    def _run_parts(self, offset: int, length: int, submit: Callable[[int, int, _Batch], None], action: str) -> None:
        """Submit each part (holding a slot until it completes), wait for all, raise the first failure."""
        batch = _Batch()
        try:
            for start, size in self._parts(offset, length):
                self._acquire(action)
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
            completed = batch.wait(self._wait)  # the parts read into the caller's buffer
        if not completed:
            raise DeviceError(Errno.EIO, f"{action}: librbd did not complete it in {self._wait:g} s")
        if batch.errno:
            raise _device_error(OSError(batch.errno, os_errno.errorcode.get(batch.errno, "error")), action)

    def _finish_part(self, batch: _Batch, completion: Any, deliver: Callable[[], None] | None = None) -> None:
        """An aio part's callback: ``deliver`` its data on success; always frees its slot and finishes it (an
        exception escaping a callback is kept by python-rbd, and the request would wait for it forever)."""
        result = -os_errno.EIO
        try:
            result = min(int(completion.get_return_value()), 0)
            if result == 0 and deliver is not None:
                batch.deliver(deliver)
        except BaseException:
            result = -os_errno.EIO
        finally:
            self._slots.release()
            batch.finish(result)

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        length = len(buffer)
        action = f"read {length} bytes at {offset} of rbd:{self.spec.path}"
        if length <= self._part:
            data = self._blocking(lambda: self._image.read(offset, length), action)
            _copy_into(buffer, data)
            return

        def submit(start: int, size: int, batch: _Batch) -> None:
            def done(completion: Any, data: bytes | None) -> None:
                deliver = None if data is None else lambda: _copy_into(buffer[start : start + size], data)
                self._finish_part(batch, completion, deliver)

            self._image.aio_read(offset + start, size, done)

        self._run_parts(offset, length, submit, action)

    def _change(self, run: Callable[[], Any]) -> None:
        """Run a write or zero; a failure that may have lost data (ENOSPC, EIO) is told to that request and
        again to the next FLUSH, as fsync reports a failed write-back: a client that pipelines its writes
        and checks the FLUSH still learns that not everything is stored."""
        try:
            run()
        except DeviceError as exc:
            if exc.errno in (Errno.ENOSPC, Errno.EIO):
                with self._lock:
                    self._unflushed = self._unflushed or exc
            raise

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        payload = _whole(data)
        action = f"write {len(payload)} bytes at {offset} of rbd:{self.spec.path}"
        self._change(lambda: self._blocking(lambda: self._write_through(payload, offset, action), action))

    def _write_through(self, payload: bytes | bytearray, offset: int, action: str) -> None:
        """One librbd write of the caller's own buffer, waited for in librbd (the GIL released).

        librbd writes straight from the buffer (zero-copy, see "Writes" above) and completes only once
        it holds no reference to it, so the buffer may be reused as soon as this returns; the wait has
        no timeout of its own, as a blocking call's has none (librbd's op timeouts end it)."""
        completion = self._image.aio_write(payload, offset, id)  # id: a builtin no-op for the required callback
        completion.wait_for_complete_and_cb()
        result = int(completion.get_return_value())
        if result < 0:
            raise _device_error(OSError(-result, os_errno.errorcode.get(-result, "error")), action)

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        if fast:
            raise DeviceError(Errno.ENOTSUP, "RBD has no fast zero")
        flags = 0 if may_trim else _lib("rbd").RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        action = f"zero {length} bytes at {offset} of rbd:{self.spec.path}"
        self._map.clear()
        self._change(lambda: self._blocking(lambda: self._image.write_zeroes(offset, length, flags), action))

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        self._map.clear()
        action = f"trim {length} bytes at {offset} of rbd:{self.spec.path}"
        self._blocking(lambda: self._image.discard(offset, length), action)

    def flush(self) -> None:
        action = f"flush rbd:{self.spec.path}"
        with self._lock:
            failed, self._unflushed = self._unflushed, None
        self._blocking(self._image.flush, action)
        if failed is not None:
            raise DeviceError(failed.errno, f"{action}: a write since the last flush failed ({failed})")

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
        """Flush (a writable image: the cluster must still take our writes) and close the image (a read-only
        one and the client later: :func:`close_image`); the first failure."""
        if self._closed:
            return
        self._closed = True
        writable = self._capabilities.writable
        try:
            if writable:
                self._blocking(self._image.flush, f"close rbd:{self.spec.path}: the final flush")
        finally:
            try:
                close_image(self._image, self.spec.image, read_only=not writable)
            except _lib("rbd").Error as exc:
                raise _device_error(exc, f"close rbd:{self.spec.path}") from exc
            finally:
                release_client(self._cluster, self._ioctx)


def _whole(data: bytes | bytearray | memoryview) -> bytes | bytearray:
    """``data`` as python-rbd takes it (``bytes`` or ``bytearray``): itself, or the object a view spans
    entirely; else a copy."""
    if isinstance(data, bytes | bytearray):
        return data
    owner = data.obj
    if isinstance(owner, bytes | bytearray) and data.contiguous and data.nbytes == len(owner):
        return owner
    return data.tobytes()


def _copy_into(buffer: memoryview, data: bytes) -> None:
    """``data`` at the start of ``buffer``, zeroes after it (librbd reads short at the end of an image)."""
    buffer[: len(data)] = data
    if len(data) < len(buffer):
        buffer[len(data) :] = bytes(len(buffer) - len(data))


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
    try:
        with opened_image(ioctx, name, read_only=True):
            return True
    except _lib("rbd").ImageNotFound:
        return False


def open_rbd(
    spec: RbdSpec | str,
    *,
    readonly: bool = False,
    cache: CacheMode = CacheMode.WRITEBACK,
    queue_depth: int = DEFAULT_QUEUE_DEPTH,
) -> CheckedDevice:
    """Open an RBD image (or a snapshot, read-only) as a block device: the backend behind the checking adapter.

    A name given as text is taken as the operator's (any Ceph option): parse an API caller's with
    ``as_spec(name, trusted=False)`` first. ``cache`` changes nothing (librbd's cache stays off)."""
    return CheckedDevice(RbdDevice(as_spec(spec), readonly=readonly, cache=cache, queue_depth=queue_depth))
