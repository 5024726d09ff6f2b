"""The RBD store: the repository's points as snapshots of one Ceph RBD image per VM disk.

``--repo rbd://POOL[/NAMESPACE]?conf=CEPH.CONF&id=USER[&keyring=FILE][&prefix=NAME]``
(:func:`parse_location`). Each disk of a VM is one image, ``PREFIX.<vm-slug>.<disk-key>``
(prefix ``sendense``). A backup job writes the image's head through the hub's export: a
full writes all of it (zeroes included, or into a fresh image), an incremental only the
changed areas (zeroes included). Completing the job takes a snapshot named after the point's
ID: that snapshot is the restore point (``path`` ``rbd:POOL/IMAGE@POINT-ID``). Snapshots are
whole views, so retention removes a snapshot and merges nothing
(:attr:`RbdStore.independent`).

No partial state survives a failed or interrupted job: the image's metadata key
``sendense.clean`` names the snapshot the head equals, set when a snapshot is taken or the
head rolled back, removed before a job writes. A job's point is created on a head rolled
back to its base's snapshot unless the key says it already is; a discarded point (a failed,
cancelled or timed-out job, or a pending point a restarted hub finds) loses its snapshot if
one was taken and the head is rolled back to the disk's newest completed point (an image
without any snapshot is removed). Digest sidecars are files under the hub's directory
(``ROOT/digests/<image>/<point-id>.digests``), shared with a cluster's other hubs as RADOS
objects (:mod:`~sendense_nbd.hub.repository.shared_digests`). Space is the pool's, as ``ceph df`` and the
pool's quota tell it; a full pool or cluster fails writes with ``ENOSPC`` (the device sets
full-try), which fails the job with ``insufficient_space``.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qsl, quote, urlencode

import attrs

from sendense_nbd.errors import Conflict, RbdError, RepositoryClaimed, RepositoryError
from sendense_nbd.hub.openers import RbdOpener
from sendense_nbd.hub.repository import shared_digests
from sendense_nbd.hub.repository.points import Point, PointStatus, vm_slug
from sendense_nbd.hub.repository.store import Space
from sendense_nbd.storage.files import remove_quietly, temporary_name
from sendense_nbd.storage.modes import CacheMode
from sendense_nbd.storage.rbd import RbdSpec, connect, opened_image

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

#: The image metadata key naming the snapshot the head equals (absent: the head may hold a job's writes).
CLEAN = "sendense.clean"
#: The image metadata key naming the repository (its UUID) an image belongs to; only such images are ours.
TAG = "sendense.repository"
#: The metadata key a clone carries until it is flattened (the point it was made from): a clone the hub was
#: killed making is removed at the next start.
CLONE_OF = "sendense.clone-of"
#: The RADOS object ``PREFIX.repository`` holds the repository's UUID (written at its first start).
IDENTITY = "repository"
#: The RADOS objects ``PREFIX.digests.<point-id>[.N]`` hold a point's digest sidecar for every hub of a cluster.
DIGESTS = "digests"
#: What a point ID looks like (``hub.repository.core``): only such snapshots are ours to remove.
POINT_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
_QUERY_KEYS = frozenset({"conf", "id", "keyring", "prefix", "adopt"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
#: A prefix has no '.': images are ``PREFIX.<vm>.<disk>``, so prefix ``a`` would match prefix ``a.b``'s images.
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
#: A repository claimed less than this many seconds ago by another state directory is a new cluster's: its
#: hubs started at once, and the claim's winner is about to record it in the cluster (RepositoryClaimed).
CLAIM_FRESH = 30
#: Seconds :meth:`RbdStore.close` waits for the calls using its connection to end.
CLOSE_WAIT = 30
#: Seconds a mon command may take before the store gives up (the cluster's mons are unreachable or stuck).
MON_TIMEOUT = 30


def _rbd() -> Any:
    """Debian's ``rbd`` module (imported on first use, as the device does)."""
    try:
        return importlib.import_module("rbd")
    except ImportError as exc:
        raise RepositoryError(f"an RBD repository needs Debian's python3-rbd (run ./setup.sh): {exc}") from exc


@attrs.frozen
class RbdLocation:
    """Where an RBD repository is: the pool (and namespace), how to reach its cluster, the images' prefix."""

    pool: str
    namespace: str | None = None
    conf: str | None = None
    user: str | None = None
    keyring: str | None = None
    prefix: str = "sendense"
    #: ``adopt=yes``: a new state directory takes over the existing repository of this prefix (never written
    #: back into :attr:`url`: only the start that asks for it adopts).
    adopt: bool = attrs.field(default=False, eq=False)

    @property
    def url(self) -> str:
        """``rbd://POOL[/NAMESPACE]?conf=..&id=..&keyring=..&prefix=..``: what :func:`parse_location` reads back
        (paths and the user's name, no secrets)."""
        where = self.pool + (f"/{self.namespace}" if self.namespace else "")
        pairs = (("conf", self.conf), ("id", self.user), ("keyring", self.keyring))
        query = [(key, value) for key, value in pairs if value is not None]
        query += [("prefix", self.prefix)] if self.prefix != "sendense" else []
        return f"rbd://{where}" + ("?" + urlencode(query, safe="/", quote_via=quote) if query else "")

    def spec(self, image: str, snapshot: str | None = None) -> RbdSpec:
        """The device spec of one of the repository's images (or snapshots)."""
        return RbdSpec(self.pool, image, snapshot, self.namespace, self.conf, self.user, self.keyring)


def is_rbd_location(text: str) -> bool:
    """Whether ``--repo`` names an RBD repository (``rbd://``) rather than a directory."""
    return text.startswith("rbd://")


def parse_location(text: str) -> RbdLocation:
    """``rbd://POOL[/NAMESPACE]?conf=PATH&id=USER&keyring=PATH&prefix=NAME``; :class:`RepositoryError` says
    what is wrong (an unknown key, a second value, a name Ceph cannot have)."""
    if not is_rbd_location(text):
        raise RepositoryError(f"{text!r} is not an rbd:// repository")
    where, _, query = text.removeprefix("rbd://").partition("?")
    pool, _, namespace = where.partition("/")
    try:
        # '+' stays a '+' (a path may hold one): only %XX escapes are decoded, as url's quote writes them
        pairs = parse_qsl(query.replace("+", "%2B"), keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise RepositoryError(f"{text}: the query is not key=value&...: {exc}") from None
    values: dict[str, str] = {}
    for key, value in pairs:
        if key not in _QUERY_KEYS:
            raise RepositoryError(f"{text}: unknown key {key!r} (known: {', '.join(sorted(_QUERY_KEYS))})")
        if key in values or not value:
            raise RepositoryError(f"{text}: give {key} once, with a value")
        if key == "adopt" and value != "yes":
            raise RepositoryError(f"{text}: adopt takes 'yes' (a new state directory takes the repository over)")
        values[key] = value
    names: list[tuple[str, str | None]] = [("pool", pool), ("namespace", namespace or None)]
    for label, name in [*names, ("prefix", values.get("prefix"))]:
        if name is not None and not _NAME.fullmatch(name):
            raise RepositoryError(f"{text}: {label} {name!r} must be letters, digits, '.', '_', '-' (at most 100)")
    if "prefix" in values and not _PREFIX.fullmatch(values["prefix"]):
        raise RepositoryError(f"{text}: prefix {values['prefix']!r} must be letters, digits, '_', '-' (no '.')")
    return RbdLocation(
        pool, namespace or None, values.get("conf"), values.get("id"), values.get("keyring"),
        values.get("prefix", "sendense"), "adopt" in values,
    )  # fmt: skip


def _failure(exc: BaseException, what: str) -> RepositoryError:
    """A sentence for a failed Ceph call; a full pool or cluster (``EDQUOT``/``ENOSPC``) is told so and
    stands for an ``OSError(ENOSPC)``, so the job fails ``insufficient_space``."""
    code = abs(int(getattr(exc, "errno", 0) or 0))
    if code in (errno.ENOSPC, errno.EDQUOT):
        error = RepositoryError(f"{what}: the Ceph pool is full (its quota or the cluster's full ratio): {exc}")
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        full.__cause__ = exc
        error.__cause__ = full
        return error
    if code == errno.ETIMEDOUT:
        return RepositoryError(f"{what}: the Ceph cluster did not answer in time (are its OSDs and mons up?): {exc}")
    return RepositoryError(f"{what}: {exc}")


def _raise(exc: BaseException, what: str) -> NoReturn:
    """Raise :func:`_failure`'s error for ``exc``, keeping the ``OSError(ENOSPC)`` it stands for as its cause
    (``raise ... from exc`` would replace it, and the job would not fail ``insufficient_space``)."""
    error = _failure(exc, what)
    raise error from (error.__cause__ or exc)


@attrs.define
class _Known:
    """The points' IDs and images as last read (:meth:`refresh`) through ``read``."""

    read: Callable[[], Sequence[tuple[str, str]]]
    ids: set[str] = attrs.field(factory=set)
    images: set[str] = attrs.field(factory=set)

    def refresh(self) -> _Known:
        """Read the points again."""
        points = self.read()
        self.ids = {point_id for _, point_id in points}
        self.images = {path.removeprefix("rbd:").partition("@")[0].rpartition("/")[2] for path, _ in points}
        return self


@contextlib.contextmanager
def _sharing(what: str) -> Iterator[None]:
    """Errors of a shared sidecar's objects as :class:`RepositoryError` saying ``what`` failed."""
    try:
        yield
    except importlib.import_module("rados").Error as exc:
        _raise(exc, what)
    except RepositoryError as exc:
        raise RepositoryError(f"{what}: {exc}") from exc


class RbdStore:
    """Points as snapshots of one RBD image per VM disk (see the module); ``root``: the hub's directory."""

    independent = True

    def __init__(
        self, location: RbdLocation, root: str, *, identity: str | None = None, fresh: bool = False,
        record: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.where = location
        self.location = location.url
        self.root = os.path.abspath(root)
        #: The repository's UUID (``store.json``; None until :meth:`reclaim` claims the pool's prefix).
        self.identity = identity
        #: The state directory is new (no UUID recorded, no database): it may not take existing images.
        self._fresh = fresh
        #: Records the UUID in the state directory (``stores._record``).
        self._record = record
        self._client_lock = threading.Condition()
        #: Calls using the connection now.
        self._users = 0
        #: The store's one control connection (opened on first use): its exit stack, Rados and Ioctx.
        self._client: tuple[contextlib.ExitStack[Any], Any, Any] | None = None
        #: Connections found lost, closed with the store (another thread may still be using one).
        self._retired: list[contextlib.ExitStack[Any]] = []
        #: This start adopted an existing repository (``adopt=yes``): the sweep leaves everything alone.
        self.adopted = False

    # -- names -----------------------------------------------------------------

    def image_name(self, vm_path: str, disk_key: int) -> str:
        """The image of one VM disk."""
        return f"{self.where.prefix}.{vm_slug(vm_path)}.{disk_key}"

    def _image_of(self, point: Point) -> str:
        return self.image_name(point.vm_path, point.disk_key)

    def _spec(self) -> RbdSpec:
        return self.where.spec("-")

    # -- the point's life ------------------------------------------------------

    def create(self, vm_path: str, disk_key: int, point_id: str, *, base: Point | None, capacity: int) -> str:
        """Make the head ready for a job, marked dirty before it changes: an incremental's head rolled back
        to ``base``'s snapshot (unless the clean mark and the size say it equals it); a full's head a new
        image, or the disk's image emptied (shrunk to nothing: its snapshots keep their data) and grown to
        ``capacity`` bytes, so it reads zeroes and holds nothing but what the job writes."""
        name = self.image_name(vm_path, disk_key)
        what = f"cannot prepare rbd:{self.where.pool}/{name} for point {point_id}"
        rbd = _rbd()
        with self._ioctx(what) as ioctx:
            try:
                identity = self._identity(ioctx)  # before an image is made: a first claim sees the pool as it was
                if base is None and not _exists(ioctx, name):
                    rbd.RBD().create(ioctx, name, capacity)
                with opened_image(ioctx, name) as image:
                    image.metadata_set(TAG, identity)
                    clean = base is not None and _metadata(image, CLEAN) == base.id and image.size() == base.size
                    _set_dirty(image)
                    if base is None:
                        image.resize(0)
                        image.resize(capacity)
                    elif not clean:
                        image.rollback_to_snap(base.id)
            except rbd.ImageNotFound as exc:
                gone = f"the image of point {base.id} is gone" if base else "the image went away"
                raise RepositoryError(f"{what}: {gone}") from exc
            except rbd.Error as exc:
                _raise(exc, what)
        return self._path(name, point_id)

    def _path(self, image: str, point_id: str) -> str:
        """``rbd:POOL[/NS]/IMAGE@POINT-ID``: a point's snapshot, without how to reach the cluster."""
        return RbdSpec(self.where.pool, image, point_id, self.where.namespace).filename

    def opener(self, point: Point, *, readonly: bool) -> RbdOpener:
        """What opens a pending point: the image's head (writable, without librbd's cache); else its snapshot
        (read-only).

        The head is written with ``cache=none``: each write reaches the OSDs before it is answered, so a
        full pool fails that write. (librbd's writeback cache may drop the ``EDQUOT`` of a background
        write-out and answer the next FLUSH with success, losing the data: seen with Ceph 16.)"""
        if point.status is PointStatus.PENDING:
            return RbdOpener(self.where.spec(self._image_of(point)), readonly, CacheMode.NONE)
        return RbdOpener(self.where.spec(self._image_of(point), point.id), True)

    def source(self, point: Point) -> str:
        """The point's snapshot as an ``rbd:`` filename with the cluster's conf, user and keyring."""
        return self.where.spec(self._image_of(point), point.id).filename

    def seal(self, point: Point) -> None:
        """Snapshot the head as the point; the head then equals it (and the folder of its digests is made)."""
        os.makedirs(os.path.dirname(self.digest_path(point)), mode=0o700, exist_ok=True)
        what = f"cannot snapshot rbd:{self.where.pool}/{self._image_of(point)} as point {point.id}"
        rbd = _rbd()
        with self._image(point, what) as image:
            try:
                image.create_snap(point.id)
                image.metadata_set(CLEAN, point.id)
            except rbd.Error as exc:
                _raise(exc, what)

    def discard(self, point: Point, *, latest: Point | None) -> None:
        """Remove the point's snapshot if one was taken, and roll the head back to ``latest``'s snapshot
        (no completed point: an image left without snapshots is removed). Best effort, never raising: what
        fails here (a full pool, an unreachable cluster) is logged; the next job's :meth:`create` rolls the
        head back all the same (it is not marked clean), and the next start sweeps a snapshot left over."""
        try:
            self._discard(point, latest)
        except RepositoryError as exc:
            log.warning("%s (the next job rolls the head back)", exc)

    def _discard(self, point: Point, latest: Point | None) -> None:
        name = self._image_of(point)
        what = f"cannot discard point {point.id} of rbd:{self.where.pool}/{name}"
        rbd = _rbd()
        with self._ioctx(what) as ioctx:
            try:
                with opened_image(ioctx, name) as image:
                    if point.id in _snapshots(image):
                        image.remove_snap(point.id)
                    if latest is not None:
                        _roll_back(image, latest.id)
                        return
                    empty = not _snapshots(image)
                if empty:
                    rbd.RBD().remove(ioctx, name)
            except rbd.ImageNotFound:
                return  # never made, or already gone
            except rbd.Error as exc:
                _raise(exc, what)

    def drop(self, base: Point, top: Point) -> None:
        """Remove ``base``'s snapshot (``top``'s snapshot is a whole view: nothing to merge). Safe to repeat."""
        what = f"cannot remove point {base.id} of rbd:{self.where.pool}/{self._image_of(base)}"
        rbd = _rbd()
        with self._image(base, what) as image:
            try:
                if base.id in _snapshots(image):
                    image.remove_snap(base.id)
            except rbd.ImageBusy as exc:
                raise RepositoryError(f"{what}: it has clones (flatten them first)") from exc
            except rbd.Error as exc:
                _raise(exc, what)
        with self._ioctx(what) as ioctx, _sharing(what):  # its shared digests (a cluster's hubs read them) go too
            shared_digests.remove(ioctx, self._digests_name(base.id))

    def blocked(self, point: Point) -> str | None:
        """Why the point's snapshot cannot be removed now (it is protected or has clones), or None."""
        what = f"cannot look at point {point.id} of rbd:{self.where.pool}/{self._image_of(point)}"
        rbd = _rbd()
        with self._image(point, what, read_only=True) as image:
            try:
                return droppable(image, point.id) if point.id in _snapshots(image) else None
            except rbd.Error as exc:
                _raise(exc, what)

    def clone_target(self, name: str) -> str:
        """The ``rbd:`` name of a new image ``name`` in the repository's pool (not one of the repository's
        own names, which start with the prefix)."""
        if name.startswith(self.where.prefix + "."):
            raise RepositoryError(f"image {name!r}: names starting {self.where.prefix}. are the repository's own")
        return RbdSpec(self.where.pool, name, None, self.where.namespace).filename

    def clone(self, point: Point, name: str) -> None:
        """A new image ``name`` in the pool holding the point's snapshot: an RBD clone, flattened so that
        it does not hold the snapshot (retention may remove it later). A failure removes the clone; a kill
        leaves it tagged (:data:`CLONE_OF`) until flattened, and the next start removes it and unprotects
        the snapshot (:meth:`reclaim`)."""
        rbd = _rbd()
        source = self._image_of(point)
        what = f"cannot clone point {point.id} to rbd:{self.where.pool}/{name}"
        with self._ioctx(what) as ioctx:
            try:
                with opened_image(ioctx, source) as image:
                    protected = image.is_protected_snap(point.id)
                    if not protected:
                        image.protect_snap(point.id)
                    try:
                        _clone_flat(ioctx, image, point.id, name)
                    finally:
                        if not protected and not _children(image, point.id):
                            image.unprotect_snap(point.id)
            except rbd.ImageExists as exc:
                raise Conflict(f"image rbd:{self.where.pool}/{name} exists", "exists") from exc
            except rbd.Error as exc:
                _raise(exc, what)

    def reclaim(self, disks: Collection[tuple[str, int]] | None = None) -> list[str]:
        """At start: claim the repository (:meth:`_claim`), clean up clones cut short, and break the
        exclusive locks a killed predecessor's clients still hold on the repository's images (their
        watches outlive them by about 30 s, during which librbd refuses to roll back); the images whose
        lock was broken. Only images tagged with this repository's UUID are touched. ``disks`` (VM path,
        disk key): only their images' locks (other hubs share the repository: the rest are theirs)."""
        rbd = _rbd()
        broken = []
        what = f"cannot list the images of {self.location}"
        with self._ioctx(what) as ioctx:
            self._claim(ioctx)
            names = self._own_images(ioctx, what)
            if disks is not None:
                names = sorted(set(names) & {self.image_name(vm_path, key) for vm_path, key in disks})
            for name in names:
                try:
                    with opened_image(ioctx, name) as image:
                        if disks is None:
                            _clean_clones(ioctx, image, f"rbd:{self.where.pool}/{name}")
                        for owner in list(image.lock_get_owners()):
                            image.lock_break(owner["mode"], owner["owner"])
                            broken.append(name)
                            log.warning("rbd:%s/%s: broke the lock of %s", self.where.pool, name, owner["owner"])
                except rbd.Error as exc:
                    _raise(exc, f"cannot take back rbd:{self.where.pool}/{name}")
        return broken

    # -- reading ---------------------------------------------------------------

    def share_digests(self, point: Point) -> None:
        """Copy the point's sidecar to the objects ``PREFIX.digests.<point-id>[.N]``, which every hub reads."""
        what = f"cannot share the digests of point {point.id} in {self.location}"
        with open(self.digest_path(point), "rb") as source, self._ioctx(what) as ioctx, _sharing(what):
            shared_digests.put(ioctx, self._digests_name(point.id), source)

    def fetch_digests(self, point: Point) -> None:
        """Write the shared sidecar to the sidecar's path when this hub has none (nothing when none was shared)."""
        path = self.digest_path(point)
        if os.path.exists(path):
            return
        what = f"cannot read the shared digests of point {point.id} in {self.location}"
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        temporary = temporary_name(path)
        try:
            with self._ioctx(what) as ioctx, open(temporary, "wb") as target, _sharing(what):
                found = shared_digests.get(ioctx, self._digests_name(point.id), target)
            if found:
                os.replace(temporary, path)
        finally:
            remove_quietly(temporary)

    def _digests_name(self, point_id: str) -> str:
        return f"{self.where.prefix}.{DIGESTS}.{point_id}"

    def digest_path(self, point: Point) -> str:
        """``ROOT/digests/<image>/<point-id>.digests``."""
        return os.path.join(self.root, "digests", self._image_of(point), f"{point.id}.digests")

    def changes(self, above: Sequence[Point], base: Point) -> list[tuple[int, int]]:
        """The objects that differ between ``base``'s snapshot and ``above[0]``'s (``diff_iterate``, whole
        objects; areas zeroed since count too)."""
        point = above[0]
        return self._diff(point, base.id, f"cannot compare points {base.id} and {point.id}")

    def _diff(self, point: Point, since: str | None, what: str) -> list[tuple[int, int]]:
        """The whole objects of the point (its snapshot, or the head while pending) that differ from ``since``."""
        rbd = _rbd()
        found: list[tuple[int, int]] = []

        def seen(offset: int, length: int, exists: bool) -> int:
            found.append((offset, length))
            return 0

        snapshot = None if point.status is PointStatus.PENDING else point.id
        with self._image(point, what, snapshot=snapshot, read_only=True) as image:
            try:
                image.diff_iterate(0, image.size(), since, seen, include_parent=False, whole_object=True)
            except rbd.Error as exc:
                _raise(exc, what)
        return found

    def own_file(self, point: Point, base: Point | None) -> str | None:
        """None: a snapshot is no qcow2 file (``export_point`` makes one)."""
        return None

    def check(self, chain: Sequence[Point]) -> str | None:
        """Every point of the chain is a snapshot of its image, of the point's size."""
        rbd = _rbd()
        for point in chain:
            try:
                with self._image(point, f"point {point.id}") as image:
                    sizes = {snap["name"]: int(snap["size"]) for snap in image.list_snaps()}
            except (RepositoryError, rbd.Error) as exc:
                return f"RBD check of point {point.id} failed: {exc}"
            if point.id not in sizes:
                return f"point {point.id}: its snapshot is missing from rbd:{self.where.pool}/{self._image_of(point)}"
            if sizes[point.id] != point.size:
                return f"point {point.id}: its snapshot has {sizes[point.id]} bytes, the point {point.size}"
        return None

    def space(self) -> Space:
        """The pool's room: ``ceph df``'s stored bytes and max_avail; with a byte quota, the bytes it counts
        and what is left of it (never more than max_avail)."""
        stats = self._mon({"prefix": "df", "format": "json"})
        pool = next((p["stats"] for p in stats.get("pools", ()) if p.get("name") == self.where.pool), None)
        if pool is None:
            raise RepositoryError(f"ceph df does not list pool {self.where.pool!r}")
        used, free = int(pool["stored"]), int(pool["max_avail"])
        quota = self._mon({"prefix": "osd pool get-quota", "pool": self.where.pool, "format": "json"})
        limit = int(quota.get("quota_max_bytes") or 0)
        if limit:  # the quota counts the pool's bytes as the OSDs last reported them
            used = int(quota.get("current_num_bytes") or 0)
            free = min(free, max(0, limit - used))
        return Space(used + free, used, free)

    def _mon(self, command: dict[str, str]) -> dict[str, Any]:
        """A mon command's JSON answer (the hub's user needs ``mon 'profile rbd'``)."""
        what = f"ceph {command['prefix']} for {self.location}"
        with self._connection(what) as (cluster, _):
            try:
                code, out, err = cluster.mon_command(json.dumps(command), b"", timeout=MON_TIMEOUT)
            except importlib.import_module("rados").Error as exc:
                _raise(exc, what)
        if code != 0:
            raise _failure(OSError(-code, err), what)
        try:
            answer = json.loads(out)
        except ValueError as exc:
            raise RepositoryError(f"{what}: the answer is not JSON: {exc}") from exc
        if not isinstance(answer, dict):
            raise RepositoryError(f"{what}: the answer is not a JSON object: {out[:200]!r}")
        return answer

    def allocated(self, points: Sequence[Point]) -> dict[str, int | None]:
        """The objects each point wrote over its base (a full: all it holds), whole objects."""
        out: dict[str, int | None] = {}
        for point in points:
            try:
                changed = self._diff(point, point.backing, f"point {point.id}")
            except RepositoryError:
                out[point.id] = None
                continue
            out[point.id] = sum(length for _, length in changed)
        return out

    def sweep(self, known: Callable[[], Sequence[tuple[str, str]]]) -> tuple[list[str], list[str]]:
        """Remove the snapshots and images of ours no point knows of (point-ID snapshots on ``PREFIX.``
        images), and digest sidecars of points that are gone; other snapshots are reported, not touched.
        ``known`` reads the points now: before removing anything from an image, they are read again, so a
        point another hub recorded since the sweep began is kept."""
        if self.adopted:
            log.warning("%s: adopted: nothing is swept at this start", self.location)
            return [], []
        points = _Known(known).refresh()
        removed, unexpected = self._sweep_images(points)
        removed += _sweep_digests(os.path.join(self.root, "digests"), points.refresh().ids)
        for path in removed:
            log.warning("removed %s: no restore point knows it (left by a crash)", path)
        for path in unexpected:
            log.warning("unexpected snapshot in the repository, left alone: %s", path)
        return removed, unexpected

    def _sweep_images(self, known: _Known) -> tuple[list[str], list[str]]:
        rbd = _rbd()
        removed: list[str] = []
        unexpected: list[str] = []
        what = f"cannot list the images of {self.location}"
        with self._ioctx(what) as ioctx:
            self._identity(ioctx)
            for name in self._own_images(ioctx, what):
                try:
                    self._sweep_image(ioctx, name, known, (removed, unexpected))
                except rbd.Error as exc:
                    unexpected.append(f"rbd:{self.where.pool}/{name} (it could not be swept: {exc})")
        return removed, unexpected

    def _sweep_image(self, ioctx: Any, name: str, known: _Known, out: tuple[list[str], list[str]]) -> None:
        """Sweep one image: ``known`` the points' IDs and images (read again before anything is removed),
        ``out`` the removed and unexpected lists."""
        removed, unexpected = out
        with opened_image(ioctx, name) as image:
            snapshots = _snapshots(image)
            if any(s not in known.ids for s in snapshots) or (name not in known.images and not snapshots):
                known.refresh()  # a second look: another hub may have recorded it since the sweep began
            for snapshot in snapshots:
                path = self._path(name, snapshot)
                if snapshot in known.ids:
                    continue
                if POINT_ID.fullmatch(snapshot) and not image.is_protected_snap(snapshot):
                    image.remove_snap(snapshot)
                    removed.append(path)
                else:
                    unexpected.append(path)
            left = _snapshots(image)
        if name not in known.images and not left:
            _rbd().RBD().remove(ioctx, name)
            removed.append(f"rbd:{self.where.pool}/{name}")

    def _own_images(self, ioctx: Any, what: str) -> list[str]:
        """The pool's images named ``PREFIX.*`` and tagged with this repository's UUID (another hub's images
        of the same prefix are not ours)."""
        return [name for name in self._named(ioctx, what) if self.identity and _tag(ioctx, name) == self.identity]

    def _named(self, ioctx: Any, what: str) -> list[str]:
        """The pool's images named ``PREFIX.*`` (the repository object is no image)."""
        try:
            names: list[str] = _rbd().RBD().list(ioctx)
        except _rbd().Error as exc:
            _raise(exc, what)
        return [name for name in names if name.startswith(self.where.prefix + ".")]

    def _identity(self, ioctx: Any) -> str:
        """The UUID images are tagged with (claimed now if the start did not yet)."""
        if self.identity is None:
            self._claim(ioctx)
        assert self.identity is not None  # _claim sets it or raises
        return self.identity

    def _claim(self, ioctx: Any) -> None:
        """Make sure the pool's prefix is this state directory's repository (see :func:`_check_claim`); a
        new repository's UUID is written to ``PREFIX.repository``, and recorded in the state directory."""
        rados = importlib.import_module("rados")
        what = f"cannot claim {self.location}"
        name = f"{self.where.prefix}.{IDENTITY}"
        try:
            found: str | None = ioctx.read(name, 64).decode("ascii", "replace").strip() or None
        except rados.ObjectNotFound:
            found = None
        except rados.Error as exc:
            _raise(exc, what)
        legacy = self._named(ioctx, what) if found is None else []
        if found is not None and self.identity is None and not self.where.adopt:
            age = _age(ioctx, name)
            if age < CLAIM_FRESH:  # a new cluster's hubs started at once: the cluster records it next
                raise RepositoryClaimed(f"{what}: another hub claimed it as a new repository {age:.0f} s ago")
        self.adopted = _check_claim(self.location, found, self.identity, fresh=self._fresh, adopt=self.where.adopt,
                                    images=legacy)  # fmt: skip
        identity = found or self.identity or str(uuid.uuid4())
        try:
            if found is None:
                op = ioctx.create_write_op()
                try:  # exclusive: of two new hubs claiming at once, the second fails (EEXIST)
                    op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                    op.write_full(identity.encode("ascii"))
                    ioctx.operate_write_op(op, name, mtime=int(time.time()))  # python-rados' default is 1970
                except rados.ObjectExists as exc:
                    raise RepositoryClaimed(f"{what}: another hub claimed it as a new repository just now") from exc
                finally:
                    op.release()
            for image in legacy:  # images of this state directory from before repositories had a UUID
                with opened_image(ioctx, image) as opened:
                    opened.metadata_set(TAG, identity)
        except (rados.Error, _rbd().Error) as exc:
            _raise(exc, what)
        self.identity = identity
        if self._record is not None:
            self._record(identity)

    # -- connections -----------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self, what: str) -> Iterator[tuple[Any, Any]]:
        """The cluster's ``Rados`` and the pool's ``Ioctx`` (the store's one connection, opened on first use
        and shared by every thread); an unreachable cluster is a :class:`RepositoryError`. A call that
        finds the connection lost (blocklisted, shut down, timed out) makes the next call reconnect."""
        client = self._connected(what)
        try:
            yield client[1], client[2]
        except BaseException as exc:
            if _lost(exc):
                self._retire(client)
            raise
        finally:
            with self._client_lock:
                self._users -= 1
                self._client_lock.notify_all()

    def _connected(self, what: str) -> tuple[contextlib.ExitStack[Any], Any, Any]:
        """The open connection, or a new one; counted as in use (:meth:`close` waits for its calls)."""
        with self._client_lock:
            if self._client is None:
                stack = contextlib.ExitStack()
                try:
                    cluster, ioctx = stack.enter_context(connect(self._spec()))
                except RbdError as exc:
                    raise RepositoryError(f"{what}: {exc}") from exc
                self._client = (stack, cluster, ioctx)
            self._users += 1
            return self._client

    def _retire(self, client: tuple[contextlib.ExitStack[Any], Any, Any]) -> None:
        """Stop handing out a lost connection (closed with the store: a call may still be using it)."""
        with self._client_lock:
            if self._client is client:
                self._client = None
                self._retired.append(client[0])

    def close(self) -> None:
        """Shut the store's connections down once the calls using them ended (a later call connects again).
        Calls still running after :data:`CLOSE_WAIT` seconds (stuck in librados) keep them: freeing a Ceph
        client under a call would crash the process."""
        with self._client_lock:
            if not self._client_lock.wait_for(lambda: not self._users, CLOSE_WAIT):
                log.warning("%s: %d calls still running; its Ceph client is left open", self.location, self._users)
                return
            stacks = [*self._retired, *([self._client[0]] if self._client is not None else [])]
            self._client, self._retired = None, []
        for stack in stacks:
            stack.close()

    @contextlib.contextmanager
    def _ioctx(self, what: str) -> Iterator[Any]:
        """The pool's ``Ioctx`` for one call; an unreachable cluster is a :class:`RepositoryError`."""
        with self._connection(what) as (_, ioctx):
            yield ioctx

    @contextlib.contextmanager
    def _image(self, point: Point, what: str, *, snapshot: str | None = None, read_only: bool = False) -> Iterator[Any]:
        """The point's image (read-write unless ``read_only``; read-only at ``snapshot``) for one call."""
        rbd = _rbd()
        name = self._image_of(point)
        with self._ioctx(what) as ioctx, contextlib.ExitStack() as stack:
            try:
                image = stack.enter_context(opened_image(ioctx, name, snapshot=snapshot, read_only=read_only))
            except rbd.ImageNotFound as exc:
                gone = f"snapshot {snapshot} of " if snapshot is not None else ""
                raise RepositoryError(f"{what}: {gone}rbd:{self.where.pool}/{name} is gone") from exc
            except rbd.Error as exc:
                _raise(exc, what)
            yield image


def _clone_flat(ioctx: Any, image: Any, snapshot: str, name: str) -> None:
    """Clone ``image@snapshot`` (protected) to ``name`` and flatten it; the clone is removed if that fails."""
    rbd = _rbd()
    image.set_snap(snapshot)
    try:
        rbd.RBD().clone(ioctx, image.get_name(), snapshot, ioctx, name)
    finally:
        image.set_snap(None)
    try:
        with opened_image(ioctx, name) as child:
            child.metadata_set(CLONE_OF, snapshot)  # a start after a kill from here on removes it
            child.flatten()
            child.metadata_remove(CLONE_OF)
    except BaseException:
        rbd.RBD().remove(ioctx, name)
        raise


def _exists(ioctx: Any, name: str) -> bool:
    """Whether the pool has image ``name`` (opened, not the pool listed)."""
    rbd = _rbd()
    try:
        with opened_image(ioctx, name, read_only=True):
            return True
    except rbd.ImageNotFound:
        return False


def _clean_clones(ioctx: Any, image: Any, where: str) -> None:
    """What a clone cut short left (the hub or CLI killed): its unflattened image (tagged with
    :data:`CLONE_OF`) is removed, and a point's protected snapshot without clones unprotected."""
    rbd = _rbd()
    for snapshot in [s for s in _snapshots(image) if POINT_ID.fullmatch(s) and image.is_protected_snap(s)]:
        try:
            for pool, child in _children(image, snapshot):
                if pool != ioctx.get_pool_name():
                    continue  # the hub clones into its own pool only
                with opened_image(ioctx, child, read_only=True) as opened:
                    partial = _metadata(opened, CLONE_OF) == snapshot
                if partial:
                    rbd.RBD().remove(ioctx, child)
                    log.warning("%s@%s: removed %s, a clone cut short", where, snapshot, child)
            if not _children(image, snapshot):
                image.unprotect_snap(snapshot)
                log.warning("%s@%s: unprotected (no clone is left)", where, snapshot)
        except rbd.Error as exc:
            log.warning("%s@%s: a clone cut short could not be cleaned up, left alone: %s", where, snapshot, exc)


def _lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error behind it) says the connection is no use any more."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of causes, bounded
        if seen is None:
            return False
        if abs(int(getattr(seen, "errno", 0) or 0)) in (errno.ESHUTDOWN, errno.ENOTCONN, errno.ETIMEDOUT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _age(ioctx: Any, name: str) -> float:
    """Seconds since the object ``name`` was last written (by the OSDs' clock)."""
    _, mtime = ioctx.stat(name)
    return time.time() - time.mktime(mtime)


def _check_claim(
    location: str, found: str | None, recorded: str | None, *, fresh: bool, adopt: bool, images: list[str]
) -> bool:
    """Refuse a state directory that is not the repository's: ``found`` the pool's UUID, ``recorded`` the
    directory's, ``images`` the untagged ``PREFIX.*`` images (when the pool has no UUID); whether this start
    adopts an existing repository."""
    if found is not None and recorded is not None and found != recorded:
        raise RepositoryError(
            f"{location} is repository {found}, but this state directory recorded {recorded}: another hub's "
            f"repository has this pool and prefix; give this hub another prefix, or its own state directory back"
        )
    existing = recorded is None and (found is not None or (fresh and bool(images)))
    if existing and not adopt:
        raise RepositoryError(
            f"{location} holds a repository (its images: {', '.join(images[:3]) or 'see rbd ls'}) that this new "
            f"state directory does not know: start the hub with its own state directory, use another prefix, or "
            f"add adopt=yes to --repo to take it over (its points stay unknown to this hub and are never swept)"
        )
    return existing


def _tag(ioctx: Any, name: str) -> str | None:
    """The repository UUID an image is tagged with (None: untagged, or it went away)."""
    rbd = _rbd()
    try:
        with opened_image(ioctx, name, read_only=True) as image:
            return _metadata(image, TAG)
    except rbd.ImageNotFound:
        return None


def _children(image: Any, snapshot: str) -> list[Any]:
    """The clones of ``snapshot`` alone (at the head, librbd lists the clones of every snapshot)."""
    image.set_snap(snapshot)
    try:
        return list(image.list_children())
    finally:
        image.set_snap(None)


def droppable(image: Any, snapshot: str) -> str | None:
    """Why ``snapshot`` cannot be removed (protected, or it has clones), or None."""
    children = _children(image, snapshot)
    if children:
        return f"snapshot {snapshot} has clones ({', '.join('/'.join(c) for c in children)}): flatten them first"
    if image.is_protected_snap(snapshot):
        return f"snapshot {snapshot} is protected (rbd snap unprotect it)"
    return None


def _snapshots(image: Any) -> list[str]:
    return [snap["name"] for snap in image.list_snaps()]


def _metadata(image: Any, key: str) -> str | None:
    try:
        value: str = image.metadata_get(key)
    except KeyError:
        return None
    return value


def _roll_back(image: Any, snapshot: str) -> None:
    """Make the head equal ``snapshot`` (a rollback, unless the clean mark says it already does)."""
    if _metadata(image, CLEAN) == snapshot:
        return
    image.rollback_to_snap(snapshot)
    image.metadata_set(CLEAN, snapshot)


def _set_dirty(image: Any) -> None:
    """The head is about to hold a job's writes: no snapshot's mark any more."""
    if _metadata(image, CLEAN) is not None:
        image.metadata_remove(CLEAN)


def _sweep_digests(folder: str, ids: set[str]) -> list[str]:
    """Remove the sidecars of points that are gone."""
    removed = []
    for directory, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".digests") and name.removesuffix(".digests") not in ids:
                path = os.path.join(directory, name)
                remove_quietly(path)
                removed.append(path)
    return removed
