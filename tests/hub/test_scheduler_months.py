"""The scheduler over simulated months: random schedules, downtimes and job lengths, checked by property.

The store is the hub's real SQLite store; the hub's job side is an in-memory stand-in whose jobs end
after a random number of ticks (the scheduler's integration with the real hub, node and vcsim is in
test_scheduler.py). Time comes only from the injected clock.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendense_nbd.backup.records import FullReason, Mode
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.jobs import JobState
from sendense_nbd.hub.policies import ItemState, PolicyStore, Purpose, RunState
from sendense_nbd.hub.scheduler import Scheduler
from sendense_nbd.policy.model import Policy
from sendense_nbd.policy.schedule import next_slot

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY = 86400.0


class FakeAlerts:
    def __init__(self) -> None:
        self.active: set[str] = set()

    async def fire(self, kind: Any, subject: str, message: str, **_: Any) -> None:
        self.active.add(subject)

    async def clear(self, kind: Any, key: str) -> bool:
        self.active.discard(key)
        return True

    async def list(self, query: Any) -> list[Any]:
        return [SimpleNamespace(key=key) for key in sorted(self.active)]


class JobSide:
    """The hub's job side in memory: jobs end after ``length`` ticks; checks the scheduler's promises."""

    def __init__(self, vms: list[str], rng: random.Random, per_node: int) -> None:
        self.vms = vms
        self.rng = rng
        self.per_node = per_node
        self.jobs: dict[str, SimpleNamespace] = {}
        self.started: list[tuple[str, str]] = []

    def running(self) -> list[SimpleNamespace]:
        return [job for job in self.jobs.values() if not job.state.terminal]

    async def start_policy_backup(self, policy: Policy, vm_path: str, mode: Mode, reason: FullReason | None) -> Any:
        assert vm_path not in {job.vm_path for job in self.running()}, f"{vm_path} started twice at once"
        assert len(self.running()) < self.per_node, "more jobs than per_node"
        job = SimpleNamespace(
            id=f"job-{len(self.jobs)}", vm_path=vm_path, state=JobState.RUNNING, error=None,
            left=self.rng.randint(0, 5),
        )  # fmt: skip
        self.jobs[job.id] = job
        self.started.append((policy.name, vm_path))
        return job

    async def start_policy_verify(self, policy: Policy, vm_path: str) -> Any:
        raise AssertionError("no verify schedule here")

    async def job(self, job_id: str) -> Any:
        return self.jobs[job_id]

    async def policy_vms(self, policy: Policy) -> list[str]:
        return self.vms

    async def stored_vms(self) -> list[str]:
        return self.vms

    async def points(self, vm_path: str) -> list[Any]:
        return []

    async def incrementals(self, vm_path: str) -> int:
        return 0

    async def check_node(self, node: str | None) -> None:
        return None

    async def busy(self, vm_path: str) -> bool:
        return any(job.vm_path == vm_path for job in self.running())

    async def node_jobs(self, node: str | None) -> int:
        return len(self.running())

    def advance(self) -> None:
        for job in self.running():
            job.left -= 1
            if job.left < 0:
                job.state = JobState.COMPLETED


windows = st.one_of(st.just({}), st.builds(lambda w: {"window": w}, st.sampled_from([600, 7200])))
schedules = st.one_of(
    st.builds(lambda every, w: {"every": every, **w}, st.sampled_from([300, 3600, 4 * 3600, DAY]), windows),
    st.builds(
        lambda cron, tz, w: {"cron": cron, "timezone": tz, **w},
        st.sampled_from(["0 22 * * *", "30 */6 * * *", "0 3 * * 1-5", "15 1 1 * *"]),
        st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
        windows,
    ),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=schedules, seed=st.integers(0, 2**32 - 1), per_policy=st.integers(1, 3))
async def test_months_of_slots_each_run_once(
    tmp_path: Path, schedule: dict[str, Any], seed: int, per_policy: int
) -> None:
    rng = random.Random(seed)
    db = Database(str(tmp_path / f"hub-{uuid.uuid4().hex}.db"))
    try:
        clock = ManualClock(START)
        store = PolicyStore(db)
        vms = [f"/DC0/vm/vm{i}" for i in range(4)]
        side = JobSide(vms, rng, per_node=2)
        scheduler = Scheduler(side, store, clock, FakeAlerts())  # type: ignore[arg-type]
        policy = Policy.from_json(
            {"name": "p", "vms": {"include": ["/DC0/vm"]}, "schedule": schedule, "per_policy": per_policy,
             "per_node": 2}
        )  # fmt: skip
        stored = await store.add(policy, clock.now())
        end = START + 62 * DAY
        slot_count = 0
        last_slot = stored.created
        while clock.now() < end:
            step = rng.choice([300.0, 1800.0, 3600.0]) if rng.random() > 0.02 else rng.uniform(DAY, 5 * DAY)  # downtime
            await clock.advance(step)
            before = {run.id for run in await store.runs(policy="p", limit=10_000)}
            await scheduler.tick()
            side.advance()
            runs = await store.runs(policy="p", limit=10_000)
            new = [run for run in runs if run.id not in before]
            assert len(new) <= 1, "one tick opened two runs"
            for run in new:
                assert run.slot is not None and run.slot <= clock.now()
                if policy.schedule.window is not None:
                    assert clock.now() <= run.slot + policy.schedule.window, "a run opened after its window"
            assert sum(1 for run in runs if run.state is RunState.OPEN) <= 1
            for run in runs:
                assert sum(1 for i in run.items if i.state is ItemState.STARTED) <= per_policy
            state = await store.state("p", Purpose.BACKUP)
            slots = []
            moment = last_slot
            while (moment := next_slot(policy.schedule, moment, anchor=stored.created)) <= clock.now():
                slots.append(moment)
            if slots:
                assert state.last_slot == slots[-1], "the latest due slot is the one taken"
                assert state.note is not None
                if len(slots) > 1:
                    assert f"{len(slots) - 1} earlier slot(s)" in state.note, state.note
                window = policy.schedule.window
                if not new and window is not None and clock.now() > slots[-1] + window:
                    assert "window closed" in state.note or "still runs" in state.note, state.note
                slot_count += len(slots)
                last_slot = slots[-1]
            else:
                assert state.last_slot == last_slot
            assert state.next_run == next_slot(policy.schedule, last_slot, anchor=stored.created)
            assert state.next_run > clock.now()
        assert slot_count > 0
        if policy.schedule.window is None:
            assert side.started, "no job was ever started"
    finally:
        db.close()


@pytest.mark.parametrize("per_policy", [1, 2])
async def test_a_run_starts_each_vm_once_within_its_limits(tmp_path: Path, store_target: str, per_policy: int) -> None:
    db = Database(store_target)
    try:
        clock = ManualClock(START)
        store = PolicyStore(db)
        side = JobSide([f"/DC0/vm/vm{i}" for i in range(5)], random.Random(1), per_node=2)
        scheduler = Scheduler(side, store, clock, FakeAlerts())  # type: ignore[arg-type]
        await store.add(
            Policy.from_json({"name": "p", "vms": {"include": ["/DC0/vm/*"], "exclude": ["/DC0/vm/vm4"]},
                              "schedule": {"every": 3600}, "per_policy": per_policy, "per_node": 2}),
            clock.now(),
        )  # fmt: skip
        await clock.advance(3600)
        for _ in range(40):
            await scheduler.tick()
            side.advance()
            await clock.advance(60)
        assert sorted(vm for _, vm in side.started) == [f"/DC0/vm/vm{i}" for i in range(4)]
        (run,) = await store.runs(policy="p")
        assert run.state is RunState.DONE
        assert run.note == "4 completed"
    finally:
        db.close()


async def test_a_disabled_policy_runs_no_slot_and_no_catch_up_once_enabled(tmp_path: Path, store_target: str) -> None:
    db = Database(store_target)
    try:
        clock = ManualClock(START)
        store = PolicyStore(db)
        side = JobSide(["/DC0/vm/vm0"], random.Random(2), per_node=2)
        scheduler = Scheduler(side, store, clock, FakeAlerts())  # type: ignore[arg-type]
        body = {"name": "p", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 3600}, "enabled": False}
        stored = await store.add(Policy.from_json(body), clock.now())
        await clock.advance(5 * 3600)
        await scheduler.tick()
        state = await store.state("p", Purpose.BACKUP)
        assert state.last_slot == START + 5 * 3600 and "disabled" in (state.note or "")
        assert (await scheduler.view(stored))["next_run"] is None
        await store.replace(stored.policy.edited({"enabled": True}), clock.now())
        await clock.advance(600)
        await scheduler.tick()
        assert side.started == [] and await store.runs(policy="p") == []
        assert (await scheduler.view(await store.get("p")))["next_run"] == START + 6 * 3600
    finally:
        db.close()


async def test_run_now_edits_bad_specs_and_stale_alerts(tmp_path: Path, store_target: str) -> None:
    from sendense_nbd.errors import Conflict
    from sendense_nbd.hub.alerts import AlertConfig, AlertKind, AlertQuery, Alerts

    db = Database(store_target)
    try:
        clock = ManualClock(START)
        store = PolicyStore(db)
        side = JobSide(["/DC0/vm/vm0"], random.Random(3), per_node=2)
        alerts = Alerts(db, AlertConfig(), clock=clock, hub="http://hub", space_path=str(tmp_path))
        scheduler = Scheduler(side, store, clock, alerts)
        body = {"name": "p", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 3600}}
        await scheduler.add(Policy.from_json(body))
        run = await scheduler.run_now("p")
        assert [item.state for item in run.items] == [ItemState.STARTED]
        with pytest.raises(Conflict, match="open") as refused:  # not a second run beside the open one
            await scheduler.run_now("p")
        assert refused.value.code == "run_open"
        # A new schedule starts at the edit: its earlier slots were not missed.
        await clock.advance(10 * 3600)
        view = await scheduler.edit("p", {"schedule": {"every": 7200}})
        assert view["next_run"] == START + 10 * 3600 + 7200 and "schedule changed" in str(view["note"])
        await scheduler.tick()
        assert len(await store.runs(policy="p")) == 1
        # A stored spec that no longer parses is left out; the other policies still run.
        await scheduler.add(Policy.from_json({**body, "name": "q"}))
        await db.run(lambda c: c.execute("UPDATE policies SET spec = ? WHERE name = 'p'", ('{"name": "p"}',)))
        assert [stored.policy.name for stored in await store.all()] == ["q"]
        before = {r.id for r in await store.runs(limit=100)}
        await clock.advance(3600)
        await scheduler.tick()
        assert [r.policy for r in await store.runs(limit=100) if r.id not in before] == ["q"]
        # An AT_RISK alert of a VM no policy knows any more is cleared.
        await alerts.fire(AlertKind.AT_RISK, "/DC0/vm/gone", "at risk", key="/DC0/vm/gone")
        await scheduler.check_risk(await store.all(), clock.now())
        assert await alerts.list(AlertQuery(active=True, kind=AlertKind.AT_RISK)) == []
    finally:
        db.close()
