#!/usr/bin/env python3
"""Benchmark N concurrent backups into one hub: exports in worker processes against one event loop.

Run with the project's venv python::

    /work/main/.venv/bin/python benchmarks/bench_workers.py --quick          # smoke test: 256 MiB, 1 round
    /work/main/.venv/bin/python benchmarks/bench_workers.py --write-results  # 1 GiB, 3 rounds, a RESULTS.md section

Every run starts a fresh hub (``sendense-nbd hub``, no node) on a new repository in tmpfs (/dev/shm: the disk is
never the limit, only CPU is; removed after the run, so memory stays bounded): ``workers`` with the default
``--workers`` (one export worker process per core) or ``loop`` with ``--workers 0`` (every export in the hub's
one event loop, as before workers). A run backs up N VMs at once the way a node does: N jobs are
created through the hub's API (``POST /backups``, one 1-disk full backup each, so N exports on N leased
ports), then N clients push the same dense (random) source image into them concurrently, and each job is
completed through the API (its exports stop and flush). The client is nbdcopy (``--flush --connections=4``)
by default: a node runs on another machine, and on this 2-core box the client's CPU is taken from the hub's;
nbdcopy (C) spends far less CPU per byte than our Python copy engine, so the hub side is what is measured.
``--client ours`` runs ``sendense-nbd copy -C 4`` (the node's engine) instead. ``--client sendfile`` runs
``nbd_sendfile.py``, a lean load generator that sends each write's payload from the page cache: nbdcopy still
costs ~0.75 CPU s/GiB, which on 2 cores leaves no core for a second worker, so only this client shows what the
hub side does with the cores when its nodes run elsewhere.

Method: per hub and N a warm-up run (its points are checked with ``qemu-img compare``), then ``--rounds``
rounds; every other round reverses the order of the hubs and of the counts (A B B A); medians. Aggregate
MB/s = N x image bytes (10^6) / wall seconds from the clients' start to the last one's exit. CPU s/GiB of
data moved: the hub's API process, its export workers (both from /proc/PID/stat over the clients' run), and
the clients (wait4 rusage).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_results as br  # noqa: E402 - RESULTS.md sections
import bench_server as bs  # noqa: E402 - process bookkeeping (every child killed at exit), git
import bench_tunnel as bt  # noqa: E402 - CPU from /proc

REPO, RESULTS, PYTHON, MiB, GiB = bs.REPO, bs.RESULTS, bs.VENV_PYTHON, bs.MiB, 1 << 30
LOG = bs.WORK / "bench-workers.log"
HUBS = {"workers": [], "loop": ["--workers", "0"]}
TARGET = 1.6
CLIENTS = {
    "nbdcopy": "`nbdcopy --flush --connections=4 --threads=4 SRC URI`",
    "ours": "`sendense-nbd copy -C 4 SRC URI` (our copy engine)",
    "sendfile": "`benchmarks/nbd_sendfile.py --connections 4 SRC URI` (256 KiB writes sent from the page cache"
    " with sendfile, 8 in flight per connection, then a flush: a lean stand-in for a node on another machine)",
}
DISK = 2000


@dataclass
class Sample:
    mbps: float
    cpu: dict[str, float]  # s/GiB by role


@dataclass
class Hub:
    """One hub process and its API."""

    label: str
    proc: subprocess.Popen[bytes]
    url: str

    def call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/api/v1{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read() or b"null")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.call("GET", "/ports")["workers"] if w["pid"] is not None]

    def wait_completed(self, job_id: str) -> dict[str, Any]:
        """The job, once completed (its exports stopped and flushed)."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            job = self.call("GET", f"/backups/{job_id}")
            if job["state"] == "completed":
                return job
            if job["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {job_id} is {job['state']}: {job.get('error')}")
            time.sleep(0.05)
        raise RuntimeError(f"job {job_id}: not completed within 600 s")


@dataclass
class Bench:
    args: argparse.Namespace
    size: int
    source: Path
    root: Path
    cells: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)
    #: Seconds each ``POST /backups`` took, by hub kind and whether it was a fresh hub's first (which starts
    #: an export worker).
    creates: dict[tuple[str, bool], list[float]] = field(default_factory=dict)

    def start_hub(self, label: str, first_port: int) -> Hub:
        repo = self.root / label
        shutil.rmtree(repo, ignore_errors=True)
        cmd = [str(PYTHON), "-m", "sendense_nbd", "hub", "--repo", str(repo), "--listen", "127.0.0.1:0",
               "--nbd-ports", f"{first_port}-{first_port + 15}", "--min-free", "0",
               *HUBS[label]]  # fmt: skip
        proc = bs._spawn(cmd, LOG, stdout=subprocess.PIPE, cwd=str(REPO))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {label} hub did not start; see {LOG}")
        port = json.loads(line)["listening"].rsplit(":", 1)[1]
        return Hub(label, proc, f"http://127.0.0.1:{port}")

    def client(self, uri: str) -> list[str]:
        if self.args.client == "ours":
            return [str(PYTHON), "-m", "sendense_nbd", "copy", "-C", "4", str(self.source), uri]
        if self.args.client == "sendfile":
            return [str(PYTHON), str(HERE / "nbd_sendfile.py"), "--connections", "4", str(self.source), uri]
        return ["nbdcopy", "--flush", "--connections=4", "--threads=4", str(self.source), uri]

    def run_once(self, hub: Hub, count: int, check: bool) -> Sample:
        jobs = []
        for index in range(count):
            body = {"vm_path": f"/DC0/vm/bench{index}", "mode": "full", "disks": [{"key": DISK, "capacity": self.size}]}
            posted = time.monotonic()
            jobs.append(hub.call("POST", "/backups", body))
            self.creates.setdefault((hub.label, index == 0), []).append(time.monotonic() - posted)
        workers = hub.worker_pids()
        before = (bt.cpu_seconds([hub.proc.pid]), bt.cpu_seconds(workers), bs._cpu_snapshot()[1])
        started = time.monotonic()
        procs = [bs._spawn(self.client(job["detail"]["disks"][0]["uri"]), LOG, stdout=LOG.open("ab")) for job in jobs]
        client_cpu = sum(_reap(proc, self.args.timeout) for proc in procs)
        elapsed = time.monotonic() - started
        cpu = {"hub": bt.cpu_seconds([hub.proc.pid]) - before[0], "workers": bt.cpu_seconds(workers) - before[1]}
        cpu["client"] = client_cpu
        cpu["machine"] = bs._cpu_snapshot()[1] - before[2]  # every process's: ours and the other helpers'
        for job in jobs:
            disks = [{"disk_key": DISK, "change_id": None}]
            hub.call("POST", f"/backups/{job['job_id']}/complete", {"status": "completed", "disks": disks})
        for job in jobs:
            done = hub.wait_completed(job["job_id"])
            if check:
                point = done["detail"]["disks"][0]["point_id"]
                image = next((self.root / hub.label / "vms").rglob(f"{point}.qcow2"))
                subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(self.source), str(image)],
                               check=True, capture_output=True)  # fmt: skip
        gib = count * self.size / GiB
        return Sample(count * self.size / elapsed / 1e6, {role: seconds / gib for role, seconds in cpu.items()})

    def measure(self, label: str, count: int, warmup: bool) -> None:
        hub = self.start_hub(label, _free_ports(16))
        try:
            sample = self.run_once(hub, count, check=warmup)
        finally:
            hub.proc.send_signal(signal.SIGTERM)
            hub.proc.wait(120)
            bs._children.pop(hub.proc.pid, None)
            shutil.rmtree(self.root / label, ignore_errors=True)
        cpu = "  ".join(f"{role} {value:.2f}" for role, value in sample.cpu.items() if role != "machine")
        print(f"  {label:>7} N={count}{' warm-up' if warmup else ''}: {sample.mbps:7.1f} MB/s aggregate,"
              f" CPU s/GiB: {cpu}", flush=True)  # fmt: skip
        if not warmup:
            self.cells.setdefault((label, count), []).append(sample)

    def mbps(self, label: str, count: int) -> float | None:
        samples = self.cells.get((label, count))
        return statistics.median(s.mbps for s in samples) if samples else None

    def cpu(self, label: str, count: int, role: str) -> float:
        return statistics.median(s.cpu[role] for s in self.cells[(label, count)])


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for a client (killed after ``timeout``); its CPU seconds (user + system, wait4)."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    bs._children.pop(proc.pid, None)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, proc.args))} failed ({proc.returncode}); see {LOG}")  # type: ignore[arg-type]
    return usage.ru_utime + usage.ru_stime


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (bound and released: best effort)."""
    import socket

    for start in range(32000, 60000, 101):
        held: list[socket.socket] = []
        try:
            for port in range(start, start + count):
                held.append(socket.create_server(("127.0.0.1", port)))
            return start
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free port range")


def run_matrix(bench: Bench) -> None:
    labels, counts = list(bench.args.hubs), list(bench.args.counts)
    for label in labels:
        for count in counts:
            bench.measure(label, count, warmup=True)
    for rnd in range(bench.args.rounds):
        for label in labels if rnd % 2 == 0 else labels[::-1]:
            for count in counts if rnd % 2 == 0 else counts[::-1]:
                bench.measure(label, count, warmup=False)


def table(bench: Bench) -> str:
    lines = [
        "| hub | N | aggregate MB/s (median) | vs N=1 | workers / loop | hub API CPU s/GiB | workers CPU s/GiB"
        " | hub side s/GiB | client s/GiB | hub side cores | client cores | other processes' cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, count), _ in sorted(bench.cells.items(), key=lambda item: (list(HUBS).index(item[0][0]), item[0][1])):
        mbps, one = bench.mbps(label, count), bench.mbps(label, 1)
        loop = bench.mbps("loop", count)
        versus = f"{mbps / one:.2f}x" if mbps and one else ""
        other = f"{mbps / loop:.2f}x" if label == "workers" and mbps and loop else ""
        hub, workers, client, machine = (bench.cpu(label, count, r) for r in ("hub", "workers", "client", "machine"))
        gibps = mbps * 1e6 / GiB  # cores busy = CPU s/GiB x GiB/s
        others = max(0.0, machine - hub - workers - client) * gibps
        lines.append(
            f"| {label} | {count} | {mbps:.0f} | {versus} | {other} | {hub:.2f} | {workers:.2f} | {hub + workers:.2f}"
            f" | {client:.2f} | {(hub + workers) * gibps:.2f} | {client * gibps:.2f} | {others:.2f} |"
        )
    return "\n".join(lines)


def goals(bench: Bench) -> list[str]:
    found = []
    for label in bench.args.hubs:
        two, one = bench.mbps(label, 2), bench.mbps(label, 1)
        if two is None or one is None:
            continue
        ratio = two / one
        verdict = "met" if ratio >= TARGET else f"MISSED by {TARGET - ratio:.2f}"
        what = "the target" if label == "workers" else "information: one event loop, for comparison"
        found.append(f"- {label}: 2 concurrent backups aggregate {ratio:.2f}x one backup's (>= {TARGET}x): {verdict}"
                     f" ({what})")  # fmt: skip
        if label == "workers":
            found.append(ceiling(bench, one))
    return found


def ceiling(bench: Bench, one: float) -> str:
    """What this machine allows 2 concurrent backups at most: its cores over the CPU a GiB costs end to end
    (hub side + client, at N=2), against one backup's median."""
    per_gib = sum(bench.cpu("workers", 2, role) for role in ("hub", "workers", "client"))
    cores = os.cpu_count() or 1
    top = cores / per_gib * GiB / 1e6
    return (
        f"- ceiling here: {cores} cores / {per_gib:.2f} CPU s per GiB (hub side + client, N=2) = {top:.0f} MB/s for"
        f" any N, {top / one:.2f}x one backup's median, with no other process on the machine"
    )


def header(bench: Bench, load0: float, elapsed: float, argv: list[str], others: str) -> list[str]:
    client = CLIENTS[bench.args.client]
    return [
        br.machine(load0, elapsed),
        f"- benchmark: `.venv/bin/python benchmarks/bench_workers.py {' '.join(_shown(argv))}` (the texts below)",
        f"- {bs.human(bench.size)} random (dense) source in /dev/shm; each hub's repository in /dev/shm (tmpfs: the"
        " disk is not the limit); a fresh hub per run, `sendense-nbd hub --min-free 0` with the default `--workers`"
        f" ({os.cpu_count()}: one per core) and `--workers 0` (one event loop); per backup one job through the API"
        f" (a 1-disk full), its export written by {client}, then completed through the API",
        f"- a warm-up run per hub and N (points checked with qemu-img compare), then {bench.args.rounds} rounds, hubs"
        " and N in A B B A order; medians; CPU s/GiB of data moved over the clients' run: the hub's API process,"
        " its export workers, the clients; cores = CPU s/GiB x GiB/s; other processes' cores = the machine's busy time"
        " (/proc/stat) less the hub's and the clients'",
        f"- also running on the machine: {others}",
        f"- starting a backup (`POST /backups`, point + lease + export): {startup(bench)}",
    ]


def _shown(argv: list[str]) -> list[str]:
    """``argv`` with the values of ``--note`` and ``--others`` (written out below it) as ``TEXT``."""
    return ["TEXT" if index and argv[index - 1] in ("--note", "--others") else arg for index, arg in enumerate(argv)]


def startup(bench: Bench) -> str:
    """How long a fresh hub's first backup takes to start (with workers: it starts an export worker) against
    the others, medians by hub kind."""
    found = []
    for label in bench.args.hubs:
        first, rest = bench.creates.get((label, True)), bench.creates.get((label, False))
        if first and rest:
            found.append(f"{label}: first {statistics.median(first) * 1000:.0f} ms, then"
                         f" {statistics.median(rest) * 1000:.0f} ms")  # fmt: skip
    return "; ".join(found) + " (medians)"


def write_results(bench: Bench, load0: float, elapsed: float, argv: list[str], others: str) -> None:
    dirty = " (dirty tree)" if bs.git_dirty() else ""
    now = datetime.datetime.now(datetime.UTC)
    title = (f"## Concurrent backups into one hub: export workers vs one event loop (issue 18),"
             f" {now:%Y-%m-%d %H:%M} UTC, commit {bs.git_head()}{dirty}")  # fmt: skip
    section = br.section(title, header(bench, load0, elapsed, argv, others), table(bench), 18, goals(bench),
                         bench.args.note)  # fmt: skip
    br.add_section(RESULTS, section)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512M", help="source image size (default 512M: N=4 keeps 2 GiB in tmpfs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--hubs", type=lambda s: s.split(","), default=list(HUBS))
    parser.add_argument("--client", choices=list(CLIENTS), default="nbdcopy")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--quick", action="store_true", help="256 MiB, 1 round, no RESULTS.md")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--note", default="", help="a closing note for the RESULTS.md section")
    parser.add_argument("--others", default="nothing else known", help="what else ran on the machine meanwhile")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.rounds = "256M", 1
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    size = bs.parse_size(args.size)
    bs.WORK.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-workers-", dir="/dev/shm"))
    load0, started = os.getloadavg()[0], time.monotonic()
    bench = Bench(args, size, root / "source.raw", root)
    try:
        with bench.source.open("wb") as file:
            for _ in range(size // (16 * MiB)):
                file.write(os.urandom(16 * MiB))
        run_matrix(bench)
        print(table(bench))
        print("\n".join(goals(bench)))
        print(f"starting a backup: {startup(bench)}")
        if args.write_results:
            write_results(bench, load0, time.monotonic() - started, argv, args.others)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
