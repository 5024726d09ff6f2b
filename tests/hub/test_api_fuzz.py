"""A hypothesis fuzzer over every hub endpoint, against a real hub (in-process, real HTTP, real NBD
exports and qcow2 images) and the stand-in node.

Every answer must be below 500; a 4xx must be ``{"error": {"code", "message"}}``. After the run nothing
exists outside the repository (the working directory and the repository's parent are watched), no port
is leased, and the hub still runs a backup. The run is derandomized (the same examples every time) and
bounded: :data:`EXAMPLES` requests within :data:`BUDGET` seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendense_nbd.hub.api import PREFIX, build_app
from sendense_nbd.hub.service import Hub, HubConfig
from tests.api_fuzz import CONTENT_TYPES, INTEGERS, JSON, RAW_BODIES, SCALARS, TEXT, VM, AppThread, check_answer
from tests.hub.conftest import free_port_range
from tests.hub.node_standin import NodeStandin

EXAMPLES = 1000
#: Wall-time bound of the run (it takes ~4 s): past it the remaining examples do nothing and the test fails.
BUDGET = 120.0
MIB = 1 << 20
ROUTES = (
    ("POST", "/backups"),
    ("GET", "/backups"),
    ("GET", "/backups/changeid"),
    ("GET", "/backups/{job}"),
    ("GET", "/backups/{job}/samples"),
    ("GET", "/jobs"),
    ("POST", "/backups/{job}/progress"),
    ("GET", "/backups/{job}/progress"),
    ("POST", "/backups/{job}/complete"),
    ("DELETE", "/backups/{job}"),
    ("GET", "/points"),
    ("POST", "/restores"),
    ("DELETE", "/restores/{job}"),
    ("GET", "/ports"),
    ("POST", "/policies"),
    ("GET", "/policies"),
    ("GET", "/policies/{job}"),
    ("PATCH", "/policies/{job}"),
    ("DELETE", "/policies/{job}"),
    ("POST", "/policies/{job}/run"),
    ("POST", "/policies/preview"),
    ("GET", "/policies/{job}/preview"),
    ("GET", "/status"),
    ("POST", "/verify"),
    ("GET", "/verify/{job}"),
    ("GET", "/alerts"),
    ("GET", "/repository"),
    ("GET", "/repository/history"),
    ("GET", "/nodes"),
    ("GET", "/nodes/{job}"),
)

#: The query parameters each route with a query takes (and one it does not).
QUERIES = {
    "/backups": ["vm_path", "disk_key", "x"],
    "/backups/changeid": ["vm_path", "disk_key", "x"],
    "/points": ["vm_path", "disk_key", "x"],
    "/alerts": ["active", "kind", "limit", "x"],
    "/jobs": ["kind", "state", "vm_path", "policy", "node", "since", "before", "limit", "x"],
    "/repository/history": ["hours", "x"],
}


def running_hub(repo: Path, node_url: str) -> AppThread:
    """A hub and its API on an event loop in a thread."""
    config = HubConfig(repo=str(repo), nbd_ports=free_port_range(12), node_url=node_url)

    async def make() -> tuple[web.Application, Callable[[], Awaitable[None]]]:
        hub = Hub(config)
        await hub.start()

        async def close() -> None:
            hub.close()
            await hub.wait_closed()

        return build_app(hub, token=None), close

    return AppThread(make, PREFIX).start()


# -- strategies -------------------------------------------------------------------------


def _maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: mostly plausible, sometimes any JSON."""
    return st.one_of(good, good, JSON)


DISK = st.fixed_dictionaries(
    {"key": _maybe(st.sampled_from([2000, 2001]))},
    optional={"capacity": _maybe(st.sampled_from([MIB, 2 * MIB])), "extra": JSON},
)


def _body_for(route: str, outside: Path) -> st.SearchStrategy[Any]:
    vm_path = _maybe(st.just(VM))
    if route == "/backups":
        return st.fixed_dictionaries(
            {"vm_path": vm_path},
            optional={"mode": _maybe(st.sampled_from(["full", "incremental", "auto"])),
                      "disks": _maybe(st.lists(DISK, max_size=3)), "unknown": JSON},
        )  # fmt: skip
    if route == "/restores":
        name = st.one_of(st.sampled_from(["a.raw", "b.qcow2", str(outside / "x.raw"), "../x.raw", ".h"]), TEXT)
        return st.fixed_dictionaries(
            {"point_id": st.one_of(st.just("POINT"), TEXT)},
            optional={"action": _maybe(st.sampled_from(["export", "convert"])),
                      "format": _maybe(st.sampled_from(["raw", "qcow2"])), "path": _maybe(name)},
        )  # fmt: skip
    if route == "/verify":
        return st.one_of(
            st.fixed_dictionaries({"vm_path": vm_path}),
            st.fixed_dictionaries({"point_id": st.one_of(st.just("POINT"), TEXT)}, optional={"vm_path": vm_path}),
        )
    if route.startswith("/policies"):
        schedule = st.one_of(
            st.fixed_dictionaries({"every": _maybe(st.sampled_from([3600, 86400]))}),
            st.fixed_dictionaries({"cron": _maybe(st.sampled_from(["0 22 * * *", "*/5 * * * 1-5", "@daily"]))},
                                  optional={"timezone": _maybe(st.sampled_from(["UTC", "Europe/Berlin"]))}),
        )  # fmt: skip
        return st.fixed_dictionaries(
            {"name": _maybe(st.sampled_from(["p1", "p2"])), "vms": _maybe(st.just({"include": [VM]})),
             "schedule": _maybe(schedule)},
            optional={"retention": _maybe(st.fixed_dictionaries({"keep_daily": _maybe(st.just(7))})),
                      "per_policy": _maybe(st.just(2)), "node": JSON, "unknown": JSON},
        )  # fmt: skip
    if route.endswith("/complete"):
        reported = st.fixed_dictionaries(
            {"disk_key": _maybe(st.just(2000))},
            optional={"change_id": _maybe(st.just("52 aa/1")), "disk_uuid": JSON, "capacity": INTEGERS},
        )
        return st.fixed_dictionaries(
            {"status": _maybe(st.sampled_from(["completed", "failed"]))},
            optional={"disks": _maybe(st.lists(reported, max_size=2)), "vm_path": vm_path,
                      "error": _maybe(st.fixed_dictionaries({"stage": TEXT, "message": TEXT}))},
        )  # fmt: skip
    if route.endswith("/progress"):
        return st.fixed_dictionaries(
            {},
            optional={"stage": _maybe(st.just("transferring")), "status": _maybe(st.just("running")),
                      "bytes_transferred": INTEGERS, "percent": SCALARS, "disks": JSON, "error": JSON},
        )  # fmt: skip
    return JSON


@st.composite
def requests(draw: st.DrawFn, seeds: dict[str, list[str]], outside: Path) -> tuple[str, str, bytes | None, Any]:
    method, route = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    job = draw(st.one_of(st.sampled_from(seeds["jobs"]), TEXT))
    path = route.replace("{job}", quote(job.encode("utf-8", "surrogatepass"), safe=""))
    if method == "GET" and route in QUERIES:
        names = QUERIES[route]
        query = draw(st.dictionaries(st.sampled_from(names), TEXT, max_size=3))
        if draw(st.booleans()):
            query.setdefault("vm_path", VM)
        # Each value within 2000 characters: a request line over 8 KiB is refused by aiohttp's HTTP parser
        # (a plain-text 400) before the API sees it.
        path += "?" + urlencode({k: v[:2000].encode("utf-8", "surrogatepass") for k, v in query.items()})
    if method not in ("POST", "PUT", "PATCH") and draw(st.integers(0, 4)):
        return method, path, None, "application/json"
    if draw(st.integers(0, 3)) == 0:
        return method, path, draw(RAW_BODIES), draw(CONTENT_TYPES)
    value = draw(_body_for(route, outside))
    if isinstance(value, dict) and value.get("point_id") == "POINT":
        value["point_id"] = seeds["points"][0]
    body = json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    return method, path, body, draw(CONTENT_TYPES)


# -- the test ---------------------------------------------------------------------------


@pytest.fixture
def fuzz_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AppThread, Path]]:
    vcsim = {"password": "x", "vms": [{"path": VM, "disks": [{"key": 2000, "capacityInBytes": MIB}]}]}
    node = NodeStandin(vcsim, tmp_path)
    node.hold = True  # it takes jobs and never runs them
    node.start()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (tmp_path / "root").mkdir()
    hub = running_hub(tmp_path / "root" / "repo", node.url)
    yield hub, tmp_path
    hub.stop()
    node.stop()


def _seed(hub: AppThread) -> dict[str, list[str]]:
    """A completed point and a running job for the fuzzer to aim at."""
    status, job = hub.json("POST", "/backups", {"vm_path": VM, "mode": "full"})
    assert status == 201, job
    done = {"status": "completed", "disks": [{"disk_key": 2000, "change_id": "52 aa/1"}]}
    assert hub.json("POST", f"/backups/{job['job_id']}/complete", done)[0] == 200
    [point] = hub.json("GET", f"/points?vm_path={quote(VM)}")[1]["points"]
    status, running = hub.json("POST", "/backups", {"vm_path": VM, "mode": "incremental"})
    assert status == 201, running
    return {"jobs": [job["job_id"], running["job_id"]], "points": [point["id"]]}


def _release(hub: AppThread, method: str, path: str, answer: tuple[int, Any]) -> None:
    """Give back what a successful request took, so the pool never runs dry."""
    status, body = answer
    if status != 201 or method != "POST" or not isinstance(body, dict):
        return
    if path.startswith("/backups"):
        assert hub.call("DELETE", f"/backups/{body['job_id']}")[0] == 200
    elif path.startswith("/policies"):  # before any slot of it comes: its runs would lease ports
        assert hub.call("DELETE", f"/policies/{body['name']}")[0] == 200
    elif body.get("mode") == "export":
        assert hub.call("DELETE", f"/restores/{body['id']}")[0] == 200


def test_every_endpoint_answers_4xx_json_and_writes_only_in_the_repository(
    fuzz_env: tuple[AppThread, Path],
) -> None:
    hub, tmp_path = fuzz_env
    outside = tmp_path / "outside"
    outside.mkdir()
    seeds = _seed(hub)
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + BUDGET

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(requests(seeds, outside))
    def fuzz(request: tuple[str, str, bytes | None, Any]) -> None:
        if time.monotonic() > deadline:
            return
        method, path, body, content_type = request
        answer = hub.call(method, path, body, content_type)
        statuses[answer[0]] = statuses.get(answer[0], 0) + 1
        check_answer(answer, request)
        _release(hub, method, path, answer)

    fuzz()
    assert time.monotonic() <= deadline, f"the fuzzer ran over {BUDGET:.0f} s (answers so far: {statuses})"
    assert statuses.get(400, 0) > EXAMPLES // 4 and statuses.get(201, 0) > 0, statuses
    assert os.listdir(tmp_path / "cwd") == [] and os.listdir(outside) == []
    assert sorted(os.listdir(tmp_path / "root")) == ["repo"]
    # The hub still serves: nothing leaked, and a backup (of another VM: one job per VM) still starts.
    still_running = [j for j in seeds["jobs"] if hub.call("GET", f"/backups/{j}")[1]["state"] == "running"]
    status, ports = hub.call("GET", "/ports")
    assert status == 200 and [u["job_id"] for u in ports["used"]] == still_running, (ports, still_running)
    status, job = hub.json(
        "POST", "/backups", {"vm_path": VM + "-2", "mode": "full", "disks": [{"key": 2001, "capacity": MIB}]}
    )
    assert status == 201 and job["state"] == "running", job
