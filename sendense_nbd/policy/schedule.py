"""A schedule's slots: when a policy is due, and what a downtime missed.

Slots of ``every`` are ``anchor + k * every``; slots of ``cron`` are the
expression's local minutes in the schedule's time zone (:mod:`.cron`). No
clock is read here: callers pass ``now``.
"""

from __future__ import annotations

import math
from zoneinfo import ZoneInfo

import attrs

from sendense_nbd.policy import cron
from sendense_nbd.policy.model import Schedule

#: Missed slots counted after a downtime, at most.
MAX_MISSED = 10_000


@attrs.frozen
class Due:
    """The slot to run now: the latest one due, with the slots before it that never ran."""

    slot: float
    #: Slots after the last run and before ``slot`` (capped at :data:`MAX_MISSED`).
    missed: int
    first_missed: float | None
    #: No new job starts after this (None: the schedule has no window).
    window_end: float | None


def next_slot(schedule: Schedule, after: float, *, anchor: float) -> float:
    """The first slot strictly after ``after`` (epoch seconds)."""
    if schedule.every is not None:
        k = math.floor((after - anchor) / schedule.every) + 1
        slot = anchor + k * schedule.every
        return slot if slot > after else anchor + (k + 1) * schedule.every
    return _cron(schedule).next_fire(after, ZoneInfo(schedule.timezone))


def due(schedule: Schedule, *, last_slot: float | None, now: float, anchor: float) -> Due | None:
    """The latest slot ``s`` with ``last_slot < s <= now`` (``anchor`` when there was no run yet), or None."""
    lower = anchor if last_slot is None else last_slot
    if now <= lower:
        return None
    slot = _latest(schedule, lower, now, anchor)
    if slot is None:
        return None
    missed, first = _missed(schedule, lower, slot, anchor)
    window_end = None if schedule.window is None else slot + schedule.window
    return Due(slot, missed, first, window_end)


def _cron(schedule: Schedule) -> cron.Cron:
    if schedule.cron is None:
        raise ValueError("the schedule has neither cron nor every")
    return cron.parse(schedule.cron)


def _latest(schedule: Schedule, lower: float, now: float, anchor: float) -> float | None:
    """The latest slot in ``(lower, now]``."""
    if schedule.every is not None:
        k = math.floor((now - anchor) / schedule.every)
        slot = anchor + k * schedule.every
        if slot > now:
            slot = anchor + (k - 1) * schedule.every
        return slot if slot > lower else None
    expression, tz = _cron(schedule), ZoneInfo(schedule.timezone)
    span = 3600.0
    while True:  # look back over doubling spans, each walked forward from its start
        start = max(lower, now - span)
        latest = None
        for slot in expression.fires(start, tz):
            if slot > now:
                break
            latest = slot
        if latest is not None or start == lower:
            return latest
        span *= 2


def _missed(schedule: Schedule, lower: float, slot: float, anchor: float) -> tuple[int, float | None]:
    """How many slots lie in ``(lower, slot)`` (capped), and the first of them."""
    first = next_slot(schedule, lower, anchor=anchor)
    if first >= slot:
        return 0, None
    if schedule.every is not None:
        count = round((slot - first) / schedule.every)
        return min(count, MAX_MISSED), first
    count = 0
    for fired in _cron(schedule).fires(lower, ZoneInfo(schedule.timezone)):
        if fired >= slot or count >= MAX_MISSED:
            break
        count += 1
    return count, first
