"""GFS retention ``select`` by property against a model over random point histories (up to 3 years),
and worked examples of the prune rules."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from sendense_nbd.policy.model import Retention
from sendense_nbd.policy.retention import Candidate, Kept, select

START = 1767225600  # 2026-01-01T00:00Z
YEARS3 = 3 * 366 * 86400
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe")
#: The model's periods, written with strftime (ISO week: %G-%V).
FORMATS = (("daily", "%Y-%m-%d"), ("weekly", "%G-%V"), ("monthly", "%Y-%m"), ("yearly", "%Y"))


def model(points: list[Candidate], rules: Retention, zone: str) -> tuple[dict[str, str], list[str]]:
    """PBS prune, by periods: each rule takes the eligible points (not kept, not passed over, not in a
    period a kept point covers), groups them by period newest first, keeps the newest point of its
    first N periods and passes over the rest of those periods."""
    order = sorted(points, key=lambda p: (p.time, p.id), reverse=True)
    if not any((rules.keep_last, rules.keep_daily, rules.keep_weekly, rules.keep_monthly, rules.keep_yearly)):
        return {p.id: "all" for p in order}, []
    tz = ZoneInfo(zone)
    kept = {p.id: "last" for p in order[: rules.keep_last]}
    passed: set[str] = set()
    for name, form in FORMATS:
        n = getattr(rules, f"keep_{name}")
        if n == 0:
            continue

        def period(p: Candidate, form: str = form) -> str:
            return dt.datetime.fromtimestamp(p.time, tz).strftime(form)

        covered = {period(p) for p in order if p.id in kept}
        eligible = [p for p in order if p.id not in kept and p.id not in passed and period(p) not in covered]
        periods = list(dict.fromkeys(period(p) for p in eligible))[:n]
        for key in periods:
            members = [p for p in eligible if period(p) == key]
            kept[members[0].id] = name
            passed.update(p.id for p in members[1:])
    return kept, [p.id for p in reversed(order) if p.id not in kept]


HISTORIES = st.lists(
    st.one_of(
        st.integers(0, YEARS3),  # anywhere in 3 years
        st.integers(0, 20).map(lambda d: YEARS3 - d * 3600),  # a burst of hourly points at the end
    ),
    max_size=80,
    unique=True,
).map(lambda offsets: [Candidate(f"p{i:03d}", START + float(t)) for i, t in enumerate(offsets)])
RULES = st.builds(
    Retention,
    keep_last=st.integers(0, 5),
    keep_daily=st.integers(0, 10),
    keep_weekly=st.integers(0, 8),
    keep_monthly=st.integers(0, 14),
    keep_yearly=st.integers(0, 3),
)
EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True)


@EXAMPLES
@given(points=HISTORIES, rules=RULES, zone=st.sampled_from(ZONES))
def test_select_equals_the_model(points: list[Candidate], rules: Retention, zone: str) -> None:
    kept = select(points, rules, timezone=zone)
    expected_keep, expected_remove = model(points, rules, zone)
    assert {k: v[0] for k, v in kept.keep.items()} == expected_keep
    assert all(len(v) == 1 for v in kept.keep.values())
    assert list(kept.remove) == expected_remove
    assert set(kept.keep) | set(kept.remove) == {p.id for p in points}
    assert not set(kept.keep) & set(kept.remove)


@EXAMPLES
@given(points=HISTORIES.filter(bool), rules=RULES, zone=st.sampled_from(ZONES))
def test_newest_kept_rules_bounded_and_idempotent(points: list[Candidate], rules: Retention, zone: str) -> None:
    kept = select(points, rules, timezone=zone)
    assert max(points, key=lambda p: (p.time, p.id)).id in kept.keep
    for rule in ("last", "daily", "weekly", "monthly", "yearly"):
        assert sum(rule in why for why in kept.keep.values()) <= getattr(rules, f"keep_{rule}")
    survivors = [p for p in points if p.id in kept.keep]
    again = select(survivors, rules, timezone=zone)
    assert again.remove == () and again.keep == kept.keep
    times = {p.id: p.time for p in points}
    assert [times[i] for i in kept.remove] == sorted(times[i] for i in kept.remove)  # oldest first


def _daily(days: int, *, hour: int = 22) -> list[Candidate]:
    """One point a day at ``hour`` UTC for ``days`` days ending 2026-06-30 (a Tuesday)."""
    end = dt.datetime(2026, 6, 30, hour, tzinfo=dt.UTC)
    return [Candidate(f"d{i:03d}", (end - dt.timedelta(days=i)).timestamp()) for i in range(days)]


def _dates(points: list[Candidate], kept: Kept) -> dict[str, tuple[str, ...]]:
    when = {p.id: dt.datetime.fromtimestamp(p.time, dt.UTC).date().isoformat() for p in points}
    return {when[i]: why for i, why in sorted(kept.keep.items(), key=lambda item: when[item[0]], reverse=True)}


def test_gfs_over_daily_backups() -> None:
    points = _daily(120)
    kept = select(points, Retention(keep_last=2, keep_daily=3, keep_weekly=2, keep_monthly=2))
    assert _dates(points, kept) == {
        "2026-06-30": ("last",), "2026-06-29": ("last",),  # Tue, Mon: last 2, their week is covered
        "2026-06-28": ("daily",), "2026-06-27": ("daily",), "2026-06-26": ("daily",),
        "2026-06-21": ("weekly",), "2026-06-14": ("weekly",),  # the Sundays of the two weeks before
        "2026-05-31": ("monthly",), "2026-04-30": ("monthly",),  # June is covered: May, April
    }  # fmt: skip
    assert len(kept.remove) == 120 - 9 and kept.remove[0] == "d119"


def test_several_points_a_day_keep_the_newest_of_each_day() -> None:
    base = dt.datetime(2026, 3, 10, tzinfo=dt.UTC).timestamp()
    points = [Candidate(f"h{i}", base + i * 6 * 3600) for i in range(12)]  # 4 a day for 3 days
    kept = select(points, Retention(keep_daily=2))
    assert kept.keep == {"h11": ("daily",), "h7": ("daily",)}
    assert kept.remove == ("h0", "h1", "h2", "h3", "h4", "h5", "h6", "h8", "h9", "h10")


def test_days_are_local_to_the_time_zone() -> None:
    # 23:30 UTC is already the next day in Berlin: two UTC days are one Berlin day
    first = dt.datetime(2026, 3, 10, 1, 0, tzinfo=dt.UTC).timestamp()
    points = [Candidate("a", first), Candidate("b", first - 1.5 * 3600)]  # 01:00 and 23:30 the day before
    assert select(points, Retention(keep_daily=5)).remove == ()
    assert select(points, Retention(keep_daily=5), timezone="Europe/Berlin").remove == ("b",)


def test_no_rule_keeps_everything_and_an_empty_history_is_fine() -> None:
    points = _daily(5)
    assert select(points, Retention()) == Kept({p.id: ("all",) for p in points}, ())
    assert select([], Retention(keep_last=3)) == Kept({}, ())
    assert Retention().keeps_all and not Retention(keep_yearly=1).keeps_all
