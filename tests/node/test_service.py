"""The node service's typed boundary and its own tasks, without peers: its vCenter and hub are closed
ports on 127.0.0.1, so a job fails at once unless it is cancelled first."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sendense_nbd.backup import Mode
from sendense_nbd.errors import Conflict, NodeBusy, UnknownJob
from sendense_nbd.node import service
from sendense_nbd.node.config import NodeConfig
from sendense_nbd.node.jobs import JobState, JobTable, NodeJob
from sendense_nbd.node.requests import BackupRequest
from sendense_nbd.node.service import Node


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(job_id: str) -> BackupRequest:
    hub = f"http://127.0.0.1:{_closed_port()}"
    return BackupRequest(job_id, "/DC0/vm/VM0", Mode.AUTO, ((2000, "nbd://127.0.0.1:9/x"),), hub)


def _finished(table: JobTable, job_id: str) -> NodeJob:
    job = NodeJob(_request(job_id), state=JobState.COMPLETED)
    table.add(job)
    table.finished(job)
    return job


def test_history_keeps_the_last_finished_jobs_and_every_unfinished_one() -> None:
    table = JobTable(history=3)
    running = NodeJob(_request("running"), state=JobState.RUNNING)
    table.add(running)
    for i in range(5):
        _finished(table, f"done{i}")
    assert [job.job_id for job in table] == ["running", "done2", "done3", "done4"]
    again = _finished(table, "done2")  # posted again: replaces the old one and is now the newest
    _finished(table, "done5")
    assert [job.job_id for job in table] == ["running", "done4", "done2", "done5"]
    assert table.get("done2") is again
    with pytest.raises(UnknownJob, match="no job 'done3'"):
        table.get("done3")
    table.finished(NodeJob(_request("done4")))  # a job the table no longer holds changes nothing
    assert len(table) == 4 and "done4" in table


async def test_node_raises_domain_errors_and_owns_its_tasks() -> None:
    config = NodeConfig(endpoint=f"127.0.0.1:{_closed_port()}", username="u", password="p", max_queued=2)
    node = Node(config)
    await node.start()
    job = node.start_backup(_request("a"))
    assert job.state is JobState.QUEUED and node.job("a") is job
    with pytest.raises(Conflict, match="job a is already running here") as conflict:
        node.start_backup(_request("a"))
    assert conflict.value.code == "conflict"
    with pytest.raises(UnknownJob, match="no job 'nope'"):
        await node.cancel("nope")
    node.start_backup(_request("b"))
    with pytest.raises(NodeBusy, match="2 jobs are already waiting"):
        node.start_backup(_request("c"))
    node.close()
    with pytest.raises(NodeBusy, match="shutting down"):
        node.start_backup(_request("d"))
    await node.wait_closed()
    assert [(j.job_id, j.active) for j in node.jobs()] == [("a", False), ("b", False)]
    # Nothing awaited since they were queued: both were cancelled before they ran, and say so.
    assert all(j.state is JobState.CANCELLED and j.finished and j.progress is None for j in node.jobs())
    assert node.job("a").to_json()["state"] == "cancelled"


async def test_a_defect_fails_its_job_alone_and_the_node_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that hits a defect (an error no layer translates, injected here where jobs are prepared)
    fails, and the node's task group does not cancel the next job: it runs and fails the same way.
    Later jobs still start, and close() cancels them."""

    def defect(settings: object) -> None:
        raise RuntimeError("a defect")

    monkeypatch.setattr(service, "prepare", defect)
    config = NodeConfig(endpoint=f"127.0.0.1:{_closed_port()}", username="u", password="p", max_jobs=1)
    node = Node(config)
    await node.start()
    first, second = node.start_backup(_request("a")), node.start_backup(_request("b"))
    tasks = [job.task for job in (first, second) if job.task is not None]
    done, _ = await asyncio.wait(tasks, timeout=30)
    assert len(done) == 2
    for job in (first, second):
        assert job.state is JobState.FAILED and job.error is not None and job.finished, job.to_json()
        assert job.error.message == "node defect: RuntimeError('a defect')"
    third = node.start_backup(_request("c"))
    node.close()
    await asyncio.wait_for(node.wait_closed(), timeout=30)
    assert third.state is JobState.CANCELLED and [j.job_id for j in node.jobs()] == ["a", "b", "c"]


async def test_close_while_starting_ends_the_start() -> None:
    """close() before the task group is open: start() still returns, and the node refuses jobs."""
    node = Node(NodeConfig(endpoint=f"127.0.0.1:{_closed_port()}", username="u", password="p"))
    starting = asyncio.get_running_loop().create_task(node.start())
    await asyncio.sleep(0)  # start() has made the group's holder, which has not run yet
    node.close()
    await asyncio.wait_for(starting, timeout=10)
    await asyncio.wait_for(node.wait_closed(), timeout=10)
    with pytest.raises(NodeBusy, match="shutting down"):
        node.start_backup(_request("a"))
