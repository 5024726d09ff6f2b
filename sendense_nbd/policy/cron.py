"""A small 5-field cron: ``minute hour day-of-month month day-of-week``, in a time zone.

Fields take ``*``, numbers, ranges ``a-b``, steps ``*/n``, ``a-b/n`` and
``a/n`` (``a`` to the field's end), and comma lists; months take ``jan``-``dec``
and weekdays ``sun``-``sat`` (0 and 7 are Sunday). ``@hourly``, ``@daily``
(``@midnight``), ``@weekly``, ``@monthly`` and ``@yearly`` (``@annually``)
stand for their usual expressions. As in Vixie cron, when both day fields are
restricted (neither starts with ``*``) a day matching either one fires.

Local times across a DST change: a time the change skips (spring forward)
fires once, at the first instant after the gap, however many of its minutes
match (as cron does); a time that occurs twice (fall back) fires once, at its
first occurrence.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import attrs

#: The longest expression accepted.
MAX_EXPRESSION = 256
#: Days searched for the next match: 29 February can be 8 years away (2096 -> 2104).
SEARCH_DAYS = 9 * 366

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
#: Days of each month in a leap year: what a day-of-month field can ever reach.
LONGEST_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@attrs.frozen
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    #: The first name's number (1 for months, 0 for weekdays).
    first: int = 0


FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, MONTHS, 1),
    _Field("day of week", 0, 7, WEEKDAYS, 0),
)


@attrs.frozen
class Cron:
    """A parsed expression: the values each field matches."""

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    #: 0 is Sunday (a 7 in the expression is folded onto 0).
    weekdays: frozenset[int]
    days_restricted: bool
    weekdays_restricted: bool

    def matches_day(self, day: dt.date) -> bool:
        """Whether ``day`` (a local date) is one this expression fires on."""
        if day.month not in self.months:
            return False
        in_days = day.day in self.days
        in_weekdays = day.isoweekday() % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_days or in_weekdays
        return in_days and in_weekdays

    def matches(self, local: dt.datetime) -> bool:
        """Whether the local wall-clock time ``local`` (its minute) matches every field."""
        return local.minute in self.minutes and local.hour in self.hours and self.matches_day(local.date())

    def fires(self, after: float, tz: ZoneInfo) -> Iterator[float]:
        """The instants (epoch seconds) this expression fires at, strictly after ``after``, in order."""
        start = dt.datetime.fromtimestamp(after, tz)
        day, last = start.date(), after
        # wall times before the start's own are behind it (local minutes map to instants in order)
        first_hour, first_minute = bisect.bisect_left(self.hours, start.hour), start.minute
        idle = 0  # days searched since the last match
        while idle < SEARCH_DAYS:
            idle += 1
            if self.matches_day(day):
                for hour in self.hours[first_hour:]:
                    if _instant(day, hour, self.minutes[-1], tz) <= last:
                        continue  # the whole hour is behind us
                    skip = bisect.bisect_left(self.minutes, first_minute) if hour == start.hour else 0
                    for minute in self.minutes[skip:]:
                        instant = _instant(day, hour, minute, tz)
                        if instant > last:
                            last, idle = instant, 0
                            yield instant
            day += dt.timedelta(days=1)
            first_hour, first_minute = 0, 0
        raise ValueError(f"cron {self.expression!r} does not fire within {SEARCH_DAYS} days")

    def next_fire(self, after: float, tz: ZoneInfo) -> float:
        """The first instant strictly after ``after`` this expression fires at."""
        return next(self.fires(after, tz))


@functools.lru_cache(maxsize=1024)
def parse(expression: str) -> Cron:
    """A :class:`Cron` from its text; ValueError (naming the field) if it is malformed or never fires.

    Results are cached: a scheduler asks for the same few expressions again and again.
    """
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"a cron expression has at most {MAX_EXPRESSION} characters")
    text = MACROS.get(expression.strip().lower(), expression)
    parts = text.split()
    if len(parts) != 5:
        raise ValueError("a cron expression has 5 fields (minute hour day-of-month month day-of-week) or is a @macro")
    values = [_parse_field(part, field) for part, field in zip(parts, FIELDS, strict=True)]
    cron = Cron(
        expression=expression,
        minutes=tuple(sorted(values[0])),
        hours=tuple(sorted(values[1])),
        days=frozenset(values[2]),
        months=frozenset(values[3]),
        weekdays=frozenset(v % 7 for v in values[4]),
        days_restricted=not parts[2].startswith("*"),
        weekdays_restricted=not parts[4].startswith("*"),
    )
    if cron.days_restricted and not cron.weekdays_restricted:
        if not any(day <= LONGEST_MONTH[month - 1] for month in cron.months for day in cron.days):
            raise ValueError(f"cron {expression!r} never fires: no chosen month has any of its days")
    return cron


def next_fire(expression: str, after: float, tz: str) -> float:
    """The first local minute matching ``expression`` strictly after ``after``, in time zone ``tz``."""
    return parse(expression).next_fire(after, ZoneInfo(tz))


def _parse_field(text: str, field: _Field) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        step = _number(step_text, field, step=True) if step_text else 1
        if span == "*":
            low, high = field.low, field.high
        elif "-" in span:
            start, _, end = span.partition("-")
            low, high = _number(start, field), _number(end, field)
            if low > high:
                raise ValueError(f"cron {field.name}: range {span!r} runs backwards")
        else:
            low = _number(span, field)
            high = field.high if step_text else low
        values.update(range(low, high + 1, step))
    return values


def _number(text: str, field: _Field, *, step: bool = False) -> int:
    lowered = text.lower()
    if not step and lowered in field.names:
        return field.names.index(lowered) + field.first
    if not text.isascii() or not text.isdigit() or len(text) > 4:
        raise ValueError(f"cron {field.name}: {text[:20]!r} is not a number{' or a name' if field.names else ''}")
    value = int(text)
    low, high = (1, field.high - field.low + 1) if step else (field.low, field.high)
    if not low <= value <= high:
        raise ValueError(f"cron {field.name}: {value} is outside {low}-{high}")
    return value


def _instant(day: dt.date, hour: int, minute: int, tz: ZoneInfo) -> float:
    """The epoch time of a local wall-clock minute: its first occurrence, or the gap's end if it has none."""
    naive = dt.datetime(day.year, day.month, day.day, hour, minute)
    instant = naive.replace(tzinfo=tz).timestamp()  # fold 0: the first occurrence
    if dt.datetime.fromtimestamp(instant, tz).replace(tzinfo=None) == naive:
        return instant
    # In a gap: fold 0 read it with the offset before the change (an instant after the gap),
    # fold 1 with the offset after it (an instant before the gap); the change lies between.
    before, after = int(naive.replace(tzinfo=tz, fold=1).timestamp()), int(instant)
    offset = dt.datetime.fromtimestamp(after, tz).utcoffset()
    while after - before > 1:
        middle = (before + after) // 2
        if dt.datetime.fromtimestamp(middle, tz).utcoffset() == offset:
            after = middle
        else:
            before = middle
    return float(after)
