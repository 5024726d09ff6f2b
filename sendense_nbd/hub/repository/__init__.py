"""The backup repository: per VM and disk, a chain of restore points, their rows in the hub's store and
their data in a store.

A point (:class:`PointStatus`) is ``pending`` while its job writes it, then
``completed`` (with the disk's change ID) or discarded (its data removed).
Only completed points are restore points or the base of the next incremental.
Its kind is the backup's :class:`~sendense_nbd.backup.records.SyncType`: a
full or an incremental on the point below it (``backing``). The store holds
both enums' values (the plain strings). Retention (GFS rules,
:mod:`sendense_nbd.policy.retention`) drops points; a dropped point's place
in the chain goes to the point above it (the dropped point is ``merging``
meanwhile).

The common part (:mod:`~sendense_nbd.hub.repository.core`: the points
table, the life cycle, GFS selection, the locks) is the same for every store
(:mod:`~sendense_nbd.hub.repository.store`, the protocol): the local store
(:mod:`~sendense_nbd.hub.repository.local`, the default) keeps a full qcow2
and overlays in files and drops a point by merging it into the point above;
the RBD store (:mod:`~sendense_nbd.hub.repository.rbd`) keeps one Ceph RBD
image per disk, a point being a snapshot, and drops a point by removing its
snapshot. :func:`open_store` picks the store of a hub's directory.

Each point may have a digest sidecar (:mod:`sendense_nbd.copy.digests`,
written by :mod:`sendense_nbd.hub.verify`) and a verify state
(:class:`VerifyState`). A drop keeps the surviving point's sidecar (its view
is unchanged) and removes the dropped point's. Work that reads or rewrites a
disk's chain (digests, verify, a merge, a point's export) holds that disk's
:meth:`Repository.disk_lock`. A point whose chain holds a damaged point is
never a base (:meth:`Repository.base_for`).
"""

from sendense_nbd.hub.repository.core import Repository, kept_by_rules
from sendense_nbd.hub.repository.local import LocalStore
from sendense_nbd.hub.repository.points import Point, PointStatus, VerifyState, vm_slug
from sendense_nbd.hub.repository.rbd import RbdStore
from sendense_nbd.hub.repository.store import Space, Store
from sendense_nbd.hub.repository.stores import open_store

__all__ = [
    "LocalStore",
    "Point",
    "PointStatus",
    "RbdStore",
    "Repository",
    "Space",
    "Store",
    "VerifyState",
    "kept_by_rules",
    "open_store",
    "vm_slug",
]
