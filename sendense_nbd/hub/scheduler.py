"""The hub's scheduler: it runs each policy's due slots and starts their jobs within the policy's limits.

Every tick (one second of the hub's clock) it:

1. takes each enabled policy's due slot (:func:`~sendense_nbd.policy.schedule.due`): a slot missed while
   the hub was down runs once, and the schedule's note says how many were missed; a slot whose window
   has closed, or that comes while the policy's previous run still runs, is skipped and the note says so;
2. opens a run for a slot taken: the policy's VMs, resolved through its node at that moment (a node that
   does not answer: the VMs of the policy's last run, whose jobs then fail ``node_unavailable`` and are
   retried at the next slot);
3. starts queued VMs of open runs: at most ``per_policy`` of the policy's and ``per_node`` of its node's
   jobs at once, never a VM that has a job running, and none after the run's window closed;
4. checks, every minute, which VMs have no good point within their policy's interval (alert AT_RISK).

All its state is in the store (:class:`~sendense_nbd.hub.policies.PolicyStore`), so a restarted hub goes
on where it stopped; all its time comes from the hub's clock. Several hubs on one store each run a
scheduler: a slot is taken by exactly one of them (a conditional update of the schedule's state, together
with opening the run), and each queued VM is claimed by exactly one (from queued to started, within the
run's ``per_policy`` and at most a fair share of it per live hub), which starts its job.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from sendense_nbd.backup.records import FullReason, Mode
from sendense_nbd.errors import Conflict, SendenseError
from sendense_nbd.hub.alerts import AlertKind, AlertQuery, Alerts
from sendense_nbd.hub.clock import Clock
from sendense_nbd.hub.jobs import Job, JobState
from sendense_nbd.hub.policies import (
    ItemState,
    PolicyStore,
    Purpose,
    Run,
    RunItem,
    RunState,
    ScheduleState,
    StoredPolicy,
)
from sendense_nbd.hub.repository import Point, VerifyState
from sendense_nbd.policy.model import Policy, Schedule
from sendense_nbd.policy.schedule import Due, due, next_slot

log = logging.getLogger(__name__)

#: Seconds of the hub's clock between ticks, and between at-risk checks.
TICK = 1.0
RISK_CHECK = 60.0


class Operations(Protocol):
    """What the scheduler asks of the hub (:class:`~sendense_nbd.hub.service.Hub` provides it)."""

    async def start_policy_backup(self, policy: Policy, vm_path: str, mode: Mode, reason: FullReason | None) -> Job:
        """Start one VM's backup job for ``policy``."""

    async def start_policy_verify(self, policy: Policy, vm_path: str) -> Job:
        """Start a verify job of one VM's points."""

    async def job(self, job_id: str) -> Job:
        """A job by ID."""

    async def policy_vms(self, policy: Policy) -> list[str]:
        """The inventory paths of every VM the policy's node knows."""

    async def stored_vms(self) -> list[str]:
        """The VMs that have points in the repository."""

    async def points(self, vm_path: str) -> list[Point]:
        """A VM's completed points, by disk and age."""

    async def busy(self, vm_path: str) -> bool:
        """Whether the VM has a backup job pending or running."""

    async def incrementals(self, vm_path: str) -> int:
        """How many incremental backups of the VM completed since its last full one."""

    async def node_jobs(self, node: str | None) -> int:
        """How many backup jobs are pending or running on a node (None: the default node)."""

    async def check_node(self, node: str | None) -> None:
        """Refuse a node that is not registered (:class:`~sendense_nbd.errors.UnknownNode`)."""


def iso(moment: float) -> str:
    """An epoch time as ISO 8601 UTC, for notes."""
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat(timespec="seconds")


def interval(schedule: Schedule, now: float, *, anchor: float) -> float:
    """The longest gap between the schedule's next slots (a weekday cron's is the weekend)."""
    slots = [next_slot(schedule, now, anchor=anchor)]
    for _ in range(8):
        slots.append(next_slot(schedule, slots[-1], anchor=anchor))
    return max(b - a for a, b in zip(slots, slots[1:], strict=False))


class Scheduler:
    """Runs the policies in ``store`` through ``hub``; :meth:`tick` is one round, :meth:`run` loops."""

    def __init__(
        self, hub: Operations, store: PolicyStore, clock: Clock, alerts: Alerts, *, member: str | None = None,
        live: Callable[[], Awaitable[int]] | None = None,
    ) -> None:  # fmt: skip
        self.hub = hub
        self.store = store
        self.clock = clock
        self.alerts = alerts
        #: This hub's ID among several (the runs it opens, the VMs it claims), and how many hubs are live.
        self.member = member
        self._live = live
        self._risk_checked = float("-inf")
        #: One round at a time: a tick and a run-now never start the same VM twice.
        self._round = asyncio.Lock()

    async def run(self) -> None:
        """Tick until cancelled; a failed tick is logged and the next one runs."""
        while True:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - the scheduler must outlive one bad round
                log.error("scheduler tick failed: %r", exc, exc_info=exc)
            await self.clock.sleep(TICK)

    async def tick(self) -> None:
        """One round: take due slots, start what may start, close finished runs, check VMs at risk."""
        async with self._round:
            await self._tick(self.clock.now())

    async def _tick(self, now: float) -> None:
        policies = {stored.policy.name: stored for stored in await self.store.all()}
        await self._dispatch_open(policies, now)  # first: a run whose jobs all ended closes before its next slot
        open_runs = await self.store.runs(state=RunState.OPEN, limit=10_000)
        for stored in policies.values():
            try:  # one policy's failure must not stop the others
                await self._schedule(stored, Purpose.BACKUP, stored.policy.schedule, open_runs, now)
                if stored.policy.verify is not None:
                    await self._schedule(stored, Purpose.VERIFY, stored.policy.verify, open_runs, now)
            except Exception as exc:  # noqa: BLE001 - logged; its next slot tries again
                log.error("policy %s: scheduling failed: %r", stored.policy.name, exc, exc_info=exc)
        await self._dispatch_open(policies, now)
        if now - self._risk_checked >= RISK_CHECK:
            self._risk_checked = now
            await self.check_risk(list(policies.values()), now)

    async def _dispatch_open(self, policies: Mapping[str, StoredPolicy], now: float) -> None:
        for run in await self.store.runs(state=RunState.OPEN, limit=10_000):
            stored = policies.get(run.policy)
            if stored is not None:
                try:
                    await self._dispatch(run, stored.policy, now)
                except Exception as exc:  # noqa: BLE001 - logged; the next tick tries again
                    log.error("run %s of policy %s: dispatch failed: %r", run.id, run.policy, exc, exc_info=exc)

    # -- policies ----------------------------------------------------------------

    async def add(self, policy: Policy) -> dict[str, object]:
        """Store a new policy (its node must be registered); its view."""
        await self.hub.check_node(policy.node)
        return await self.view(await self.store.add(policy, self.clock.now()))

    async def edit(self, name: str, patch: Mapping[str, Any]) -> dict[str, object]:
        """Apply a JSON merge patch to a policy; its view."""
        stored = await self.store.get(name)
        policy = stored.policy.edited(patch)
        await self.hub.check_node(policy.node)
        now = self.clock.now()
        for purpose, before, after in (
            (Purpose.BACKUP, stored.policy.schedule, policy.schedule),
            (Purpose.VERIFY, stored.policy.verify, policy.verify),
        ):
            if before != after:  # a new schedule starts now: its earlier slots were never missed
                state = await self.store.state(name, purpose)
                note = f"schedule changed at {iso(now)}"
                await self.store.save_state(attrs.evolve(state, last_slot=now, next_run=None, note=note))
        return await self.view(await self.store.replace(policy, now))

    async def view(self, stored: StoredPolicy, *, runs: int = 0) -> dict[str, object]:
        """A policy as the API shows it: its spec, its next run, its schedules' state, its last runs."""
        backup = await self.next_run(stored, Purpose.BACKUP)
        verify = await self.next_run(stored, Purpose.VERIFY)
        view: dict[str, object] = {
            **stored.policy.to_json(),
            "created": stored.created,
            "updated": stored.updated,
            "next_run": backup.next_run,
            "note": backup.note,
            "schedules": {"backup": backup.to_json(), "verify": verify.to_json()},
        }
        if runs:
            view["runs"] = [run.to_json() for run in await self.store.runs(policy=stored.policy.name, limit=runs)]
        return view

    async def views(self) -> list[dict[str, object]]:
        """Every policy's view, by name."""
        return [await self.view(stored) for stored in await self.store.all()]

    async def run_now(self, name: str) -> Run:
        """Open a run of a policy's backup now, outside its schedule (its slots are unchanged)."""
        stored = await self.store.get(name)
        async with self._round:
            running = await self.store.runs(policy=name, state=RunState.OPEN, limit=10_000)
            if any(run.purpose is Purpose.BACKUP for run in running):
                raise Conflict(f"policy {name} has a backup run open ({running[0].id}); wait for it to end", "run_open")
            now = self.clock.now()
            vm_paths, note = await self._resolve(stored.policy, Purpose.BACKUP)
            window_end = None if stored.policy.schedule.window is None else now + stored.policy.schedule.window
            run = await self.store.open_run(
                name, Purpose.BACKUP, vm_paths, slot=None, now=now, window_end=window_end, note=f"run now{note}",
                owner=self.member,
            )  # fmt: skip
            await self._dispatch(run, stored.policy, now)
            return await self.store.run(run.id)

    async def next_run(self, stored: StoredPolicy, purpose: Purpose) -> ScheduleState:
        """A schedule's state with its next run (as the API shows it)."""
        state = await self.store.state(stored.policy.name, purpose)
        schedule = stored.policy.schedule if purpose is Purpose.BACKUP else stored.policy.verify
        if schedule is None or not stored.policy.enabled:
            return attrs.evolve(state, next_run=None)
        return attrs.evolve(state, next_run=next_slot(schedule, state.last_slot, anchor=stored.created))

    # -- slots -------------------------------------------------------------------

    async def _schedule(
        self, stored: StoredPolicy, purpose: Purpose, schedule: Schedule, open_runs: list[Run], now: float
    ) -> None:
        policy = stored.policy
        state = await self.store.state(policy.name, purpose)
        was = state.last_slot  # another hub may take the slot meanwhile: every write below checks it
        slot = due(schedule, last_slot=state.last_slot, now=now, anchor=stored.created)
        if slot is not None and not policy.enabled:  # passed by: enabling it later runs no catch-up
            state = attrs.evolve(
                state, last_slot=slot.slot, note=f"slot {iso(slot.slot)} not run: the policy is disabled"
            )
        elif slot is not None:
            taken = await self._take(policy, purpose, slot, open_runs, now, was)
            if taken is None:
                return  # another hub took the slot
            note, opened = taken
            log.info("policy %s %s: %s", policy.name, purpose.value, note)
            state = attrs.evolve(state, last_slot=slot.slot, last_run=now, note=note)
            was = slot.slot if opened else was
        upcoming = next_slot(schedule, state.last_slot, anchor=stored.created)
        if slot is not None or upcoming != state.next_run:
            await self.store.save_state(attrs.evolve(state, next_run=upcoming), was=was)

    async def _take(
        self, policy: Policy, purpose: Purpose, slot: Due, open_runs: list[Run], now: float, was: float
    ) -> tuple[str, bool] | None:
        """Run a due slot, or say why not: the note the schedule shows, and whether a run was opened (None:
        another hub took the slot first)."""
        missed = (
            f"; {slot.missed} earlier slot(s) since {iso(slot.first_missed or slot.slot)} were missed "
            "(the hub was down) and this one runs once for them"
            if slot.missed
            else ""
        )
        running = next((r for r in open_runs if r.policy == policy.name and r.purpose is purpose), None)
        if running is not None:
            return f"slot {iso(slot.slot)} skipped: run {running.id} of the previous slot still runs{missed}", False
        if slot.window_end is not None and now > slot.window_end:
            return f"slot {iso(slot.slot)} not run: its window closed at {iso(slot.window_end)}{missed}", False
        vm_paths, note = await self._resolve(policy, purpose)
        run = await self.store.claim_run(
            policy.name, purpose, vm_paths, slot=slot.slot, was=was, now=now, window_end=slot.window_end,
            note=note.removeprefix("; ") or None, owner=self.member,
        )  # fmt: skip
        if run is None:
            return None
        return f"slot {iso(slot.slot)}: run {run.id} started for {len(vm_paths)} VM(s){note}{missed}", True

    async def _resolve(self, policy: Policy, purpose: Purpose) -> tuple[list[str], str]:
        """The policy's VMs now, and a note when they could not be asked for."""
        if purpose is Purpose.VERIFY:
            return policy.vms.select(await self.hub.stored_vms()), ""
        try:
            return policy.vms.select(await self.hub.policy_vms(policy)), ""
        except SendenseError as exc:
            last = await self.store.runs(policy=policy.name, limit=20)
            known = next((run for run in last if run.purpose is Purpose.BACKUP and run.items), None)
            if known is None:
                return [], f"; its node did not list the VMs and no earlier run knows them: {exc}"
            paths = [item.vm_path for item in known.items]
            return paths, f"; its node did not list the VMs ({exc}), so the VMs of run {known.id} are used"

    # -- dispatch ----------------------------------------------------------------

    async def _dispatch(self, run: Run, policy: Policy, now: float) -> None:
        """Settle the run's finished jobs and start what its limits allow; close it when nothing is left."""
        started = 0
        for item in run.items:
            if item.state is ItemState.STARTED and item.job_id is not None:
                job = await self.hub.job(item.job_id)
                if job.state.terminal:
                    await self.store.set_item(attrs.evolve(item, state=ItemState.DONE, note=_outcome(job)),
                                              was=ItemState.STARTED)  # fmt: skip
                else:
                    started += 1
            elif item.state is ItemState.STARTED:
                started += 1  # claimed by a hub that is starting its job
        queued = [item for item in run.items if item.state is ItemState.QUEUED]
        if queued and run.window_end is not None and now > run.window_end:
            for item in queued:
                note = f"not started: the window closed at {iso(run.window_end)}"
                await self.store.set_item(attrs.evolve(item, state=ItemState.SKIPPED, note=note), was=ItemState.QUEUED)
            queued = []
        share = await self._share(policy)
        for item in queued:
            if started >= policy.per_policy:
                break
            if run.purpose is Purpose.BACKUP and await self.hub.node_jobs(policy.node) >= policy.per_node:
                break
            if await self.hub.busy(item.vm_path):
                continue  # its own job still runs: it starts on a later tick
            if not await self.store.claim_item(item, self.member, limit=policy.per_policy, share=share):
                continue  # another hub started it, or this hub has its share of the run
            started += await self._start(run, policy, attrs.evolve(item, state=ItemState.STARTED, hub=self.member))
        if started == 0 and not await self._queued(run):
            await self.store.end_run(run.id, RunState.DONE, now, await self._summary(run))

    async def _share(self, policy: Policy) -> int:
        """How many of a run's VMs this hub may have started at once: ``per_policy`` shared by the live hubs."""
        hubs = 1 if self._live is None else max(1, await self._live())
        return math.ceil(policy.per_policy / hubs)

    async def _start(self, run: Run, policy: Policy, item: RunItem) -> int:
        """Start one claimed VM's job; 1 if it runs, 0 if starting it failed (the item is then done)."""
        try:
            if run.purpose is Purpose.VERIFY:
                job = await self.hub.start_policy_verify(policy, item.vm_path)
            else:
                mode, reason = policy.mode, None
                if policy.full_every is not None and policy.mode is not Mode.FULL:
                    if await self.hub.incrementals(item.vm_path) >= policy.full_every:
                        mode, reason = Mode.FULL, FullReason.CHAIN_CAP
                job = await self.hub.start_policy_backup(policy, item.vm_path, mode, reason)
        except SendenseError as exc:  # refused before any job was made (a failed start returns its job)
            await self.store.set_item(attrs.evolve(item, state=ItemState.DONE, note=f"failed: {exc}"[:500]))
            return 0
        except BaseException:  # not started: queued again for the next tick (of any hub)
            await self.store.set_item(attrs.evolve(item, state=ItemState.QUEUED, hub=None), was=ItemState.STARTED)
            raise
        if job.state.terminal:
            await self.store.set_item(attrs.evolve(item, state=ItemState.DONE, job_id=job.id, note=_outcome(job)))
            return 0
        await self.store.set_item(attrs.evolve(item, job_id=job.id))
        return 1

    async def _queued(self, run: Run) -> bool:
        """Whether the run (as stored now) still has VMs queued or started."""
        current = await self.store.run(run.id)
        return any(i.state in (ItemState.QUEUED, ItemState.STARTED) for i in current.items)

    async def _summary(self, run: Run) -> str:
        current = await self.store.run(run.id)
        counts: dict[str, int] = {}
        for item in current.items:
            key = item.note.split(":")[0] if item.state is ItemState.DONE and item.note else item.state.value
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{count} {what}" for what, count in sorted(counts.items())) or "no VMs"

    # -- at risk -----------------------------------------------------------------

    async def at_risk(self, policies: Sequence[StoredPolicy], now: float) -> list[dict[str, object]]:
        """The VMs of enabled policies without a good point within the policy's interval (plus its window,
        or plus one interval up to an hour for the run to finish): ``{"vm_path", "policy", "last_good",
        "allowed"}`` each."""
        found: list[dict[str, object]] = []
        for stored in policies:
            policy = stored.policy
            if not policy.enabled:
                continue
            gap = interval(policy.schedule, now, anchor=stored.created)
            allowed = gap + (policy.schedule.window if policy.schedule.window is not None else min(gap, 3600.0))
            for vm_path in await self._known_vms(policy):
                good = last_good(await self.hub.points(vm_path))
                if now - (good if good is not None else stored.created) > allowed:
                    found.append({"vm_path": vm_path, "policy": policy.name, "last_good": good, "allowed": allowed})
        return found

    async def check_risk(self, policies: Sequence[StoredPolicy], now: float) -> list[str]:
        """Fire AT_RISK for each VM :meth:`at_risk` finds, and clear it for the others."""
        risky = {str(vm["vm_path"]): vm for vm in await self.at_risk(policies, now)}
        active = await self.alerts.list(AlertQuery(active=True, kind=AlertKind.AT_RISK, limit=10_000))
        for alert in active:  # also those of VMs no policy covers any more
            if alert.key is not None and alert.key not in risky:
                await self.alerts.clear(AlertKind.AT_RISK, alert.key)
        for vm_path, vm in risky.items():
            good = vm["last_good"]
            last = "never" if not isinstance(good, float) else iso(good)
            message = f"{vm_path} has no good restore point within {vm['allowed']:.0f} s (last good: {last})"
            await self.alerts.fire(AlertKind.AT_RISK, vm_path, message, key=vm_path, detail=vm)
        return sorted(risky)

    async def _known_vms(self, policy: Policy) -> list[str]:
        runs = await self.store.runs(policy=policy.name, limit=20)
        known = next((run for run in runs if run.purpose is Purpose.BACKUP and run.items), None)
        return [] if known is None else [item.vm_path for item in known.items]


def last_good(points: Sequence[Point]) -> float | None:
    """When the VM's newest good point was made: every disk's newest point not found damaged, the oldest
    of those (None: a disk has none)."""
    newest: dict[int, float] = {}
    for point in points:
        if point.verify_state is not VerifyState.DAMAGED and point.completed is not None:
            newest[point.disk_key] = max(newest.get(point.disk_key, 0.0), point.completed)
    disks = {point.disk_key for point in points}
    if not disks or disks - newest.keys():
        return None
    return min(newest.values())


def _outcome(job: Job) -> str:
    if job.state is JobState.COMPLETED or job.error is None:
        return job.state.value
    return f"{job.state.value}: {job.error.message}"[:500]
