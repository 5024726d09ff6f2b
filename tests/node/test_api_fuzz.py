"""A hypothesis fuzzer over every node endpoint, against a real node (in-process, real HTTP) whose
vCenter and hub are closed ports on 127.0.0.1, so accepted jobs fail at once and nothing leaves the
machine (``hub_url`` pins where jobs may report and write).

Every answer is below 500, or a peer's failure (502 vsphere) or a full queue (503 busy); every error is
``{"error": {"code", "message"}}``. After the run nothing was written in the working directory, the
queue drained, and the node still takes a job. Derandomized and bounded like the hub's fuzzer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendense_nbd.node.api import PREFIX, build_app
from sendense_nbd.node.config import NodeConfig
from sendense_nbd.node.service import Node
from tests.api_fuzz import CONTENT_TYPES, JSON, RAW_BODIES, TEXT, VM, AppThread, check_answer

EXAMPLES = 600
#: Wall-time bound of the run: past it the remaining examples do nothing and the test fails.
BUDGET = 120.0
ROUTES = (
    ("POST", "/backups"),
    ("GET", "/backups"),
    ("GET", "/backups/{job}"),
    ("DELETE", "/backups/{job}"),
    ("GET", "/vms/disks"),
)
#: A vCenter that is not there (502) and a full queue (503) are answers about peers, not defects.
UPSTREAM = frozenset({502, 503})


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def running_node(hub_url: str) -> AppThread:
    config = NodeConfig(
        endpoint=f"127.0.0.1:{_closed_port()}",
        username="u",
        password="p",
        thumbprint="AA:" * 31 + "AA",
        hub_urls=(hub_url,),
    )

    async def make() -> tuple[web.Application, Callable[[], Awaitable[None]]]:
        node = Node(config)
        await node.start()

        async def close() -> None:
            node.close()
            await node.wait_closed()

        return build_app(node, token=None), close

    return AppThread(make, PREFIX).start()


def _maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(good, good, JSON)


def _job_body(hub_url: str, outside: Path) -> st.SearchStrategy[Any]:
    target = st.sampled_from(
        ["nbd://127.0.0.1:9/x", str(outside / "disk.raw"), f"file://{outside}/d", "nbd://198.51.100.7/x",
         "nbd+unix:///x?socket=/tmp/s", "nbds://127.0.0.1/x", "nbd://127.0.0.1:99999/x"]
    )  # fmt: skip
    valid = st.fixed_dictionaries(
        {"job_id": st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True), "vm_path": st.just(VM),
         "api_url": st.just(hub_url), "targets": st.just({"2000": "nbd://127.0.0.1:9/x"})},
        optional={"mode": st.sampled_from(["full", "incremental", "auto"])},
    )  # fmt: skip
    return st.one_of(valid, _mutated(hub_url, target))


def _mutated(hub_url: str, target: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"job_id": _maybe(st.sampled_from(["j1", "j2", "../j", ""])), "vm_path": _maybe(st.just(VM)),
         "api_url": _maybe(st.sampled_from([hub_url, "http://198.51.100.7:8082", "file:///etc/passwd"])),
         "targets": _maybe(st.dictionaries(st.sampled_from(["2000", "2001", "x", "-1", "99999999999"]),
                                           _maybe(target), max_size=3))},
        optional={"mode": _maybe(st.sampled_from(["full", "incremental", "auto"])), "unknown": JSON},
    )  # fmt: skip


@st.composite
def requests(draw: st.DrawFn, hub_url: str, outside: Path) -> tuple[str, str, bytes | None, Any]:
    method, route = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    job = draw(st.one_of(st.sampled_from(["j1", "j2"]), TEXT))
    path = route.replace("{job}", quote(job.encode("utf-8", "surrogatepass"), safe=""))
    if route == "/vms/disks":
        query = draw(st.dictionaries(st.sampled_from(["vm_path", "x"]), TEXT, max_size=2))
        path += "?" + urlencode({k: v[:2000].encode("utf-8", "surrogatepass") for k, v in query.items()})
    if method != "POST":
        return method, path, None, "application/json"
    if draw(st.integers(0, 3)) == 0:
        return method, path, draw(RAW_BODIES), draw(CONTENT_TYPES)
    body = json.dumps(draw(_job_body(hub_url, outside)), ensure_ascii=draw(st.booleans()))
    return method, path, body.encode("utf-8", "surrogatepass"), draw(CONTENT_TYPES)


@pytest.fixture
def fuzz_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AppThread, str, Path]]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    hub_url = f"http://127.0.0.1:{_closed_port()}"
    node = running_node(hub_url)
    yield node, hub_url, tmp_path
    node.stop()


def test_every_node_endpoint_answers_json_errors_and_writes_nothing(
    fuzz_env: tuple[AppThread, str, Path],
) -> None:
    node, hub_url, tmp_path = fuzz_env
    outside = tmp_path / "outside"
    outside.mkdir()
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + BUDGET

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(requests(hub_url, outside))
    def fuzz(request: tuple[str, str, bytes | None, Any]) -> None:
        if time.monotonic() > deadline:
            return
        answer = node.call(*request)
        statuses[answer[0]] = statuses.get(answer[0], 0) + 1
        check_answer(answer, request, UPSTREAM)

    fuzz()
    assert time.monotonic() <= deadline, f"the fuzzer ran over {BUDGET:.0f} s (answers so far: {statuses})"
    assert statuses.get(400, 0) > EXAMPLES // 4 and statuses.get(202, 0) > 0, statuses
    assert os.listdir(tmp_path / "cwd") == [] and os.listdir(outside) == []
    # Every accepted job ended (its vCenter is a closed port), and the node still takes one.
    end = time.monotonic() + 30
    while time.monotonic() < end:
        jobs = node.call("GET", "/backups")[1]["backups"]
        if all(job["state"] in ("failed", "cancelled", "completed") for job in jobs):
            break
        time.sleep(0.1)
    assert all(job["state"] in ("failed", "cancelled") for job in jobs), jobs
    job = {"job_id": "last", "vm_path": VM, "api_url": hub_url, "targets": {"2000": "nbd://127.0.0.1:9/x"}}
    assert node.json("POST", "/backups", job)[0] == 202
