"""The copy's durability ledger: which finished writes a FLUSH made durable (pure, no I/O).

Theory of operation:

* A write only counts once a FLUSH that was sent after it completed has
  succeeded (doc/proto.md, "NBD_CMD_FLUSH": the server "MUST NOT send a
  flush reply until all write commands which it has completed ... have
  been persisted"). An unflushed server may lose completed writes when the
  connection drops.
* Every target connection has a *generation*: the endpoint bumps it when it
  reconnects. The engine tells the ledger the generation it sees before
  each step (:meth:`Ledger.reconnected`); the ledger itself never does I/O.
* An entry (a finished work item) is in exactly one place: *unbatched*
  (recorded, no FLUSH covers it yet), in the *batch* of one running FLUSH,
  in the *redo* queue (to be written again), or gone, its range merged into
  :attr:`Ledger.durable`.
* :meth:`~Ledger.record` puts an entry that began in the current generation
  in unbatched; one that began in an older generation (its connection is
  gone) straight into redo. :meth:`~Ledger.begin_flush` moves everything
  unbatched into a new batch; :meth:`~Ledger.flush_ok` makes that batch
  durable, :meth:`~Ledger.flush_failed` queues it for redo (a failed FLUSH
  on a live connection: its writes may be lost). When the generation moves
  on, every entry that is not durable goes to redo, and the batches of the
  FLUSHes still running are emptied (their success covers nothing).
* Memory: the ledger holds only entries that are not durable yet; the
  engine bounds those by flushing once enough wait (bytes or count), and
  durable ranges are merged as they accumulate.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar


class Entry(Protocol):
    """A finished write as the ledger sees it."""

    @property
    def offset(self) -> int:
        """Where its range starts."""

    @property
    def length(self) -> int:
        """Its range's length."""

    @property
    def weight(self) -> int:
        """Bytes that would be sent again if it were lost (what triggers a FLUSH)."""


E = TypeVar("E", bound=Entry)


class RangeSet:
    """A set of byte ranges, merged when read (and, amortised, as it grows)."""

    def __init__(self) -> None:
        self._spans: list[tuple[int, int]] = []
        self._limit = 4096  # merge when the list grows past this (amortised: twice the merged size)

    def add(self, offset: int, length: int) -> None:
        """Add ``[offset, offset + length)``."""
        self._spans.append((offset, offset + length))
        if len(self._spans) > self._limit:
            self._spans = self._merged()
            self._limit = max(4096, 2 * len(self._spans))

    def _merged(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for start, end in sorted(self._spans):
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], end))
            else:
                out.append((start, end))
        return out

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The set as sorted, disjoint, non-adjacent ``(offset, length)`` ranges."""
        self._spans = self._merged()
        return tuple((start, end - start) for start, end in self._spans)


class Ledger(Generic[E]):
    """Durability bookkeeping of one copy; see the module docstring."""

    def __init__(self, generation: int) -> None:
        #: The target's connection generation the ledger last heard of.
        self.generation = generation
        #: Ranges made durable by a FLUSH, or left alone by the copy (nothing to write there).
        self.durable = RangeSet()
        #: Entries to write again, oldest first.
        self.redo: collections.deque[E] = collections.deque()
        self._unbatched: list[E] = []
        self._unbatched_weight = 0
        self._batches: dict[int, list[E]] = {}
        self._tokens = itertools.count()

    @property
    def unbatched(self) -> int:
        """Entries no FLUSH covers yet."""
        return len(self._unbatched)

    @property
    def unbatched_weight(self) -> int:
        """Their weight in bytes."""
        return self._unbatched_weight

    @property
    def flushes(self) -> int:
        """FLUSHes begun and not yet finished."""
        return len(self._batches)

    @property
    def held(self) -> int:
        """Entries the ledger holds (not durable): unbatched, batched and to redo."""
        return len(self._unbatched) + sum(map(len, self._batches.values())) + len(self.redo)

    @property
    def settled(self) -> bool:
        """Nothing left to write or to flush: every recorded entry is durable."""
        return self.held == 0

    def reconnected(self, generation: int) -> Sequence[E]:
        """Hear the target's generation; if it moved on, queue every entry not
        durable for redo and return them (the engine uncounts them)."""
        if generation == self.generation:
            return ()  # the engine asks before every step: nothing allocated
        if generation < self.generation:
            raise ValueError(f"generation {generation} is older than {self.generation}")
        self.generation = generation
        lost = [entry for batch in self._batches.values() for entry in batch]
        lost += self._unbatched
        self._batches = {token: [] for token in self._batches}
        self._unbatched = []
        self._unbatched_weight = 0
        self.redo.extend(lost)
        return lost

    def record(self, entry: E, *, began: int) -> bool:
        """``entry`` finished; its writes began in generation ``began``.

        False when that connection is gone: the entry is queued for redo.
        """
        if began != self.generation:
            if began > self.generation:
                raise ValueError(f"generation {began} is newer than {self.generation}: call reconnected() first")
            self.redo.append(entry)
            return False
        self._unbatched.append(entry)
        self._unbatched_weight += entry.weight
        return True

    def skip(self, offset: int, length: int) -> None:
        """A range the copy leaves as it is: complete without a write."""
        self.durable.add(offset, length)

    def begin_flush(self) -> int:
        """A FLUSH is about to be sent: it covers every unbatched entry. Returns its token."""
        token = next(self._tokens)
        self._batches[token] = self._unbatched
        self._unbatched = []
        self._unbatched_weight = 0
        return token

    def flush_ok(self, token: int) -> None:
        """The FLUSH succeeded: its batch is durable (nothing, if the generation moved on since)."""
        for entry in self._batches.pop(token):
            self.durable.add(entry.offset, entry.length)

    def flush_failed(self, token: int) -> list[E]:
        """The FLUSH failed: its batch is queued for redo and returned."""
        lost = self._batches.pop(token)
        self.redo.extend(lost)
        return lost

    def take_redo(self) -> E | None:
        """The oldest entry to write again, or None."""
        return self.redo.popleft() if self.redo else None
