"""What a copy reports while it runs: per-item outcomes summed into :class:`Progress` events.

The :class:`Reporter` counts every finished item (and uncounts one that has
to be written again), extrapolates the bytes left to read from the windows
planned so far, and calls the callback synchronously, at most every
``interval`` seconds, plus once at the end whatever happened.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import attrs

from sendense_nbd.copy.plan import Action, WorkItem


@attrs.frozen(slots=True)
class Progress:
    """A snapshot of a running copy; byte counts are of finished items."""

    copied: int  # data written
    zeroed: int  # made zero on the target without sending data
    skipped: int  # left alone (holes and zeroes on a fresh target, unchanged areas)
    total: int
    elapsed: float
    #: Bytes of data per second: zeroes and skipped bytes do not count.
    rate: float
    #: Seconds left for the data still to copy (None before there is a rate).
    eta: float | None
    done: bool = False
    #: Set on the final event of a failed copy.
    error: str | None = None
    #: Bytes the copy reads and checks (holes and unchanged areas excluded): what the ETA counts down.
    to_read: int = 0

    @property
    def processed(self) -> int:
        """Bytes of the disk finished, whatever became of them."""
        return self.copied + self.zeroed + self.skipped

    @property
    def percent(self) -> float:
        """``processed`` as a percentage of ``total``."""
        return 100.0 if self.total == 0 else 100.0 * self.processed / self.total


ProgressCallback = Callable[[Progress], None]


@attrs.frozen(slots=True)
class Outcome:
    """What one finished work item did; the durability ledger's entry."""

    item: WorkItem
    #: The target's connection generation the item's writes began in.
    generation: int
    copied: int
    zeroed: int
    skipped: int

    @property
    def offset(self) -> int:
        """Where the item starts."""
        return self.item.offset

    @property
    def length(self) -> int:
        """The item's length."""
        return self.item.length

    @property
    def weight(self) -> int:
        """Data bytes: what losing the item costs (zeroed areas are cheap to redo)."""
        return self.copied


class Reporter:
    """Sums outcomes and delivers :class:`Progress` to a callback, rate-limited."""

    def __init__(self, callback: ProgressCallback | None, *, total: int, scope: int, interval: float) -> None:
        self.callback = callback
        self.total = total
        self.scope = scope  # bytes the windows will plan
        self.planned_scope = 0
        self.planned_copy = 0
        self.interval = interval
        self.start = time.monotonic()
        self.last = -math.inf
        self.copied = self.zeroed = self.skipped = 0
        self.copy_processed = 0  # bytes of COPY items finished, whatever they turned into

    def planned(self, copy_bytes: int, scope_bytes: int) -> None:
        """One more window is planned: ``copy_bytes`` to read of its ``scope_bytes``."""
        self.planned_copy += copy_bytes
        self.planned_scope += scope_bytes

    @property
    def copy_total(self) -> int:
        """Bytes to read: exact once every window is planned, extrapolated before."""
        if not self.planned_scope or self.planned_scope >= self.scope:
            return self.planned_copy
        unplanned = self.scope - self.planned_scope
        return self.planned_copy + unplanned * self.planned_copy // self.planned_scope

    def count(self, outcome: Outcome, sign: int = 1) -> None:
        """Add a finished item (``sign=-1``: take back one that must be written again)."""
        self.copied += sign * outcome.copied
        self.zeroed += sign * outcome.zeroed
        self.skipped += sign * outcome.skipped
        if outcome.item.action is Action.COPY:
            self.copy_processed += sign * outcome.item.length

    def snapshot(self, done: bool = False, error: str | None = None) -> Progress:
        """The counts now."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.copied / elapsed
        copy_total = self.copy_total
        left = max(0, copy_total - self.copy_processed)
        eta = 0.0 if done or left == 0 else (left / rate if rate > 0 else None)
        return Progress(self.copied, self.zeroed, self.skipped, self.total, elapsed, rate, eta, done, error, copy_total)

    def maybe_report(self) -> None:
        """Call back if ``interval`` has passed since the last event."""
        now = time.monotonic()
        if self.callback is not None and now - self.last >= self.interval:
            self.last = now
            self.callback(self.snapshot())

    def final(self, error: str | None = None) -> None:
        """The last event (``done``; with ``error`` when the copy failed)."""
        if self.callback is not None:
            self.callback(self.snapshot(done=True, error=error))
