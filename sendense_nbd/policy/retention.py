"""GFS retention: which completed points a disk keeps, by Proxmox Backup Server's prune rules.

The rules run in the order last, daily, weekly, monthly, yearly. Each walks
the points newest to oldest and keeps the newest point of every period (a
local day, ISO week, month or year) until it has kept N; ``keep_last`` keeps
the N newest points. A period that a point kept by an earlier rule lies in
is already covered: the later rule skips it without counting it. Points a
rule passed over in a period it kept (older points of that day, say) are
out for the later rules too, so a later rule only reaches older points.
No rule set keeps every point; any rule set keeps the newest.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from zoneinfo import ZoneInfo

import attrs

from sendense_nbd.policy.model import Retention

#: A point's period under one rule: equal keys, same period.
Period = Callable[[dt.datetime], tuple[int, ...]]

#: The rules in the order they run: (name, the Retention field, the period of a local time).
RULES: tuple[tuple[str, str, Period], ...] = (
    ("daily", "keep_daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", "keep_weekly", lambda t: tuple(t.isocalendar())[:2]),
    ("monthly", "keep_monthly", lambda t: (t.year, t.month)),
    ("yearly", "keep_yearly", lambda t: (t.year,)),
)


@attrs.frozen
class Candidate:
    """A completed point: its ID and its completion time (epoch seconds)."""

    id: str
    time: float


@attrs.frozen
class Kept:
    """What :func:`select` decided: the points kept (with the rule that kept each) and those removed."""

    #: Point ID -> the rules that keep it: ``("last",)``, ``("daily",)``...; ``("all",)`` when no rule is set.
    keep: dict[str, tuple[str, ...]]
    #: Point IDs to remove, oldest first.
    remove: tuple[str, ...]


def select(points: Sequence[Candidate], rules: Retention, *, timezone: str = "UTC") -> Kept:
    """Which of a disk's completed ``points`` ``rules`` keep; periods are local to ``timezone``."""
    newest_first = sorted(points, key=lambda p: (p.time, p.id), reverse=True)
    if rules.keeps_all:
        return Kept({p.id: ("all",) for p in newest_first}, ())
    keep: dict[str, tuple[str, ...]] = {}
    passed: set[str] = set()  # passed over by a rule within a period it kept: out for later rules
    if rules.keep_last:
        keep.update((p.id, ("last",)) for p in newest_first[: rules.keep_last])
    tz = ZoneInfo(timezone)
    local = {p.id: dt.datetime.fromtimestamp(p.time, tz) for p in newest_first}
    for name, field, period in RULES:
        limit = getattr(rules, field)
        if not limit:
            continue
        covered = {period(local[i]) for i in keep}
        chosen: set[tuple[int, ...]] = set()
        for point in newest_first:
            if point.id in keep or point.id in passed:
                continue
            key = period(local[point.id])
            if key in covered:
                continue
            if key in chosen:
                passed.add(point.id)
            elif len(chosen) >= limit:
                break
            else:
                chosen.add(key)
                keep[point.id] = (name,)
    remove = tuple(p.id for p in reversed(newest_first) if p.id not in keep)
    return Kept(keep, remove)
