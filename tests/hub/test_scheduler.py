"""The scheduler in the real hub, with the real node, backup client and vcsim; time moved by hand.

A policy's slots run its VMs (full first, then incremental, then a full at its chain cap) within its
concurrency, with GFS retention applied; a hub restart runs the missed slots once and says so; a node
that is down fails its jobs ``node_unavailable`` and the next slot retries them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.clock import ManualClock
from tests.conftest import require, run
from tests.hub.operating import START, LocalHub, jobs_ended, local_hub, pump
from tests.node.test_node import NodeProcess, write_config
from tests.pipeline.stack import delayed_nbdkit
from tests.vmware.vsphere import running_vcsim

pytestmark = pytest.mark.peer

HOUR = 3600.0
VMS = ["/DC0/vm/DC0_C0_RP0_VM0", "/DC0/vm/DC0_H0_VM0", "/DC0/vm/DC0_H0_VM1"]


@pytest.fixture(scope="module")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require("nbdkit")
    state = tmp_path_factory.mktemp("scheduler-vcsim")
    with running_vcsim(state, "-vm-disks", "1", "-disk-size-mb", "4") as info:
        yield info


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _policy(**extra: Any) -> dict[str, Any]:
    return {
        "name": "hourly",
        "vms": {"include": ["/DC0/vm/DC0_H0_*", "/DC0/vm/DC0_C0_RP0_VM0"]},
        "schedule": {"every": HOUR},
        **extra,
    }


async def _slot(hub: LocalHub, count: int, at_once: int = 2) -> list[dict[str, Any]]:
    """Move to the next slot and let its jobs run; the jobs of that slot (``count`` jobs in all so far)."""
    view = await hub.ok("GET", "/policies/hourly")
    await hub.clock.advance(view["next_run"] - hub.clock.now())
    most = 0

    async def done() -> bool:
        nonlocal most
        jobs = (await hub.ok("GET", "/backups"))["backups"]
        most = max(most, sum(1 for job in jobs if job["state"] in ("pending", "running")))
        return await jobs_ended(hub, count)

    await pump(hub, done)
    assert most <= at_once, "more VMs at once than per_policy"
    jobs = (await hub.ok("GET", "/backups"))["backups"]
    return jobs[-3:] if len(jobs) >= 3 else jobs


async def test_a_policy_runs_full_incremental_and_a_capped_full_with_retention(
    vcsim: dict[str, Any], tmp_path: Path
) -> None:
    node = NodeProcess(write_config(tmp_path, vcsim))
    try:
        clock = ManualClock(START)
        async with local_hub(tmp_path / "repo", clock=clock, node_url=node.url) as hub:
            body = _policy(per_policy=2, full_every=2, retention={"keep_last": 2})
            created = await hub.ok("POST", "/policies", body)
            assert created["next_run"] == START + HOUR
            first = await _slot(hub, 3)
            assert sorted(job["vm_path"] for job in first) == VMS
            assert {(job["state"], job["full_reason"], job["policy"]) for job in first} == {
                ("completed", "first_backup", "hourly")
            }
            for count in (6, 9):  # two incrementals; retention merges the full into the first (kind full)
                later = await _slot(hub, count)
                assert {(job["state"], job["full_reason"]) for job in later} == {("completed", None)}
            capped = await _slot(hub, 12)  # counted by jobs, not by the merged points' kinds
            assert {(job["state"], job["full_reason"]) for job in capped} == {("completed", "chain_cap")}
            await pump(hub, lambda: _runs_done(hub, 4))
            view = await hub.ok("GET", "/policies/hourly")
            assert view["next_run"] == START + 5 * HOUR
            assert "3 completed" in view["runs"][0]["note"]
            for vm_path in VMS:
                points = (await hub.ok("GET", f"/points?vm_path={vm_path}"))["points"]
                assert len(points) == 2, points  # keep_last 2
                assert [p["kind"] for p in points] == ["full", "full"]  # the capped full, and the merged base
                for point in points:
                    run("qemu-img", "check", point["path"])
    finally:
        node.stop()


async def test_a_restarted_hub_runs_missed_slots_once_and_says_so(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    async with local_hub(tmp_path / "repo", clock=ManualClock(START), node_url=dead) as hub:
        await hub.ok("POST", "/policies", _policy())
        await pump(hub, lambda: _noted(hub), limit=30)
    later = ManualClock(START + 5.5 * HOUR)
    async with local_hub(tmp_path / "repo", clock=later, node_url=dead) as hub:
        await pump(hub, lambda: _ran(hub), limit=30)
        view = await hub.ok("GET", "/policies/hourly")
        assert view["next_run"] == START + 6 * HOUR
        assert "4 earlier slot(s)" in view["note"] and "runs once" in view["note"], view["note"]
        assert len(view["runs"]) == 1 and view["runs"][0]["slot"] == START + 5 * HOUR


async def _runs_done(hub: LocalHub, count: int) -> bool:
    runs = (await hub.ok("GET", "/policies/hourly"))["runs"]
    return len(runs) == count and all(run["state"] == "done" for run in runs)


async def _noted(hub: LocalHub) -> bool:
    view = await hub.ok("GET", "/policies/hourly")
    return view["next_run"] == START + HOUR


async def _ran(hub: LocalHub) -> bool:
    return bool((await hub.ok("GET", "/policies/hourly"))["runs"])


async def test_a_down_node_fails_its_jobs_and_the_next_slot_retries_them(vcsim: dict[str, Any], tmp_path: Path) -> None:
    port = _free_port()
    config = write_config(tmp_path, vcsim)
    node = NodeProcess(config, listen=f"127.0.0.1:{port}")
    clock = ManualClock(START)
    async with local_hub(tmp_path / "repo", clock=clock, node_url=node.url) as hub:
        await hub.ok("POST", "/policies", _policy(per_policy=3))
        assert {job["state"] for job in await _slot(hub, 3, 3)} == {"completed"}
        node.stop()
        for count in (6, 9):  # two slots while the node is down
            down = await _slot(hub, count, 3)
            assert {(job["state"], job["error"]["code"]) for job in down} == {("failed", "node_unavailable")}
            view = await hub.ok("GET", "/policies/hourly")
            assert "did not list the VMs" in view["runs"][0]["note"]
        await pump(hub, lambda: _at_risk(hub, VMS), limit=60)  # no good point for over 2 hours
        node = NodeProcess(config, listen=f"127.0.0.1:{port}")
        try:
            again = await _slot(hub, 12, 3)
            assert {(job["state"], job["full_reason"]) for job in again} == {("completed", None)}
            await pump(hub, lambda: _at_risk(hub, []), limit=60)  # cleared once a good point is made
        finally:
            node.stop()
        fired = (await hub.ok("GET", "/alerts?kind=at_risk"))["alerts"]
        assert sorted(alert["key"] for alert in fired) == VMS and all(not alert["active"] for alert in fired)


async def _at_risk(hub: LocalHub, expected: list[str]) -> bool:
    active = (await hub.ok("GET", "/alerts?active=1&kind=at_risk"))["alerts"]
    status = await hub.ok("GET", "/status")
    return sorted(a["key"] for a in active) == expected and sorted(v["vm_path"] for v in status["at_risk"]) == expected


async def test_a_verify_schedule_verifies_the_policys_points(vcsim: dict[str, Any], tmp_path: Path) -> None:
    node = NodeProcess(write_config(tmp_path, vcsim))
    try:
        async with local_hub(tmp_path / "repo", clock=ManualClock(START), node_url=node.url) as hub:
            body = _policy(schedule={"every": 86400}, verify={"every": HOUR}, per_policy=3)
            await hub.ok("POST", "/policies", body)
            run = await hub.ok("POST", "/policies/hourly/run")
            assert run["note"] == "run now" and len(run["items"]) == 3
            await pump(hub, lambda: jobs_ended(hub, 3))
            view = await hub.ok("GET", "/policies/hourly")
            assert view["schedules"]["verify"]["next_run"] == START + HOUR
            await hub.clock.advance(HOUR)

            async def verified() -> bool:
                points = [p for vm in VMS for p in (await hub.ok("GET", f"/points?vm_path={vm}"))["points"]]
                return len(points) == 3 and all(p["verify_state"] == "verified" for p in points)

            await pump(hub, verified)

            async def closed() -> bool:
                return (await hub.ok("GET", "/policies/hourly"))["runs"][0]["state"] == "done"

            await pump(hub, closed)
            runs = (await hub.ok("GET", "/policies/hourly"))["runs"]
            assert [r["purpose"] for r in runs] == ["verify", "backup"] and runs[0]["note"] == "3 completed"
    finally:
        node.stop()


async def test_a_run_goes_on_after_a_hub_restart(vcsim: dict[str, Any], tmp_path: Path) -> None:
    # The first VM's disk reads take 2 s each, so its job still runs when the hub stops (it cannot complete
    # meanwhile); the jobs after the restart read at full speed.
    node = NodeProcess(write_config(tmp_path, vcsim, nbdkit=str(delayed_nbdkit(tmp_path))))
    (tmp_path / "read-delay").write_text("2")
    try:
        async with local_hub(tmp_path / "repo", clock=ManualClock(START), node_url=node.url) as hub:
            await hub.ok("POST", "/policies", _policy(per_policy=1))
            await hub.clock.advance(HOUR)

            async def one_started() -> bool:  # running: its export started (a worker may take a moment)
                return [job["state"] for job in (await hub.ok("GET", "/backups"))["backups"]] == ["running"]

            await pump(hub, one_started)
        (tmp_path / "read-delay").unlink()
        # The hub stopped with one VM's job running and two queued; the restarted hub fails the first
        # (restarted) and goes on with the run.
        async with local_hub(tmp_path / "repo", clock=ManualClock(START + HOUR + 60), node_url=node.url) as hub:
            await pump(hub, lambda: jobs_ended(hub, 3))
            await pump(hub, lambda: _runs_done(hub, 1))
            jobs = (await hub.ok("GET", "/backups"))["backups"]
            assert [(job["state"], (job["error"] or {}).get("code")) for job in jobs] == [
                ("failed", "restarted"),
                ("completed", None),
                ("completed", None),
            ]
            (run,) = (await hub.ok("GET", "/policies/hourly"))["runs"]
            assert [item["state"] for item in run["items"]] == ["done"] * 3
            assert run["note"] == "2 completed, 1 failed", run
    finally:
        node.stop()
