"""Copy chains: which copy starts a chain, how long a chain is locked, when it may go (pure).

A chain is a full copy and the incremental copies on it, in order. It is
locked as a unit: every object of it is locked until :func:`lock_until` of
its newest copy (when it was made: a point copied late still gets its whole
``retain``), so no base can expire (and be deleted) while a copy above
it is still locked; each new point extends the whole chain, before its own
upload starts. A chain whose lock has lapsed (or nearly: within half the
margin) takes no copy: the next one starts a new chain. A chain takes
at most ``length`` points (:meth:`~sendense_nbd.policy.offsite.CopyTarget.chain_length`):
then it is sealed and the next copy starts a new chain with a full. A chain
is also sealed when the local point to copy does not build on the chain's
newest copy (the local repository made a full: a CBT reset, a damaged base)
or when a copy of it failed.

Offsite chains never merge: the local repository's retention merges its
own qcow2 files, never the bucket's. A sealed chain whose lock has expired
is deleted as a whole (:func:`expired`): nothing locked is ever rewritten.
"""

from __future__ import annotations

import attrs

from sendense_nbd.policy.offsite import CopyTarget


@attrs.frozen
class Chain:
    """A chain as the hub records it: its ID, its copies' point IDs in order, when its newest copy was made."""

    chain_id: str
    points: tuple[str, ...]
    newest: float
    sealed: bool


def starts_chain(chain: Chain | None, backing: str | None, length: int, *, now: float, target: CopyTarget) -> bool:
    """Whether the copy of a point whose local base is ``backing`` starts a new chain (a full copy)
    rather than joining ``chain`` (the disk's newest chain, locked through ``target``) at ``now``: also
    when the chain's lock has lapsed or is within half the margin of lapsing (its objects may be
    deleted by then: a copy must not build on them)."""
    if chain is None or chain.sealed or not chain.points or len(chain.points) >= length:
        return True
    if now >= lock_until(chain.newest, target) - target.margin / 2:
        return True
    return backing != chain.points[-1]


def lock_until(newest: float, target: CopyTarget) -> float:
    """Until when every object of a chain whose newest copy was made at ``newest`` is locked."""
    return newest + target.retain + target.margin


def expired(chain: Chain, target: CopyTarget, now: float) -> bool:
    """Whether offsite retention may delete the chain: sealed (no copy will join it) and its lock over."""
    return chain.sealed and lock_until(chain.newest, target) <= now
