"""The copy's durability ledger (pure): worked examples, then random sequences
checked against a model of a target that loses its unflushed writes when the
connection drops (hypothesis, derandomized: the same examples every run)."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sendense_nbd.copy.ledger import Ledger, RangeSet

SLOT = 100  # entry i covers [i * SLOT, (i + 1) * SLOT)


@attrs.frozen
class Write:
    slot: int
    weight: int = 10

    @property
    def offset(self) -> int:
        return self.slot * SLOT

    @property
    def length(self) -> int:
        return SLOT


def slots(ranges: tuple[tuple[int, int], ...]) -> set[int]:
    return {slot for offset, length in ranges for slot in range(offset // SLOT, (offset + length) // SLOT)}


def test_a_flush_covers_only_the_writes_recorded_before_it_began() -> None:
    ledger: Ledger[Write] = Ledger(0)
    assert ledger.record(Write(0), began=0) and ledger.record(Write(1), began=0)
    assert (ledger.unbatched, ledger.unbatched_weight) == (2, 20)
    first = ledger.begin_flush()
    assert ledger.record(Write(2), began=0)
    assert (ledger.unbatched, ledger.flushes) == (1, 1)
    ledger.flush_ok(first)
    assert ledger.durable.ranges() == ((0, 2 * SLOT),)
    assert ledger.held == 1 and not ledger.settled
    ledger.flush_ok(ledger.begin_flush())
    assert ledger.durable.ranges() == ((0, 3 * SLOT),) and ledger.settled and ledger.flushes == 0


def test_a_failed_flush_queues_its_batch_again() -> None:
    ledger: Ledger[Write] = Ledger(0)
    ledger.record(Write(0), began=0)
    token = ledger.begin_flush()
    ledger.record(Write(1), began=0)
    assert ledger.flush_failed(token) == [Write(0)]
    assert list(ledger.redo) == [Write(0)] and ledger.unbatched == 1
    assert ledger.take_redo() == Write(0) and ledger.take_redo() is None
    assert ledger.durable.ranges() == ()


def test_a_reconnect_queues_everything_not_durable_and_voids_running_flushes() -> None:
    ledger: Ledger[Write] = Ledger(3)
    ledger.record(Write(0), began=3)
    ledger.flush_ok(ledger.begin_flush())
    ledger.record(Write(1), began=3)
    running = ledger.begin_flush()
    ledger.record(Write(2), began=3)
    assert ledger.reconnected(3) == ()
    assert ledger.reconnected(4) == [Write(1), Write(2)]
    assert ledger.unbatched == 0 and ledger.unbatched_weight == 0 and list(ledger.redo) == [Write(1), Write(2)]
    ledger.flush_ok(running)  # it ran on the old connection (or the new one): it covers nothing lost
    assert ledger.durable.ranges() == ((0, SLOT),) and ledger.flushes == 0
    with pytest.raises(ValueError, match="older"):
        ledger.reconnected(3)


def test_a_write_begun_on_a_lost_connection_goes_straight_to_redo() -> None:
    ledger: Ledger[Write] = Ledger(0)
    ledger.reconnected(1)
    assert not ledger.record(Write(5), began=0)
    assert list(ledger.redo) == [Write(5)] and ledger.unbatched == 0
    with pytest.raises(ValueError, match="reconnected"):
        ledger.record(Write(6), began=2)


def test_skipped_ranges_are_complete_without_an_entry() -> None:
    ledger: Ledger[Write] = Ledger(0)
    ledger.skip(0, 50)
    ledger.skip(50, 50)
    ledger.skip(300, 10)
    assert ledger.durable.ranges() == ((0, 100), (300, 10)) and ledger.settled


def test_a_range_set_merges_as_it_grows() -> None:
    ranges = RangeSet()
    for i in range(10_000):
        ranges.add(2 * i * 10, 10)  # never adjacent: nothing merges
        ranges.add((2 * i + 1) * 10, 10)  # now every pair touches
    assert ranges.ranges() == ((0, 200_000),)


class LedgerAgainstTarget(RuleBasedStateMachine):
    """The engine's use of the ledger, against the truth of what the target keeps.

    The model target holds each completed write as volatile until a FLUSH
    sent after it succeeds on the same connection, and loses its volatile
    writes when the connection drops (a new generation).
    """

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0
        self.ledger: Ledger[Write] = Ledger(0)
        self.clock = 0
        self.started = 0  # slots handed out so far
        self.in_hand: dict[int, tuple[Write, int]] = {}  # slot -> (entry, generation its write began in)
        self.volatile: dict[int, tuple[int, int]] = {}  # slot -> (generation, completion time)
        self.stable: set[int] = set()
        self.flushes: dict[int, tuple[int, int]] = {}  # token -> (generation, time it was sent)

    def sync(self) -> None:
        """What the engine does before every step: tell the ledger the generation."""
        lost = self.ledger.reconnected(self.generation)
        if lost:  # everything not durable is queued again, nothing stays unbatched or batched
            assert self.ledger.held == len(self.ledger.redo)

    @rule()
    def start_new(self) -> None:
        self.in_hand[self.started] = (Write(self.started), self.generation)
        self.started += 1

    @rule()
    def start_redo(self) -> None:
        self.sync()
        entry = self.ledger.take_redo()
        if entry is not None:
            assert entry.slot not in self.in_hand
            self.in_hand[entry.slot] = (entry, self.generation)

    @precondition(lambda self: self.in_hand)
    @rule(pick=st.integers(0, 1 << 16))
    def finish(self, pick: int) -> None:
        slot = sorted(self.in_hand)[pick % len(self.in_hand)]
        entry, began = self.in_hand.pop(slot)
        self.clock += 1
        if began == self.generation:
            self.volatile[slot] = (began, self.clock)
        self.sync()
        assert self.ledger.record(entry, began=began) == (began == self.generation)

    @rule()
    def begin_flush(self) -> None:
        self.sync()
        self.clock += 1
        self.flushes[self.ledger.begin_flush()] = (self.generation, self.clock)

    @precondition(lambda self: self.flushes)
    @rule(pick=st.integers(0, 1 << 16), ok=st.booleans())
    def end_flush(self, pick: int, ok: bool) -> None:
        token = sorted(self.flushes)[pick % len(self.flushes)]
        generation, sent = self.flushes.pop(token)
        self.sync()
        if not ok:
            self.ledger.flush_failed(token)
            return
        if generation == self.generation:  # the connection it was sent on is still up
            for slot, (written_in, done) in list(self.volatile.items()):
                if written_in == generation and done < sent:
                    self.stable.add(slot)
                    del self.volatile[slot]
        self.ledger.flush_ok(token)

    @rule()
    def reconnect(self) -> None:
        self.generation += 1
        self.volatile.clear()  # the unflushed server lost them
        self.sync()

    @invariant()
    def nothing_is_durable_that_the_target_could_lose(self) -> None:
        assert slots(self.ledger.durable.ranges()) <= self.stable

    @invariant()
    def every_write_is_in_exactly_one_place_and_durable_ones_are_let_go(self) -> None:
        durable = len(slots(self.ledger.durable.ranges()))
        assert self.ledger.held + len(self.in_hand) + durable == self.started

    def teardown(self) -> None:
        """Whatever happened, finishing the work the ledger hands back makes every write durable."""
        for _ in range(3 * self.started + 3):
            for _ in range(len(self.in_hand)):
                self.finish(0)
            while self.ledger.redo:
                self.start_redo()
                self.finish(0)
            self.begin_flush()
            for _ in range(len(self.flushes)):
                self.end_flush(0, True)
            if self.ledger.settled:
                break
        assert self.ledger.settled and not self.in_hand
        assert slots(self.ledger.durable.ranges()) == set(range(self.started)) <= self.stable


LedgerAgainstTarget.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, derandomize=True, deadline=None
)
test_ledger_against_a_target_that_loses_unflushed_writes = LedgerAgainstTarget.TestCase
