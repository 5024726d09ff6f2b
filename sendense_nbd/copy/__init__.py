"""Copy a disk between NBD exports and local images.

::

    source = await open_source("nbd://src/disk")
    target = await open_target("nbd://dst/disk")
    try:
        result = await copy(source, target, connections=4, requests=16, verify=True)
    finally:
        await target.close()
        await source.close()

:mod:`~sendense_nbd.copy.plan` turns the source's allocation map into work
items (pure); :mod:`~sendense_nbd.copy.engine` runs them with several
connections and requests in flight, retries and FLUSH checkpoints;
:mod:`~sendense_nbd.copy.endpoints` adapts NBD URIs and local images.
"""

from sendense_nbd.copy.endpoints import (
    Endpoint,
    LocalEndpoint,
    NBDEndpoint,
    open_source,
    open_target,
)
from sendense_nbd.copy.engine import (
    CopyResult,
    Progress,
    copy,
    probe_target_mode,
)
from sendense_nbd.copy.plan import Action, Plan, TargetMode, WorkItem, merge_areas, plan

__all__ = [
    "Action",
    "CopyResult",
    "Endpoint",
    "LocalEndpoint",
    "NBDEndpoint",
    "Plan",
    "Progress",
    "TargetMode",
    "WorkItem",
    "copy",
    "merge_areas",
    "open_source",
    "open_target",
    "plan",
    "probe_target_mode",
]
