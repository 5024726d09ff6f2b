"""Copy a disk between NBD exports and local images.

::

    source = await open_source("nbd://src/disk")
    target = await open_target("nbd://dst/disk")
    try:
        result = await copy(source, target, CopyOptions(connections=4, requests=16, verify=True))
    finally:
        await target.close()
        await source.close()

    # the same, opening and closing both ends:
    result = await copy_between("nbd://src/disk", "nbd://dst/disk", CopyOptions(verify=True))

:mod:`~sendense_nbd.copy.plan` turns the source's allocation map into work
items (pure); :mod:`~sendense_nbd.copy.engine` runs them with several
connections and requests in flight, retries and FLUSH checkpoints, keeping
account of what is durable in :mod:`~sendense_nbd.copy.ledger` (pure);
:mod:`~sendense_nbd.copy.options` holds :class:`CopyOptions`,
:mod:`~sendense_nbd.copy.progress` the progress events, and
:mod:`~sendense_nbd.copy.endpoints` adapts NBD URIs and local images.
"""

from sendense_nbd.copy.endpoints import (
    Endpoint,
    LocalEndpoint,
    NBDEndpoint,
    open_source,
    open_target,
)
from sendense_nbd.copy.engine import CopyResult, copy, copy_between, probe_target_mode
from sendense_nbd.copy.options import CopyOptions, OverlayZeroes
from sendense_nbd.copy.plan import Action, Plan, TargetMode, WorkItem, merge_areas, plan
from sendense_nbd.copy.progress import Progress

__all__ = [
    "Action",
    "CopyOptions",
    "CopyResult",
    "Endpoint",
    "LocalEndpoint",
    "NBDEndpoint",
    "OverlayZeroes",
    "Plan",
    "Progress",
    "TargetMode",
    "WorkItem",
    "copy",
    "copy_between",
    "merge_areas",
    "open_source",
    "open_target",
    "plan",
    "probe_target_mode",
]
