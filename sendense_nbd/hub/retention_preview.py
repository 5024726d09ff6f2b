"""Which points a policy's retention rules would keep: each VM the policy covers, each disk, each point.

The decision is :func:`~sendense_nbd.hub.repository.kept_by_rules`, the
code the hub's retention runs after each backup, applied to this policy's
rules alone (:func:`retention_rules`). Retention itself keeps a point that
the rules of any policy covering the VM keep, and never drops a point a
restore job is serving or converting (nor the points below it): the preview
shows neither.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs

from sendense_nbd.backup.records import SyncType
from sendense_nbd.hub.repository import Point, VerifyState, kept_by_rules
from sendense_nbd.policy.model import Policy, Retention


def retention_rules(policy: Policy) -> tuple[Retention, str]:
    """A policy's retention rules with the time zone of its schedule (where its days and months are)."""
    return policy.retention, policy.schedule.timezone


@attrs.frozen
class PreviewPoint:
    """One completed point: whether the rules keep it, and which rules (``last``, ``daily``... ``all``,
    ``newest``; none when it would go)."""

    id: str
    kind: SyncType
    #: The time retention judges the point by: its completion (epoch seconds).
    time: float
    size: int
    verify_state: VerifyState
    keep: bool
    rules: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        """``{"id", "kind", "time", "size", "verify_state", "keep", "rules"}``."""
        return {
            **attrs.asdict(self),
            "kind": self.kind.value,
            "verify_state": self.verify_state.value,
            "rules": list(self.rules),
        }


@attrs.frozen
class PreviewDisk:
    """A disk's completed points, oldest first."""

    disk_key: int
    points: tuple[PreviewPoint, ...]

    def to_json(self) -> dict[str, object]:
        """``{"disk_key", "points", "keep", "remove"}`` (how many points stay and go)."""
        kept = sum(point.keep for point in self.points)
        return {
            "disk_key": self.disk_key,
            "points": [point.to_json() for point in self.points],
            "keep": kept,
            "remove": len(self.points) - kept,
        }


@attrs.frozen
class PreviewVM:
    """A VM the policy covers, with its disks."""

    vm_path: str
    disks: tuple[PreviewDisk, ...]

    def to_json(self) -> dict[str, object]:
        """``{"vm_path", "disks"}``."""
        return {"vm_path": self.vm_path, "disks": [disk.to_json() for disk in self.disks]}


def preview_vm(vm_path: str, points: Sequence[Point], policy: Policy) -> PreviewVM:
    """What ``policy``'s rules keep of a VM's completed ``points`` (by disk and age, as the repository lists them)."""
    disks = []
    for disk_key, group in itertools.groupby(points, key=lambda point: point.disk_key):
        chain = list(group)
        kept = kept_by_rules(chain, [retention_rules(policy)])
        disks.append(PreviewDisk(disk_key, tuple(_preview_point(point, kept) for point in chain)))
    return PreviewVM(vm_path, tuple(disks))


def _preview_point(point: Point, kept: dict[str, tuple[str, ...]]) -> PreviewPoint:
    time = point.completed or point.created
    rules = kept.get(point.id, ())
    return PreviewPoint(point.id, point.kind, time, point.size, point.verify_state, point.id in kept, rules)
