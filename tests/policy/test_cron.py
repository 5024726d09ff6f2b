"""The 5-field cron: parsing (lists, ranges, steps, names, macros, refusals) and local-time firing across DST."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from sendense_nbd.policy.cron import next_fire, parse

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def _local(text: str, tz: ZoneInfo) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def _fires(expression: str, start: str, tz: ZoneInfo, count: int) -> list[str]:
    out, t = [], _local(start, tz)
    for _ in range(count):
        t = next_fire(expression, t, tz.key)
        out.append(dt.datetime.fromtimestamp(t, tz).isoformat())
    return out


def test_fields_lists_ranges_steps_and_names() -> None:
    cron = parse("*/15 8-18/5 1,15 jan-mar,DEC mon-fri")
    assert cron.minutes == (0, 15, 30, 45)
    assert cron.hours == (8, 13, 18)
    assert cron.days == {1, 15} and cron.months == {1, 2, 3, 12} and cron.weekdays == {1, 2, 3, 4, 5}
    assert (cron.days_restricted, cron.weekdays_restricted) == (True, True)
    assert parse("5/20 * * * 7").minutes == (5, 25, 45) and parse("0 0 * * 7").weekdays == {0}
    assert parse("0 0 * * sun-sat").weekdays == set(range(7))


@pytest.mark.parametrize(
    ("macro", "same_as"),
    [("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@weekly", "0 0 * * 0"),
     ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *")],
)  # fmt: skip
def test_macros(macro: str, same_as: str) -> None:
    assert attrs_of(parse(macro)) == attrs_of(parse(same_as))


def attrs_of(cron: object) -> tuple[object, ...]:
    return tuple(getattr(cron, name) for name in ("minutes", "hours", "days", "months", "weekdays"))


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * *", "5 fields"),
        ("60 * * * *", "minute: 60 is outside 0-59"),
        ("* 24 * * *", "hour: 24 is outside 0-23"),
        ("* * 0 * *", "day of month: 0 is outside 1-31"),
        ("* * * 13 *", "month: 13 is outside 1-12"),
        ("* * * * 8", "day of week: 8 is outside 0-7"),
        ("*/0 * * * *", "minute: 0 is outside 1-60"),
        ("5-1 * * * *", "runs backwards"),
        ("1,,2 * * * *", "is not a number"),
        ("* * * foo *", "month: 'foo' is not a number or a name"),
        ("* * * * mon-", "is not a number"),
        ("0 0 30 2 *", "never fires"),
        ("0 0 31 4,6,9,11 *", "never fires"),
        ("@reboot", "5 fields"),
        ("0 " * 200, "at most 256"),
    ],
)
def test_refusals_name_the_field(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(expression)


def test_vixie_rule_either_day_field_when_both_are_restricted() -> None:
    # the 13th, or any Friday; November 2026: Fri 6, Fri 13 (both), Fri 20, Fri 27
    fires = _fires("0 12 13 * fri", "2026-11-01T00:00", BERLIN, 5)
    assert [f[:10] for f in fires] == ["2026-11-06", "2026-11-13", "2026-11-20", "2026-11-27", "2026-12-04"]
    # a day-of-month field starting with * counts as unrestricted: only Fridays with odd dates
    assert [f[:10] for f in _fires("0 12 */2 * fri", "2026-11-01T00:00", BERLIN, 2)] == ["2026-11-13", "2026-11-27"]


def test_strictly_after_and_leap_day() -> None:
    assert _fires("30 22 * * *", "2026-05-01T22:30", BERLIN, 1) == ["2026-05-02T22:30:00+02:00"]
    assert _fires("0 0 29 2 *", "2026-01-01T00:00", BERLIN, 2) == [
        "2028-02-29T00:00:00+01:00",
        "2032-02-29T00:00:00+01:00",
    ]
    # 2100 is no leap year: the next 29 February after 2096 is 8 years later
    assert _fires("0 0 29 2 *", "2096-03-01T00:00", BERLIN, 1) == ["2104-02-29T00:00:00+01:00"]


def test_spring_forward_a_skipped_time_fires_once_at_the_gap_end() -> None:
    # Berlin, 29 March 2026: 02:00 CET jumps to 03:00 CEST
    assert _fires("30 2 * * *", "2026-03-28T00:00", BERLIN, 3) == [
        "2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00",
    ]  # fmt: skip
    # every minute of the skipped hour matches: it fires once at 03:00, then on
    assert _fires("* 1-3 * * *", "2026-03-29T01:58", BERLIN, 3) == [
        "2026-03-29T01:59:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T03:01:00+02:00",
    ]  # fmt: skip


def test_fall_back_a_repeated_time_fires_once_at_its_first_occurrence() -> None:
    # New York, 1 November 2026: 02:00 EDT falls back to 01:00 EST; 01:xx happens twice
    assert _fires("*/30 1 * * *", "2026-11-01T00:00", NEW_YORK, 3) == [
        "2026-11-01T01:00:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-02T01:00:00-05:00",
    ]  # fmt: skip
    # from inside the second 01:xx (EST), the first occurrence is behind: next is 02:00 EST
    second = dt.datetime(2026, 11, 1, 1, 10, tzinfo=NEW_YORK, fold=1).timestamp()
    assert dt.datetime.fromtimestamp(next_fire("0 * * * *", second, "America/New_York"), NEW_YORK).isoformat() == (
        "2026-11-01T02:00:00-05:00"
    )


def test_hourly_over_dst_days_counts() -> None:
    def day_count(day: str, tz: ZoneInfo) -> int:
        start, end = _local(f"{day}T00:00", tz) - 1, _local(f"{day}T23:59", tz)
        count, t = 0, start
        while (t := next_fire("0 * * * *", t, tz.key)) <= end:
            count += 1
        return count

    assert day_count("2026-03-29", BERLIN) == 23  # 02:00 does not exist (its gap ends at 03:00, which fires)
    assert day_count("2026-10-25", BERLIN) == 24  # 25 hours long, 02:00 fires once
    assert day_count("2026-06-01", BERLIN) == 24
