"""Schedule slots by property over simulated months: against a minute-by-minute model of cron in local
time (DST changes in Berlin, New York and Lord Howe's half hour), interval slots on their anchor, and
``due`` after a downtime (one slot, the latest, with the slots it missed counted)."""

from __future__ import annotations

import datetime as dt
import itertools
import math
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from sendense_nbd.policy.cron import parse
from sendense_nbd.policy.model import Schedule
from sendense_nbd.policy.schedule import MAX_MISSED, due, next_slot

ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe")
#: 2026-01-01T00:00Z and 2029-01-01T00:00Z: three years of DST changes.
START, END = 1767225600, 1861920000
#: DST changes of 2026 (UTC): Berlin, New York, Lord Howe (back in April, forward in October).
CHANGES = (1774746000, 1792890000, 1772953200, 1793512800, 1775314800, 1791041400)
EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True)


def _field(low: int, high: int, names: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    number = st.integers(low, high)
    single = number.map(str) | (st.sampled_from(names) if names else number.map(str))
    ranges = st.tuples(number, number).map(lambda t: f"{min(t)}-{max(t)}")
    steps = st.tuples(st.sampled_from(["*", f"{low}-{high}"]), st.integers(1, high - low + 1)).map(
        lambda t: f"{t[0]}/{t[1]}"
    )
    item = single | ranges | steps
    return st.just("*") | st.lists(item, min_size=1, max_size=3).map(",".join)


CRONS = st.tuples(
    _field(0, 59),
    _field(0, 23),
    _field(1, 28),
    _field(1, 12, ("jan", "mar", "oct", "nov")),
    _field(0, 7, ("sun", "mon", "fri")),
).map(" ".join)
HOURLY = st.tuples(st.integers(0, 59), st.sampled_from(["*", "*/2", "1-5", "0-3,22-23"])).map(
    lambda t: f"{t[0]} {t[1]} * * *"
)


def _expected(expression: str, tz: ZoneInfo, start: int, end: int) -> list[float]:
    """The model: every UTC minute in (start, end] whose local time matches, at its first occurrence;
    and each spring-forward change at which some skipped local minute matched."""
    cron = parse(expression)
    out: list[float] = []
    previous = dt.datetime.fromtimestamp(start - start % 60, tz)
    for minute in range(start - start % 60 + 60, end + 1, 60):
        local = dt.datetime.fromtimestamp(minute, tz)
        skipped = local.utcoffset() > previous.utcoffset()  # type: ignore[operator]
        wall = previous.replace(tzinfo=None) + dt.timedelta(minutes=1)
        gap_matches = skipped and any(
            cron.matches(wall + dt.timedelta(minutes=m))
            for m in range(int((local.replace(tzinfo=None) - wall).total_seconds() // 60))
        )
        if gap_matches or (cron.matches(local) and not local.fold):
            out.append(float(minute))
        previous = local
    return out


def _slots(schedule: Schedule, start: float, end: float, *, anchor: float = 0.0, limit: int = 100_000) -> list[float]:
    out, t = [], start
    while len(out) < limit and (t := next_slot(schedule, t, anchor=anchor)) <= end:
        out.append(t)
    return out


@EXAMPLES
@given(expression=CRONS, zone=st.sampled_from(ZONES), change=st.sampled_from(CHANGES), shift=st.integers(-2, 1))
def test_cron_slots_equal_the_minute_model_around_dst_changes(
    expression: str, zone: str, change: int, shift: int
) -> None:
    start = change + shift * 86400 - 7 * 3600 + 17
    end = start + 3 * 86400
    tz = ZoneInfo(zone)
    slots = _slots(Schedule(cron=expression, timezone=zone), start, end)
    assert slots == _expected(expression, tz, start, end), (expression, zone, start)
    assert all(a < b for a, b in zip(slots, slots[1:]))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(expression=CRONS, zone=st.sampled_from(ZONES), start=st.integers(START, END))
def test_cron_slots_over_a_month_increase_and_match_local_fields(expression: str, zone: str, start: int) -> None:
    tz, cron = ZoneInfo(zone), parse(expression)
    slots = _slots(Schedule(cron=expression, timezone=zone), start, start + 31 * 86400, limit=3000)
    assert all(a < b for a, b in zip(slots, slots[1:]))
    for slot in slots:
        local = dt.datetime.fromtimestamp(slot, tz)
        at_gap_end = local.utcoffset() != dt.datetime.fromtimestamp(slot - 1, tz).utcoffset()
        assert cron.matches(local) or at_gap_end, (expression, zone, local.isoformat())
        assert slot % 60 == 0 and not local.fold


@EXAMPLES
@given(expression=HOURLY, zone=st.sampled_from(ZONES), change=st.sampled_from(CHANGES))
def test_hourly_slots_skip_nothing_across_dst_but_the_missing_hour(expression: str, zone: str, change: int) -> None:
    """Each local hour the expression names fires exactly once; the skipped hour's slot (if it matched)
    fires at the gap's end; a repeated hour fires once."""
    tz, cron = ZoneInfo(zone), parse(expression)
    start, end = change - 36 * 3600, change + 36 * 3600
    slots = _slots(Schedule(cron=expression, timezone=zone), start, end)
    fired = [dt.datetime.fromtimestamp(s, tz).replace(tzinfo=None) for s in slots]
    wall = dt.datetime.fromtimestamp(start, tz).replace(tzinfo=None, second=0) + dt.timedelta(minutes=1)
    stop = dt.datetime.fromtimestamp(end, tz).replace(tzinfo=None)
    while wall <= stop:
        exists = dt.datetime.fromtimestamp(wall.replace(tzinfo=tz).timestamp(), tz).replace(tzinfo=None) == wall
        if cron.matches(wall) and exists:
            assert fired.count(wall) == 1, (expression, zone, wall.isoformat())
        wall += dt.timedelta(minutes=1)
    assert len(fired) == len(set(fired))


@EXAMPLES
@given(
    every=st.floats(5, 366 * 86400),
    anchor=st.integers(START, END),
    after=st.integers(START - 86400, END),
)
def test_every_slots_sit_on_the_anchor_grid(every: float, anchor: int, after: int) -> None:
    schedule = Schedule(every=every)
    slot = next_slot(schedule, after, anchor=anchor)
    k = round((slot - anchor) / every)
    assert slot > after and abs(slot - (anchor + k * every)) < 1e-6
    assert slot - every <= after + 1e-6  # the first one after, none skipped


SCHEDULES = st.one_of(
    st.builds(lambda e, z: Schedule(cron=e, timezone=z), CRONS, st.sampled_from(ZONES)),
    st.builds(lambda s: Schedule(every=s), st.sampled_from([7.0, 60.0, 900.0, 3600.0, 86400.0, 7 * 86400.0])),
)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    schedule=SCHEDULES,
    anchor=st.integers(START, START + 86400),
    offset=st.integers(0, 60 * 86400),
    downtime=st.integers(0, 20 * 86400),
)
def test_due_after_a_downtime_is_one_slot_the_latest(
    schedule: Schedule, anchor: int, offset: int, downtime: int
) -> None:
    last = next_slot(schedule, anchor + offset, anchor=anchor)  # the last slot that ran
    now = last + downtime
    slots = _slots(schedule, last, now, anchor=anchor)
    found = due(schedule, last_slot=last, now=now, anchor=anchor)
    if not slots:
        assert found is None
        return
    assert found is not None
    assert found.slot == slots[-1]
    assert found.missed == min(len(slots) - 1, MAX_MISSED)
    assert found.first_missed == (slots[0] if len(slots) > 1 else None)
    assert found.window_end is None
    assert due(schedule, last_slot=found.slot, now=now, anchor=anchor) is None  # ran it: nothing more is due


def test_due_counts_from_the_anchor_and_gives_the_window() -> None:
    schedule = Schedule(cron="0 22 * * 1-5", timezone="Europe/Berlin", window=4 * 3600)
    anchor = dt.datetime(2026, 12, 1, 12, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()  # a Tuesday
    now = dt.datetime(2026, 12, 8, 22, 30, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()  # the next Tuesday
    found = due(schedule, last_slot=None, now=now, anchor=anchor)
    assert found is not None
    assert found.slot == now - 1800 and found.window_end == found.slot + 4 * 3600
    assert found.missed == 5 and found.first_missed == anchor + 10 * 3600  # Tue, Wed, Thu, Fri, Mon before it
    assert due(schedule, last_slot=None, now=anchor + 3600, anchor=anchor) is None


def test_a_minute_cron_after_a_year_down_caps_the_missed_count() -> None:
    schedule = Schedule(cron="* * * * *")
    found = due(schedule, last_slot=START, now=START + 366 * 86400 + 30, anchor=0)
    assert found is not None and found.slot == START + 366 * 86400
    assert found.missed == MAX_MISSED and found.first_missed == START + 60


def _count(schedule: Schedule, anchor: float, end: float) -> int:
    """How many slots lie in (anchor, end], counted fast (arithmetic, or one walk of the cron)."""
    if schedule.every is not None:
        return math.floor((end - anchor) / schedule.every + 1e-9)
    assert schedule.cron is not None
    return sum(
        1
        for _ in itertools.takewhile(
            lambda t: t <= end, parse(schedule.cron).fires(anchor, ZoneInfo(schedule.timezone))
        )
    )


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    schedule=SCHEDULES,
    ticks=st.lists(st.tuples(st.integers(600, 6 * 3600), st.booleans()), min_size=50, max_size=400),
)
def test_a_scheduler_over_months_with_downtimes_accounts_for_every_slot(
    schedule: Schedule, ticks: list[tuple[int, bool]]
) -> None:
    """A scheduler that asks ``due`` at each tick it is up and runs the slot it gets: every slot in
    the simulated months (up to 100 days) was either run or counted missed by the run after it."""
    anchor = now = float(START)
    last: float | None = None
    ran: list[float] = []
    missed, capped, asked = 0, False, anchor
    for step, up in ticks:
        now += step
        if not up:
            continue
        asked = now
        found = due(schedule, last_slot=last, now=now, anchor=anchor)
        if found is not None:
            assert found.slot <= now and (last is None or found.slot > last)
            assert next_slot(schedule, found.slot, anchor=anchor) > now  # the latest slot due
            ran.append(found.slot)
            missed += found.missed
            capped |= found.missed == MAX_MISSED
            last = found.slot
    if last is None:
        assert _count(schedule, anchor, asked) == 0
        return
    total = _count(schedule, anchor, last)
    assert len(ran) + missed == total or (capped and len(ran) + missed < total)
