"""Two sites: two simulated vCenters, each with its own real node, registered in one hub; a policy per
site over 6 VMs in all, 2 at a time each, on one schedule; every point restores its VM's disk and
verifies. Time is the hub's manual clock; backups, nodes, vcsim and the verify run for real."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.clock import ManualClock
from tests.conftest import require, run
from tests.hub.operating import START, LocalHub, jobs_ended, local_hub, pump
from tests.node.test_node import NodeProcess, write_config
from tests.vmware.vsphere import running_vcsim, vmdisk

pytestmark = pytest.mark.peer

SITES = {
    "site-a": ("/DC0/vm/DC0_H0_*", "/DC0/vm/DC0_C0_RP0_VM0"),
    "site-b": ("/DC1/vm/DC1_H0_*", "/DC1/vm/DC1_C0_RP0_VM1"),
}


@pytest.fixture(scope="module")
def vcenters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """Site A's vCenter has DC0; site B's has DC0 and DC1 (its policy backs up DC1's VMs)."""
    require("nbdkit")
    with contextlib.ExitStack() as stack:
        sims = {}
        for site, datacenters in (("site-a", "1"), ("site-b", "2")):
            state = tmp_path_factory.mktemp(f"{site}-vcsim")
            args = ("-vm-disks", "1", "-disk-size-mb", "4", "-datacenters", datacenters)
            sims[site] = stack.enter_context(running_vcsim(state, *args))
        yield sims


async def _verified(hub: LocalHub, jobs: list[str]) -> bool:
    for job_id in jobs:
        job = await hub.ok("GET", f"/verify/{job_id}")
        if job["state"] in ("pending", "running"):
            return False
    return True


async def test_two_sites_back_up_six_vms_two_at_a_time_and_every_point_verifies(
    vcenters: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    nodes = {}
    try:
        for site, vcsim in vcenters.items():
            folder = tmp_path / site
            folder.mkdir()
            nodes[site] = NodeProcess(write_config(folder, vcsim))
        async with local_hub(tmp_path / "repo", clock=ManualClock(START)) as hub:
            for site, (include, single) in SITES.items():
                await hub.ok("POST", "/nodes", {"name": site, "url": nodes[site].url})
                policy = {"name": site, "node": site, "vms": {"include": [include, single]},
                          "schedule": {"cron": "0 22 * * *", "timezone": "Europe/Berlin"}, "per_policy": 2}  # fmt: skip
                assert (await hub.ok("POST", "/policies", policy))["next_run"] == START + 13 * 3600  # 21:00 UTC
            await hub.clock.advance(13 * 3600)
            most: dict[str, int] = {site: 0 for site in SITES}

            async def done() -> bool:
                jobs = (await hub.ok("GET", "/backups"))["backups"]
                for site in SITES:
                    active = [j for j in jobs if j["node"] == site and j["state"] in ("pending", "running")]
                    most[site] = max(most[site], len(active))
                return await jobs_ended(hub, 6)

            await pump(hub, done)
            assert max(most.values()) <= 2, most
            jobs = (await hub.ok("GET", "/backups"))["backups"]
            assert len(jobs) == 6 and {job["state"] for job in jobs} == {"completed"}
            by_site = {site: sorted(j["vm_path"] for j in jobs if j["node"] == site) for site in SITES}
            assert by_site == {
                "site-a": ["/DC0/vm/DC0_C0_RP0_VM0", "/DC0/vm/DC0_H0_VM0", "/DC0/vm/DC0_H0_VM1"],
                "site-b": ["/DC1/vm/DC1_C0_RP0_VM1", "/DC1/vm/DC1_H0_VM0", "/DC1/vm/DC1_H0_VM1"],
            }
            verifies = []
            for job in jobs:
                answer = await hub.ok("POST", "/verify", {"vm_path": job["vm_path"]})
                verifies.append(answer["job_id"] if "job_id" in answer else answer["id"])
            await pump(hub, lambda: _verified(hub, verifies))
            for job in jobs:
                site = job["node"]
                vm = next(v for v in vcenters[site]["vms"] if v["path"] == job["vm_path"])
                (point,) = (await hub.ok("GET", f"/points?vm_path={job['vm_path']}"))["points"]
                assert point["verify_state"] == "verified", point
                run("qemu-img", "check", point["path"])
                source = vmdisk.disk_path(vcenters[site]["state"], vm["moref"], point["disk_key"])
                run("qemu-img", "compare", "-f", "raw", str(source), point["path"])
            health = {n["name"]: n for n in (await hub.ok("GET", "/nodes?check=1"))["nodes"]}
            assert health["site-a"]["up"] and health["site-b"]["up"]
    finally:
        for node in nodes.values():
            node.stop()
