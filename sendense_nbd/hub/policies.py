"""Backup policies in the hub's store, with their schedules' state and their runs.

A policy (:class:`~sendense_nbd.policy.model.Policy`) is kept as its JSON.
Each of its schedules (``backup``, and ``verify`` when it has one) has a row
of state: the last slot the scheduler took, when it last started a run, the
next run, and a note saying what it did (a run, a missed slot, a closed
window). A run is one slot's work: the VMs it resolved, each queued, started
(with its job) or done.

Several hubs may share the store: a slot is taken by the one hub whose
conditional update of the schedule's ``last_slot`` finds the value it read
(:meth:`PolicyStore.claim_run`), and each VM of a run is started by the one hub
that moves it from queued to started (:meth:`PolicyStore.claim_item`); a run's
owner is the hub that opened it, or the hub that took a lost one over.
"""

from __future__ import annotations

import enum
import json
import logging
import uuid
from typing import Any

import attrs

from sendense_nbd.errors import BadRequest, Conflict, UnknownPolicy
from sendense_nbd.hub.db import Connection, Database, rows
from sendense_nbd.policy.model import Policy

log = logging.getLogger(__name__)

#: How many runs a policy keeps in the store (older ones are pruned when a run is opened).
RUN_HISTORY = 200


class Purpose(enum.Enum):
    """What a schedule of a policy runs."""

    BACKUP = "backup"
    VERIFY = "verify"


class RunState(enum.Enum):
    """A run is open while it has VMs queued or started."""

    OPEN = "open"
    DONE = "done"


class ItemState(enum.Enum):
    """One VM of a run."""

    QUEUED = "queued"
    STARTED = "started"
    DONE = "done"
    SKIPPED = "skipped"


@attrs.frozen
class StoredPolicy:
    """A policy as the store keeps it: its spec and when it was made and last changed."""

    policy: Policy
    created: float
    updated: float


@attrs.frozen
class ScheduleState:
    """Where one schedule of a policy is."""

    policy: str
    purpose: Purpose
    last_slot: float
    next_run: float | None = None
    last_run: float | None = None
    note: str | None = None

    def to_json(self) -> dict[str, object]:
        """As the API shows it (times as epoch seconds)."""
        return {"next_run": self.next_run, "last_run": self.last_run, "last_slot": self.last_slot, "note": self.note}


@attrs.frozen
class RunItem:
    """One VM of a run and its job."""

    run_id: str
    vm_path: str
    state: ItemState
    job_id: str | None = None
    note: str | None = None
    #: The hub that started the VM's job (None: not started yet, or before hubs had IDs).
    hub: str | None = None

    def to_json(self) -> dict[str, object]:
        """``{"vm_path", "state", "job_id", "note", "hub"}``."""
        return {"vm_path": self.vm_path, "state": self.state.value, "job_id": self.job_id, "note": self.note,
                "hub": self.hub}  # fmt: skip


@attrs.frozen
class Run:
    """One slot's work of a policy's schedule."""

    id: str
    policy: str
    purpose: Purpose
    slot: float | None
    started: float
    window_end: float | None
    state: RunState
    ended: float | None = None
    note: str | None = None
    items: tuple[RunItem, ...] = ()
    #: The hub that opened the run, or took it over from a lost one.
    owner: str | None = None

    def to_json(self) -> dict[str, object]:
        """The run with its VMs."""
        return {
            "id": self.id,
            "policy": self.policy,
            "purpose": self.purpose.value,
            "slot": self.slot,
            "started": self.started,
            "window_end": self.window_end,
            "ended": self.ended,
            "state": self.state.value,
            "note": self.note,
            "owner": self.owner,
            "items": [item.to_json() for item in self.items],
        }


def _run_from_row(row: dict[str, Any], items: list[dict[str, Any]]) -> Run:
    return Run(
        row["id"], row["policy"], Purpose(row["purpose"]), row["slot"], row["started"], row["window_end"],
        RunState(row["state"]), row["ended"], row["note"],
        tuple(RunItem(i["run_id"], i["vm_path"], ItemState(i["state"]), i["job_id"], i["note"], i.get("hub"))
              for i in items),
        row.get("owner"),
    )  # fmt: skip


class PolicyStore:
    """The ``policies``, ``schedule_state``, ``runs`` and ``run_items`` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- policies ----------------------------------------------------------------

    async def add(self, policy: Policy, now: float) -> StoredPolicy:
        """Store a new policy; its schedules start after ``now``. :class:`Conflict` if the name is taken."""

        def insert(connection: Connection) -> None:
            added = connection.execute(
                "INSERT INTO policies (name, spec, created, updated) VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (policy.name, json.dumps(policy.to_json()), now, now),
            )
            if added.rowcount != 1:
                raise Conflict(f"a policy named {policy.name} exists", "exists")
            for purpose in Purpose:  # a fresh state (a deleted policy's may be left)
                connection.execute(
                    "INSERT INTO schedule_state (policy, purpose, last_slot) VALUES (?, ?, ?) "
                    "ON CONFLICT (policy, purpose) DO UPDATE SET last_slot = excluded.last_slot, "
                    "next_run = NULL, last_run = NULL, note = NULL",
                    (policy.name, purpose.value, now),
                )

        await self.db.run(insert)
        return StoredPolicy(policy, now, now)

    async def replace(self, policy: Policy, now: float) -> StoredPolicy:
        """Store an edited policy (its schedules' state stays)."""

        def update(connection: Connection) -> float:
            created = _read_policy(connection, policy.name).created
            connection.execute(
                "UPDATE policies SET spec = ?, updated = ? WHERE name = ?",
                (json.dumps(policy.to_json()), now, policy.name),
            )
            return created

        return StoredPolicy(policy, await self.db.run(update), now)

    async def delete(self, name: str) -> None:
        """Remove a policy, its schedules' state and its runs (the jobs stay)."""

        def delete(connection: Connection) -> None:
            _read_policy(connection, name)
            run_ids = [r[0] for r in connection.execute("SELECT id FROM runs WHERE policy = ?", (name,))]
            connection.executemany("DELETE FROM run_items WHERE run_id = ?", [(i,) for i in run_ids])
            for table, column in (("runs", "policy"), ("schedule_state", "policy"), ("policies", "name")):
                connection.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))

        await self.db.run(delete)

    async def get(self, name: str) -> StoredPolicy:
        """One policy; :class:`UnknownPolicy` if there is none."""
        return await self.db.run(lambda connection: _read_policy(connection, name))

    async def all(self) -> list[StoredPolicy]:
        """Every policy, by name; one whose stored spec no longer parses (a time zone gone from tzdata, say)
        is left out and logged, so the others still run."""

        def read(connection: Connection) -> list[StoredPolicy]:
            found = []
            for row in rows(connection.execute("SELECT * FROM policies ORDER BY name")):
                try:
                    found.append(_policy(row))
                except BadRequest as exc:
                    log.error("policy %s is left out: its stored spec no longer parses: %s", row["name"], exc)
            return found

        return await self.db.run(read)

    # -- schedule state ----------------------------------------------------------

    async def state(self, name: str, purpose: Purpose) -> ScheduleState:
        """A schedule's state (:meth:`add` wrote it); :class:`UnknownPolicy` if there is none."""

        def read(connection: Connection) -> list[dict[str, Any]]:
            return rows(
                connection.execute(
                    "SELECT * FROM schedule_state WHERE policy = ? AND purpose = ?", (name, purpose.value)
                )
            )

        found = await self.db.run(read)
        if not found:
            raise UnknownPolicy(f"no policy {name}")
        row = found[0]
        return ScheduleState(name, purpose, row["last_slot"], row["next_run"], row["last_run"], row["note"])

    async def save_state(self, state: ScheduleState, *, was: float | None = None) -> bool:
        """Record where a schedule is; with ``was``, only while its ``last_slot`` still is ``was`` (what the
        caller read: another hub may have moved it on meanwhile). Whether it was recorded."""

        def update(connection: Connection) -> bool:
            sql, args = (
                "UPDATE schedule_state SET last_slot = ?, next_run = ?, last_run = ?, note = ? "
                "WHERE policy = ? AND purpose = ?",
                [state.last_slot, state.next_run, state.last_run, state.note, state.policy, state.purpose.value],
            )
            if was is not None:
                sql, args = sql + " AND last_slot = ?", [*args, was]
            return bool(connection.execute(sql, args).rowcount == 1)

        return await self.db.run(update)

    # -- runs --------------------------------------------------------------------

    async def open_run(
        self, policy: str, purpose: Purpose, vm_paths: list[str], *, slot: float | None, now: float,
        window_end: float | None, note: str | None, owner: str | None = None,
    ) -> Run:  # fmt: skip
        """A new run with its VMs queued (none: the run is done at once), opened by hub ``owner``; old runs past
        the history go. :class:`Conflict` (``run_open``) while the policy has a run of ``purpose`` open."""
        run = _new_run(policy, purpose, vm_paths, slot=slot, now=now, window_end=window_end, note=note, owner=owner)

        def insert(connection: Connection) -> None:
            found = connection.execute(
                "SELECT id FROM runs WHERE policy = ? AND purpose = ? AND state = ?",
                (policy, purpose.value, RunState.OPEN.value),
            ).fetchone()
            if found is not None:
                raise Conflict(f"policy {policy} has a {purpose.value} run open ({found[0]}); wait for it to end",
                               "run_open")  # fmt: skip
            _insert_run(connection, run)

        await self.db.run(insert)
        return run

    async def claim_run(
        self, policy: str, purpose: Purpose, vm_paths: list[str], *, slot: float, was: float, now: float,
        window_end: float | None, note: str | None, owner: str | None = None,
    ) -> Run | None:  # fmt: skip
        """Take a due slot and open its run, both only if the schedule's ``last_slot`` still is ``was`` (what the
        caller read): of several hubs, exactly one takes a slot; None for the others."""
        run = _new_run(policy, purpose, vm_paths, slot=slot, now=now, window_end=window_end, note=note, owner=owner)

        def insert(connection: Connection) -> bool:
            cursor = connection.execute(
                "UPDATE schedule_state SET last_slot = ?, last_run = ? WHERE policy = ? AND purpose = ? "
                "AND last_slot = ?",
                (slot, now, policy, purpose.value, was),
            )
            if cursor.rowcount != 1:
                return False
            _insert_run(connection, run)
            return True

        return run if await self.db.run(insert) else None

    async def run(self, run_id: str) -> Run:
        """One run with its VMs as stored now."""

        def read(connection: Connection) -> Run:
            found = rows(connection.execute("SELECT * FROM runs WHERE id = ?", (run_id,)))
            if not found:
                raise UnknownPolicy(f"no run {run_id[:80]!r}")
            items = rows(connection.execute("SELECT * FROM run_items WHERE run_id = ?", (run_id,)))
            return _run_from_row(found[0], items)

        return await self.db.run(read)

    async def runs(self, *, policy: str | None = None, state: RunState | None = None, limit: int = 50) -> list[Run]:
        """Runs, newest first (of one policy, in one state, when given)."""

        def read(connection: Connection) -> list[Run]:
            sql, args = "SELECT * FROM runs WHERE 1 = 1", []
            for column, value in (("policy", policy), ("state", None if state is None else state.value)):
                if value is not None:
                    sql += f" AND {column} = ?"
                    args.append(value)
            found = rows(connection.execute(sql + " ORDER BY started DESC, seq DESC LIMIT ?", [*args, limit]))
            return [
                _run_from_row(r, rows(connection.execute("SELECT * FROM run_items WHERE run_id = ?", (r["id"],))))
                for r in found
            ]

        return await self.db.run(read)

    async def set_item(self, item: RunItem, *, was: ItemState | None = None) -> bool:
        """Record a VM's new state in its run; with ``was``, only while it still is in that state (another hub
        may have moved it). Whether it was recorded."""

        def update(connection: Connection) -> bool:
            sql = "UPDATE run_items SET state = ?, job_id = ?, note = ?, hub = ? WHERE run_id = ? AND vm_path = ?"
            args = [item.state.value, item.job_id, item.note, item.hub, item.run_id, item.vm_path]
            if was is not None:
                sql, args = sql + " AND state = ?", [*args, was.value]
            return bool(connection.execute(sql, args).rowcount == 1)

        return await self.db.run(update)

    async def claim_item(self, item: RunItem, hub: str | None, *, limit: int, share: int) -> bool:
        """Start a queued VM on hub ``hub``: only while it is queued, fewer than ``limit`` of its run's VMs are
        started, and fewer than ``share`` of them on this hub (so that live hubs share a run). Whether it was."""

        def claim(connection: Connection) -> bool:
            started = rows(connection.execute(
                "SELECT hub FROM run_items WHERE run_id = ? AND state = ?", (item.run_id, ItemState.STARTED.value)
            ))  # fmt: skip
            if len(started) >= limit or sum(1 for row in started if row["hub"] == hub) >= share:
                return False
            cursor = connection.execute(
                "UPDATE run_items SET state = ?, hub = ?, job_id = NULL WHERE run_id = ? AND vm_path = ? AND state = ?",
                (ItemState.STARTED.value, hub, item.run_id, item.vm_path, ItemState.QUEUED.value),
            )
            return bool(cursor.rowcount == 1)

        return await self.db.run(claim)

    async def end_run(self, run_id: str, state: RunState, now: float, note: str | None = None) -> None:
        """Close a run that is open; ``note`` is added to what its note says."""

        def update(connection: Connection) -> None:
            connection.execute(
                "UPDATE runs SET state = ?, ended = ?, note = CASE WHEN note IS NULL THEN ? ELSE note || '; ' || ? END "
                "WHERE id = ? AND state = ?",
                (state.value, now, note, note, run_id, RunState.OPEN.value),
            )

        await self.db.run(update)

    async def take_runs(self, lost: str, hub: str) -> list[str]:
        """Hub ``hub`` takes the open runs of the lost hub ``lost`` over; the VMs ``lost`` had claimed but
        started no job for are queued again. The runs' IDs."""

        def take(connection: Connection) -> list[str]:
            found = [r[0] for r in connection.execute(
                "SELECT id FROM runs WHERE owner = ? AND state = ?", (lost, RunState.OPEN.value)
            )]  # fmt: skip
            connection.execute(
                "UPDATE runs SET owner = ? WHERE owner = ? AND state = ?", (hub, lost, RunState.OPEN.value)
            )
            connection.execute(
                "UPDATE run_items SET state = ?, hub = NULL WHERE hub = ? AND state = ? AND job_id IS NULL",
                (ItemState.QUEUED.value, lost, ItemState.STARTED.value),
            )
            return found

        return await self.db.run(take)


def _new_run(
    policy: str, purpose: Purpose, vm_paths: list[str], *, slot: float | None, now: float, window_end: float | None,
    note: str | None, owner: str | None,
) -> Run:  # fmt: skip
    """A run about to be stored: its VMs queued (none: done at once)."""
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    return Run(
        run_id, policy, purpose, slot, now, window_end, RunState.OPEN if vm_paths else RunState.DONE,
        None if vm_paths else now, note, tuple(RunItem(run_id, path, ItemState.QUEUED) for path in vm_paths), owner,
    )  # fmt: skip


def _insert_run(connection: Connection, run: Run) -> None:
    """Store a new run and its VMs; the policy's old runs past the history go."""
    connection.execute(
        "INSERT INTO runs (id, policy, purpose, slot, started, window_end, ended, state, note, owner) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run.id, run.policy, run.purpose.value, run.slot, run.started, run.window_end, run.ended, run.state.value,
         run.note, run.owner),
    )  # fmt: skip
    connection.executemany(
        "INSERT INTO run_items (run_id, vm_path, state) VALUES (?, ?, ?)",
        [(run.id, item.vm_path, ItemState.QUEUED.value) for item in run.items],
    )
    _prune(connection, run.policy)


def _policy(row: dict[str, Any]) -> StoredPolicy:
    return StoredPolicy(Policy.from_json(json.loads(row["spec"])), row["created"], row["updated"])


def _read_policy(connection: Connection, name: str) -> StoredPolicy:
    found = rows(connection.execute("SELECT * FROM policies WHERE name = ?", (name,)))
    if not found:
        raise UnknownPolicy(f"no policy {name[:80]!r}")
    return _policy(found[0])


def _prune(connection: Connection, policy: str) -> None:
    """Forget a policy's closed runs past :data:`RUN_HISTORY`."""
    closed = connection.execute(
        "SELECT id FROM runs WHERE policy = ? AND state != ? ORDER BY started DESC, seq DESC",
        (policy, RunState.OPEN.value),
    )
    old = [r[0] for r in closed.fetchall()[RUN_HISTORY:]]
    connection.executemany("DELETE FROM run_items WHERE run_id = ?", [(i,) for i in old])
    connection.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in old])
