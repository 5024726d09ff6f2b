#!/usr/bin/env python3
"""Benchmark sendense-nbd against qemu-nbd, in the same run, on loopback.

Run with the project's venv python (stdlib only)::

    /work/main/.venv/bin/python benchmarks/bench_server.py            # full, 2 GiB
    /work/main/.venv/bin/python benchmarks/bench_server.py --quick    # smoke test
    /work/main/.venv/bin/python benchmarks/bench_server.py --write-results

Cases (each against both servers, same flags: ``-f FORMAT -e N -t
--cache=MODE --discard=MODE``; ``--format raw`` (default) or ``qcow2``):

* ``dense write``: ``nbdcopy --flush dense.img nbd://...`` into a fresh
  target (a sparse file, or an empty ``qemu-img create -f qcow2`` image),
  default connections (4) and ``--connections=1``;
* ``sparse write``: the same from a sparse source with 10% data;
* ``dense2``, ``dense4``: the dense write with ``--connections=2``, and
  ``--connections=4 --threads=4`` (nbdcopy never uses more connections than
  threads, which default to nproc: on 2 cores ``dense`` runs 2);
* ``--nbdcopy-defaults`` (issue 19's configuration): 1 GiB, ``-e 4``, 4 rounds,
  cases dense, dense1, dense2, dense4;
* ``read``: ``nbdcopy nbd://... null:`` from an export of the dense data
  (the raw file, or its ``qemu-img convert -O qcow2`` copy);
* ``memory``: peak RSS (VmHWM) of each server while 10 libnbd clients keep
  16 x 2 MiB requests in flight each for ~10 s.

qcow2 only (``--format qcow2``; in its default case list):

* ``overlay``: an empty overlay on a base full of data; a libnbd client
  writes N MiB at random distinct 1 MiB slots and flushes, N = 16, 64, 256,
  and N = 64 over a 200 MiB base: the time should follow N, not the base;
* ``bigdisk``: an empty 2 TiB qcow2; 256 MiB of 1 MiB writes scattered over
  the whole range, then reads back; peak RSS must stay < 200 MiB.

In qcow2 mode every image a server wrote to is ``qemu-img check``-ed after
the server exits, and each server's first write run of a case is
``qemu-img compare``-d with its source.

Each timed case: one warm-up run per server, then ``--rounds`` rounds in
A B, B A, A B ... order; the median MB/s (10^6 bytes of virtual size per
second, nbdcopy's wall time including ``--flush``) and ours/qemu ratio are
reported. A server is started per run, and every server is killed at exit.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
RESULTS = HERE / "RESULTS.md"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, the one that imports python3-libnbd
HOST = "127.0.0.1"
MiB = 1024 * 1024
SPARSE_STRIDE = 10 * MiB  # one 1 MiB random block every 10 MiB: 10% data
SPARSE_BLOCK = 1 * MiB

TARGETS = {
    # case kind -> minimal ours/qemu ratio
    "dense": 1.0,
    "sparse": 0.8,
    "read": 0.8,
}
RSS_LIMIT_MIB = 100
BIGDISK_RSS_LIMIT_MIB = 200
OVERLAY_SMALL_BASE = 200 * MiB

# --------------------------------------------------------------------------
# process bookkeeping: every server we start is killed at exit, even on error

_children: dict[int, subprocess.Popen[bytes]] = {}


def _kill(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    _children.pop(proc.pid, None)


def _kill_all() -> None:
    for proc in list(_children.values()):
        try:
            _kill(proc, grace=2.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


atexit.register(_kill_all)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGHUP, _on_signal)
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background


def _spawn(cmd: list[str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            cmd, stdin=subprocess.DEVNULL, stderr=err, **kw
        )
    _children[proc.pid] = proc
    return proc


# --------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server not listening on {port} after {timeout}s")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    cmd: list[str]

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.port}"

    def status(self, key: str) -> int:
        """A kB figure from /proc/PID/status, e.g. VmHWM."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) if m else 0

    def cpu_seconds(self, task: int | None = None) -> float:
        """User+system CPU s of the process (all threads, exited ones too), or of one thread ``task``."""
        stat = f"/proc/{self.proc.pid}/stat" if task is None else f"/proc/{self.proc.pid}/task/{task}/stat"
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def main_thread_seconds(self) -> float:
        """CPU s of the main thread: the event loop (ours), the coroutines and socket I/O (qemu-nbd)."""
        return self.cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        _kill(self.proc)


class Config:
    def __init__(self, args: argparse.Namespace) -> None:
        self.cache: str = args.cache
        self.discard: str = args.discard
        self.shared: int = args.shared
        self.timeout: float = args.timeout
        self.format: str = getattr(args, "format", "raw")
        self.prefault: bool = getattr(args, "prefault", False)
        self.sync: bool = not getattr(args, "no_sync", False)
        self.ours_prefix: list[str] = []  # e.g. a profiler wrapping our server

    def server_flags(self) -> str:
        return f"-f {self.format} -e {self.shared} -t --cache={self.cache} --discard={self.discard}"

    def ours_cmd(self, image: Path, readonly: bool, port: int = 0) -> list[str]:
        cmd = [str(VENV_PYTHON), *self.ours_prefix, "-m", "sendense_nbd", "serve", "-f", self.format]
        cmd += ["--port", str(port)]
        cmd += ["-e", str(self.shared), "-t", "--cache", self.cache, "--discard", self.discard]
        if readonly:
            cmd.append("-r")
        return cmd + [str(image)]

    def qemu_cmd(self, image: Path, readonly: bool, port: int) -> list[str]:
        cmd = ["qemu-nbd", "-f", self.format, "-x", "", "-p", str(port), "-b", HOST, "-e", str(self.shared), "-t"]
        cmd += [f"--cache={self.cache}", f"--discard={self.discard}"]
        if readonly:
            cmd.append("-r")
        return cmd + [str(image)]

    def start(self, which: str, image: Path, readonly: bool = False) -> Server:
        log = WORK / f"{which}-server.log"
        if which == "ours":
            out = tempfile.NamedTemporaryFile(dir=WORK, prefix="ours-port-", delete=False)
            out.close()
            out_path = Path(out.name)
            cmd = self.ours_cmd(image, readonly)
            with open(out_path, "wb") as stdout:
                proc = _spawn(cmd, log, stdout=stdout, cwd=str(REPO))
            try:
                deadline = time.monotonic() + 30
                port = 0
                while time.monotonic() < deadline:
                    text = out_path.read_text()
                    m = re.match(r"\s*(\d+)\s*\n", text)
                    if m:
                        port = int(m.group(1))
                        break
                    if proc.poll() is not None:
                        raise RuntimeError(f"our server exited with {proc.returncode}; see {log}")
                    time.sleep(0.05)
                if not port:
                    raise RuntimeError(f"our server printed no port; see {log}")
            except BaseException:
                _kill(proc)
                raise
            finally:
                out_path.unlink(missing_ok=True)
        else:
            port = free_port()
            cmd = self.qemu_cmd(image, readonly, port)
            proc = _spawn(cmd, log, stdout=subprocess.DEVNULL)
        try:
            wait_listening(port, proc)
        except BaseException:
            _kill(proc)
            raise
        return Server(which, proc, port, cmd)


# --------------------------------------------------------------------------
# images


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    scale: int = 1024 ** " KMGT".index((m.group(2) or " ").upper())
    return int(m.group(1)) * scale


def human(size: int) -> str:
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", MiB)):
        if size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def make_dense(size: int) -> Path:
    path = WORK / f"dense-{size}.img"
    if path.exists() and path.stat().st_size == size and path.stat().st_blocks * 512 >= size:
        return path
    print(f"generating {path} ({human(size)} random data)...", flush=True)
    tmp = path.with_suffix(".tmp")
    chunk = 8 * MiB
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def make_sparse(size: int) -> Path:
    path = WORK / f"sparse-{size}.img"
    if path.exists() and path.stat().st_size == size:
        return path
    print(f"generating {path} ({human(size)}, 1 MiB random every 10 MiB)...", flush=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, SPARSE_STRIDE):
            f.seek(offset)
            f.write(os.urandom(min(SPARSE_BLOCK, size - offset)))
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def prefault(nbytes: int) -> None:
    """Touch then free ``nbytes`` of anonymous memory.

    On this VM, memory the guest left free for a few seconds goes back to the
    host (virtio-balloon free page reporting); the next 2 GiB of page cache
    then costs ~5 s of hypervisor faults inside whichever pwrite allocates it,
    swamping what the servers do. Writing the memory just before a timed run
    makes those pages resident again. It only partly helps: the guest reports
    free pages again after ~2 s, before a slow run has used them all, so it
    is off by default (``--prefault``).
    """
    import mmap

    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        try:
            m.madvise(23)  # MADV_POPULATE_WRITE (Linux 5.14+)
        except OSError:
            for off in range(0, nbytes, 4096):
                m[off] = 1
    finally:
        m.close()


def warm_cache(path: Path) -> None:
    """Read a source file through, so every run starts with it in page cache."""
    buf = bytearray(8 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while n := os.preadv(fd, [buf], offset):
            offset += n
    finally:
        os.close(fd)


def qemu_img(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout)


def make_qcow2_copy(raw: Path) -> Path:
    """``qemu-img convert -O qcow2`` of a raw source, made once (the read export, the overlay base)."""
    path = raw.with_suffix(".qcow2")
    if path.exists() and path.stat().st_mtime >= raw.stat().st_mtime:
        return path
    print(f"converting {raw.name} to {path.name} (qemu-img convert -O qcow2)...", flush=True)
    tmp = path.with_suffix(".qcow2.tmp")
    tmp.unlink(missing_ok=True)
    res = qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp))
    if res.returncode != 0:
        raise RuntimeError(f"qemu-img convert failed: {res.stderr}")
    tmp.rename(path)
    return path


def target_path(fmt: str) -> Path:
    return WORK / ("target.qcow2" if fmt == "qcow2" else "target.img")


def fresh_target(size: int, fmt: str = "raw") -> Path:
    path = target_path(fmt)
    path.unlink(missing_ok=True)
    if fmt == "qcow2":
        res = qemu_img("create", "-q", "-f", "qcow2", str(path), str(size))
        if res.returncode != 0:
            raise RuntimeError(f"qemu-img create failed: {res.stderr}")
        return path
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --------------------------------------------------------------------------
# correctness checks of qcow2 images a server wrote to


@dataclass
class Check:
    what: str  # e.g. "dense write, 4 conn / ours / round 2"
    tool: str  # check | compare | exit
    ok: bool
    detail: str = ""


CHECKS: list[Check] = []
LOAD: dict[str, float] = {}  # 1-minute load average at start, max during, end: other processes add noise


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, machine busy CPU s, CPU s of this process and its reaped children).

    Busy = user + nice + system + irq + softirq: the loopback traffic's softirq
    time is charged to the processes' system time but to its own column here.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    machine = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.monotonic(), machine, t.user + t.system + t.children_user + t.children_system


def other_cpu(start: tuple[float, float, float], end: tuple[float, float, float]) -> tuple[float, float]:
    """(CPU s used by processes that are not the benchmark's, wall s) between two snapshots.

    Valid once every child is reaped; approximate (about +-1 s per minute).
    """
    return max(0.0, (end[1] - start[1]) - (end[2] - start[2])), end[0] - start[0]


def _watch_load(stop: threading.Event) -> None:
    while not stop.wait(5.0):
        LOAD["max"] = max(LOAD.get("max", 0.0), os.getloadavg()[0])


KEEP_FAILED = 3  # keep at most this many failed images for inspection


def _keep_failed(path: Path) -> str:
    kept = sorted(WORK.glob("FAILED-*"))
    if len(kept) >= KEEP_FAILED:
        return "(image not kept)"
    dest = WORK / f"FAILED-{len(kept) + 1}-{path.name}"
    path.rename(dest)
    return f"(image kept as {dest.relative_to(REPO)})"


def check_image(path: Path, what: str) -> bool:
    """``qemu-img check`` a qcow2 image after its server exited; records the result."""
    res = qemu_img("check", "-f", "qcow2", str(path))
    ok = res.returncode == 0
    detail = ""
    if not ok:
        kind = {1: "check failed", 2: "corruptions", 3: "leaked clusters"}.get(res.returncode, "error")
        lines = (res.stdout + res.stderr).strip().splitlines()
        text = " | ".join(lines if len(lines) <= 8 else [*lines[:4], f"... ({len(lines) - 8} lines)", *lines[-4:]])
        detail = f"rc {res.returncode} ({kind}): {text} {_keep_failed(path)}"
        print(f"   !! qemu-img check FAILED for {what}: {detail}", flush=True)
    CHECKS.append(Check(what, "check", ok, detail))
    return ok


def compare_image(source: Path, image: Path, what: str) -> bool:
    """``qemu-img compare`` of a written qcow2 image with its raw source."""
    res = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(source), str(image))
    ok = res.returncode == 0
    detail = "" if ok else f"rc {res.returncode}: {(res.stdout + res.stderr).strip()[-1000:]}"
    if not ok:
        print(f"   !! qemu-img compare: {what} differs from its source: {detail}", flush=True)
    CHECKS.append(Check(what, "compare", ok, detail))
    return ok


def note_exit(server: Server, what: str) -> None:
    """Record a server that did not exit 0 on SIGTERM (it may not have flushed)."""
    rc = server.proc.returncode
    if rc != 0:
        detail = f"{server.name} exited with {rc} after SIGTERM"
        print(f"   !! {what}: {detail}", flush=True)
        CHECKS.append(Check(what, "exit", False, detail))


def check_summary(prefix: str = "") -> tuple[int, int, int, int]:
    """(checks passed, checks run, compares identical, compares run) for entries whose label starts with prefix."""
    mine = [c for c in CHECKS if c.what.startswith(prefix)]
    checks = [c for c in mine if c.tool == "check"]
    compares = [c for c in mine if c.tool == "compare"]
    return sum(c.ok for c in checks), len(checks), sum(c.ok for c in compares), len(compares)


# --------------------------------------------------------------------------
# cases


@dataclass
class Case:
    key: str
    title: str
    kind: str  # dense | sparse | read
    connections: int | None  # None: nbdcopy's default (4, but never more than its threads = nproc)
    source: Path | None = None  # None for reads
    export: Path | None = None  # for reads
    threads: int | None = None  # None: nbdcopy's default (nproc)
    samples: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "qemu": []})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "qemu": []})
    #: Per run: the server's main-thread CPU s, page-cache Dirty/Writeback peaks (MiB)
    extra: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"ours": [], "qemu": []})

    def nbdcopy_args(self, uri: str) -> list[str]:
        conn = [] if self.connections is None else [f"--connections={self.connections}"]
        conn += [] if self.threads is None else [f"--threads={self.threads}"]
        if self.kind == "read":
            return ["nbdcopy", *conn, uri, "null:"]
        return ["nbdcopy", "--flush", *conn, str(self.source), uri]

    def command_text(self) -> str:
        return " ".join(shlex.quote(a) for a in self.nbdcopy_args("nbd://127.0.0.1:PORT")).replace(str(REPO) + "/", "")

    def median(self, which: str) -> float:
        return statistics.median(self.samples[which]) if self.samples[which] else float("nan")

    def ratio(self) -> float:
        q = self.median("qemu")
        return self.median("ours") / q if q else float("nan")


def _meminfo_mib(keys: tuple[str, ...] = ("Dirty", "Writeback")) -> dict[str, float]:
    text = Path("/proc/meminfo").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for k in keys}  # type: ignore[union-attr]


class MeminfoSampler:
    """Samples /proc/meminfo Dirty and Writeback every 50 ms while a run goes on; keeps the peaks."""

    def __init__(self) -> None:
        self.start = _meminfo_mib()
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            for k, v in _meminfo_mib().items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {
            "dirty_start": self.start["Dirty"],
            "writeback_start": self.start["Writeback"],
            "dirty_peak": self.peak["Dirty"],
            "writeback_peak": self.peak["Writeback"],
        }


def dense_default_title() -> str:
    """nbdcopy's default is 4 connections, but never more than its threads (nproc): name what runs."""
    conns = min(4, len(os.sched_getaffinity(0)))
    return "dense write, 4 conn" if conns == 4 else f"dense write, nbdcopy defaults ({conns} conn)"


def run_once(
    cfg: Config, case: Case, which: str, size: int, label: str = "", compare: bool = False
) -> tuple[float, float]:
    """One timed nbdcopy against a fresh server; returns (MB/s, server CPU s).

    For qcow2 the written target is ``qemu-img check``-ed once the server has
    exited (outside the timing), and with ``compare`` (each server's first
    run of a case) also compared with its source.
    """
    if case.kind == "read":
        assert case.export is not None
        image, readonly = case.export, True
    else:
        image, readonly = fresh_target(size, cfg.format), False
    warm_cache(case.export if readonly else case.source)  # type: ignore[arg-type]
    if cfg.sync:
        os.sync()  # do not let the previous run's writeback land in this one
    server = cfg.start(which, image, readonly)
    try:
        if cfg.prefault and not readonly:
            prefault(size + 256 * MiB)
        cpu0, main0 = server.cpu_seconds(), server.main_thread_seconds()
        args = case.nbdcopy_args(server.uri)
        sampler = MeminfoSampler()
        t0 = time.perf_counter()
        res = subprocess.run(args, capture_output=True, timeout=cfg.timeout)
        elapsed = time.perf_counter() - t0
        extra = sampler.stop()
        cpu = server.cpu_seconds() - cpu0
        extra["main_cpu"] = server.main_thread_seconds() - main0
        extra["cpu"], extra["seconds"] = cpu, elapsed
        case.extra[which].append(extra)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.decode(errors='replace')}")
    finally:
        server.stop()
    what = f"{case.title} / {which} / {label}"
    if cfg.format == "qcow2":
        note_exit(server, what)
    if not readonly:
        if cfg.format == "qcow2":
            if check_image(image, what) and compare:
                assert case.source is not None
                compare_image(case.source, image, what)
        image.unlink(missing_ok=True)
    return size / elapsed / 1e6, cpu


def run_case(cfg: Config, case: Case, size: int, rounds: int, warmup: bool) -> None:
    print(f"\n== {case.title}: {case.command_text()}", flush=True)
    if warmup:
        for which in ("ours", "qemu"):
            mbs, cpu = run_once(cfg, case, which, size, "warm-up", compare=True)
            case.extra[which].pop()
            print(f"   warm-up {which:4s} {mbs:8.1f} MB/s  (server CPU {cpu:.2f} s)", flush=True)
    for r in range(rounds):
        order = ("ours", "qemu") if r % 2 == 0 else ("qemu", "ours")
        for which in order:
            mbs, cpu = run_once(cfg, case, which, size, f"round {r + 1}", compare=not warmup and r == 0)
            case.samples[which].append(mbs)
            case.cpu[which].append(cpu)
            e = case.extra[which][-1]
            print(
                f"   round {r + 1} {which:4s} {mbs:8.1f} MB/s  (server CPU {cpu:.2f} s, main thread"
                f" {e['main_cpu']:.2f} s; Dirty {e['dirty_start']:.0f} MiB at start, peak {e['dirty_peak']:.0f},"
                f" Writeback peak {e['writeback_peak']:.0f})",
                flush=True,
            )
    print(
        f"   median ours {case.median('ours'):.1f} MB/s, qemu-nbd {case.median('qemu'):.1f} MB/s,"
        f" ratio {case.ratio():.2f}",
        flush=True,
    )


# --------------------------------------------------------------------------
# memory: 10 libnbd clients with 16 x 2 MiB requests in flight each

HAMMER = r"""
import os, random, select, sys, time
import nbd

uri = sys.argv[1]
clients, depth, reqsize = (int(a) for a in sys.argv[2:5])
seconds = float(sys.argv[5])
payload = os.urandom(reqsize)
handles = []
for i in range(clients):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
size = handles[0].get_size()
slots = max(1, size // reqsize)
rng = random.Random(1)
done_bytes = 0
errors = 0
bufs = {}

def submit(h):
    off = rng.randrange(slots) * reqsize
    if rng.random() < 0.5:
        c = h.aio_pwrite(payload, off)
        bufs[(id(h), c)] = None
    else:
        b = nbd.Buffer(reqsize)
        c = h.aio_pread(b, off)
        bufs[(id(h), c)] = b

for h in handles:
    for _ in range(depth):
        submit(h)
deadline = time.monotonic() + seconds
while True:
    stopping = time.monotonic() >= deadline
    rl, wl = [], []
    for h in handles:
        d = h.aio_get_direction()
        if d & nbd.AIO_DIRECTION_READ:
            rl.append(h)
        if d & nbd.AIO_DIRECTION_WRITE:
            wl.append(h)
    r, w, _ = select.select([h.aio_get_fd() for h in rl], [h.aio_get_fd() for h in wl], [], 1.0)
    for h in rl:
        if h.aio_get_fd() in r:
            h.aio_notify_read()
    for h in wl:
        if h.aio_get_fd() in w:
            h.aio_notify_write()
    for h in handles:
        while True:
            try:
                c = h.aio_peek_command_completed()
            except nbd.Error:  # nothing in flight on this handle
                break
            if c <= 0:
                break
            try:
                h.aio_command_completed(c)
                done_bytes += reqsize
            except nbd.Error:
                errors += 1
            bufs.pop((id(h), c), None)
            if not stopping:
                submit(h)
    if stopping and all(h.aio_in_flight() == 0 for h in handles):
        break
for h in handles:
    h.shutdown()
print(done_bytes, errors, flush=True)
"""


def run_memory(cfg: Config, which: str, size: int, seconds: float) -> dict[str, float]:
    image = fresh_target(size, cfg.format)
    os.sync()
    server = cfg.start(which, image)
    try:
        idle = server.status("VmRSS")
        t0 = time.perf_counter()
        res = subprocess.run(
            [SYSTEM_PYTHON, "-c", HAMMER, server.uri, "10", "16", str(2 * MiB), str(seconds)],
            capture_output=True,
            timeout=seconds + 60,
        )
        elapsed = time.perf_counter() - t0
        hwm = server.status("VmHWM")
        if res.returncode != 0:
            raise RuntimeError(f"memory client failed: {res.stderr.decode(errors='replace')}")
        done, errors = (int(x) for x in res.stdout.split())
    finally:
        server.stop()
    if cfg.format == "qcow2":
        note_exit(server, f"memory / {which}")
        check_image(image, f"memory / {which}")
    image.unlink(missing_ok=True)
    return {"idle_mib": idle / 1024, "peak_mib": hwm / 1024, "mbs": done / elapsed / 1e6, "errors": errors}


# --------------------------------------------------------------------------
# qcow2 only: overlay write cost and a 2 TiB virtual disk

SCATTER = r"""
import json, os, random, sys, time
import nbd

MiB = 1 << 20
uri = sys.argv[1]
nmib, span, seed, depth, readback, unwritten = (int(a) for a in sys.argv[2:8])
base = sys.argv[8] if len(sys.argv) > 8 else ""
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
slots = (span or size) // MiB
rng = random.Random(seed)
chosen = rng.sample(range(slots), nmib)  # distinct 1 MiB slots
block = os.urandom(MiB)
payloads = [slot.to_bytes(8, "little") * 8 + block[64:] for slot in chosen]  # unique per slot
errors = 0


def retire():
    global errors
    while True:
        try:
            c = h.aio_peek_command_completed()
        except nbd.Error:  # nothing in flight
            return
        if c <= 0:
            return
        try:
            h.aio_command_completed(c)
        except nbd.Error:
            errors += 1


t0 = time.perf_counter()
for slot, buf in zip(chosen, payloads):
    while h.aio_in_flight() >= depth:
        h.poll(-1)
        retire()
    h.aio_pwrite(buf, slot * MiB)
while h.aio_in_flight() > 0:
    h.poll(-1)
    retire()
retire()
t_write = time.perf_counter() - t0
h.flush()
t_total = time.perf_counter() - t0

# read back: written slots must hold what was written, unwritten ones the
# base's data (or zeroes without a base)
t1 = time.perf_counter()
bad_written = bad_unwritten = 0
for i in rng.sample(range(nmib), min(readback, nmib)):
    if h.pread(MiB, chosen[i] * MiB) != payloads[i]:
        bad_written += 1
taken = set(chosen)
free = [s for s in (rng.randrange(slots) for _ in range(unwritten * 4)) if s not in taken][:unwritten]
fd = os.open(base, os.O_RDONLY) if base else -1
for slot in free:
    want = os.pread(fd, MiB, slot * MiB) if fd >= 0 else bytes(MiB)
    if h.pread(MiB, slot * MiB) != want:
        bad_unwritten += 1
t_read = time.perf_counter() - t1
h.shutdown()
print(json.dumps({
    "size": size, "nmib": nmib, "write_s": t_write, "total_s": t_total, "read_s": t_read,
    "read_mib": min(readback, nmib) + len(free), "errors": errors,
    "bad_written": bad_written, "bad_unwritten": bad_unwritten, "checked_unwritten": len(free),
}), flush=True)
"""


def run_scatter(
    cfg: Config,
    server: Server,
    nmib: int,
    seed: int,
    depth: int,
    readback: int,
    unwritten: int,
    base_raw: Path | None,
    span: int = 0,
) -> dict[str, float]:
    args = [SYSTEM_PYTHON, "-c", SCATTER, server.uri, str(nmib), str(span), str(seed), str(depth)]
    args += [str(readback), str(unwritten), str(base_raw or "")]
    res = subprocess.run(args, capture_output=True, text=True, timeout=cfg.timeout)
    if res.returncode != 0:
        raise RuntimeError(f"scatter client failed ({res.returncode}): {res.stderr[-2000:]}")
    out: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


@dataclass
class OverlayCase:
    key: str
    base_raw: Path
    base_qcow2: Path
    nmib: int
    samples: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "qemu": []})  # seconds
    startup: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "qemu": []})
    bad: dict[str, int] = field(default_factory=lambda: {"ours": 0, "qemu": 0})

    @property
    def base_size(self) -> int:
        return self.base_raw.stat().st_size

    @property
    def title(self) -> str:
        return f"overlay on {human(self.base_size)} base, write {self.nmib} MiB + flush"

    def median(self, which: str) -> float:
        return statistics.median(self.samples[which]) if self.samples[which] else float("nan")

    def ratio(self) -> float:
        """Speed ratio ours/qemu (> 1: ours faster), as for the MB/s cases."""
        o = self.median("ours")
        return self.median("qemu") / o if o else float("nan")


OVERLAY_DEPTH = 8


def run_overlay_once(cfg: Config, oc: OverlayCase, which: str, seed: int, label: str) -> float:
    overlay = WORK / "overlay.qcow2"
    overlay.unlink(missing_ok=True)
    res = qemu_img("create", "-q", "-f", "qcow2", "-b", oc.base_qcow2.name, "-F", "qcow2", str(overlay))
    if res.returncode != 0:
        raise RuntimeError(f"qemu-img create overlay failed: {res.stderr}")
    warm_cache(oc.base_qcow2)  # reads of unwritten data (verification only) come from the base
    os.sync()
    t0 = time.perf_counter()
    server = cfg.start(which, overlay)
    startup = time.perf_counter() - t0
    try:
        out = run_scatter(cfg, server, oc.nmib, seed, OVERLAY_DEPTH, 16, 16, oc.base_raw)
    finally:
        server.stop()
    what = f"{oc.title} / {which} / {label}"
    note_exit(server, what)
    bad = int(out["errors"] + out["bad_written"] + out["bad_unwritten"])
    if bad:
        oc.bad[which] += bad
        print(f"   !! {what}: {out}", flush=True)
        CHECKS.append(Check(what, "readback", False, json.dumps(out)))
    check_image(overlay, what)
    overlay.unlink(missing_ok=True)
    oc.startup[which].append(startup)
    return float(out["total_s"])


def run_overlay(cfg: Config, oc: OverlayCase, rounds: int, warmup: bool) -> None:
    print(
        f"\n== {oc.title}: {OVERLAY_DEPTH} x 1 MiB aio_pwrite in flight at random distinct 1 MiB slots, then flush",
        flush=True,
    )
    seed = 1000 * oc.nmib + oc.base_size % 997
    if warmup:
        for which in ("ours", "qemu"):
            t = run_overlay_once(cfg, oc, which, seed, "warm-up")
            print(f"   warm-up {which:4s} {t * 1000:8.1f} ms", flush=True)
        oc.startup = {"ours": [], "qemu": []}
    for r in range(rounds):
        order = ("ours", "qemu") if r % 2 == 0 else ("qemu", "ours")
        for which in order:  # both servers of a round write the same slots
            t = run_overlay_once(cfg, oc, which, seed + r + 1, f"round {r + 1}")
            oc.samples[which].append(t)
            print(f"   round {r + 1} {which:4s} {t * 1000:8.1f} ms  ({oc.nmib * MiB / t / 1e6:.0f} MB/s)", flush=True)
    print(
        f"   median ours {oc.median('ours') * 1000:.1f} ms, qemu-nbd {oc.median('qemu') * 1000:.1f} ms,"
        f" speed ratio {oc.ratio():.2f}",
        flush=True,
    )


BIGDISK_DEPTH = 16


def run_bigdisk(cfg: Config, which: str, disk: int, nmib: int) -> dict[str, float]:
    big = WORK / "big.qcow2"
    big.unlink(missing_ok=True)
    res = qemu_img("create", "-q", "-f", "qcow2", str(big), str(disk))
    if res.returncode != 0:
        raise RuntimeError(f"qemu-img create failed: {res.stderr}")
    os.sync()
    server = cfg.start(which, big)
    try:
        idle = server.status("VmRSS")
        out = run_scatter(cfg, server, nmib, 7, BIGDISK_DEPTH, 64, 64, None)
        hwm = server.status("VmHWM")
        cpu = server.cpu_seconds()
    finally:
        server.stop()
    what = f"bigdisk / {which}"
    note_exit(server, what)
    bad = int(out["errors"] + out["bad_written"] + out["bad_unwritten"])
    if bad:
        print(f"   !! {what}: {out}", flush=True)
        CHECKS.append(Check(what, "readback", False, json.dumps(out)))
    ok = check_image(big, what)
    file_size = big.stat().st_size if big.exists() else 0
    big.unlink(missing_ok=True)
    return {
        "idle_mib": idle / 1024,
        "peak_mib": hwm / 1024,
        "write_s": out["total_s"],
        "read_s": out["read_s"],
        "read_mib": out["read_mib"],
        "bad": bad,
        "check_ok": ok,
        "file_mib": file_size / MiB,
        "cpu_s": cpu,
    }


# --------------------------------------------------------------------------
# report


def fmt_ratio(r: float) -> str:
    return "n/a" if r != r else f"{r:.2f}x"


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def checks_cell(prefix: str, readonly: bool = False) -> str:
    """``qemu-img check`` / ``compare`` tally for one case, e.g. ``12/12 ok, compare 2/2``."""
    if readonly:
        return "read-only"
    passed, run, same, compared = check_summary(prefix)
    text = f"{passed}/{run} ok" if passed == run else f"**{run - passed} of {run} FAILED**"
    if compared:
        text += (
            f", compare {same}/{compared}"
            if same == compared
            else f", **compare {compared - same} of {compared} differ**"
        )
    problems = [c for c in CHECKS if c.what.startswith(prefix) and c.tool in ("exit", "readback") and not c.ok]
    if problems:
        text += f", **{len(problems)} other problem(s)**"
    return text


def table(cases: list[Case], memory: dict[str, dict[str, float]], size: int, fmt: str = "raw") -> str:
    qcow2 = fmt == "qcow2"
    lines = [
        "| case | ours MB/s | qemu-nbd MB/s | ours/qemu | target | | server CPU s/GiB ours / qemu"
        " | of it main thread ours / qemu | slowest run, % of median ours / qemu |"
        + (" qemu-img check of targets |" if qcow2 else ""),
        "|---|---:|---:|---:|---:|---|---:|---:|---:|" + ("---|" if qcow2 else ""),
    ]
    gib = size / 1024**3
    for c in cases:
        target = TARGETS[c.kind]
        r = c.ratio()
        cpu = f"{statistics.median(c.cpu['ours']) / gib:.2f} / {statistics.median(c.cpu['qemu']) / gib:.2f}"
        main = " / ".join(
            f"{statistics.median(e['main_cpu'] for e in c.extra[w]) / gib:.2f}" if c.extra[w] else "-"
            for w in ("ours", "qemu")
        )
        slowest = " / ".join(
            f"{100 * min(c.samples[w]) / c.median(w):.0f}%" if c.samples[w] else "-" for w in ("ours", "qemu")
        )
        lines.append(
            f"| {c.title} | {c.median('ours'):.0f} | {c.median('qemu'):.0f} | {fmt_ratio(r)} | >= {target:.1f}x "
            f"| {verdict(r >= target)} | {cpu} | {main} | {slowest} |"
            + (f" {checks_cell(c.title + ' /', c.kind == 'read')} |" if qcow2 else "")
        )
    if memory:
        ours, qemu = memory.get("ours"), memory.get("qemu")
        lines.append("")
        lines.append("| memory (10 clients x 16 x 2 MiB in flight) | ours | qemu-nbd | target | |")
        lines.append("|---|---:|---:|---:|---|")
        if ours and qemu:
            lines.append(
                f"| peak RSS (VmHWM), MiB | {ours['peak_mib']:.1f} | {qemu['peak_mib']:.1f} | < {RSS_LIMIT_MIB} "
                f"| {verdict(ours['peak_mib'] < RSS_LIMIT_MIB)} |"
            )
            lines.append(f"| idle RSS before load, MiB | {ours['idle_mib']:.1f} | {qemu['idle_mib']:.1f} | | |")
            lines.append(f"| throughput during the test, MB/s | {ours['mbs']:.0f} | {qemu['mbs']:.0f} | | |")
            lines.append(f"| failed requests | {ours['errors']:.0f} | {qemu['errors']:.0f} | | |")
            if qcow2:
                ours_check, qemu_check = checks_cell("memory / ours"), checks_cell("memory / qemu")
                lines.append(f"| qemu-img check afterwards | {ours_check} | {qemu_check} | | |")
    return "\n".join(lines)


def overlay_table(ocs: list[OverlayCase]) -> str:
    lines = [
        "| overlay (empty qcow2 on a qcow2 base full of data) | ours ms | qemu-nbd ms | ours/qemu speed"
        " | ours ms per MiB | ours server start, ms | qemu-img check |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for oc in ocs:
        o = oc.median("ours")
        start = statistics.median(oc.startup["ours"]) * 1000 if oc.startup["ours"] else float("nan")
        lines.append(
            f"| {oc.title} | {o * 1000:.0f} | {oc.median('qemu') * 1000:.0f} | {fmt_ratio(oc.ratio())}"
            f" | {o * 1000 / oc.nmib:.2f} | {start:.0f} | {checks_cell(oc.title + ' /')} |"
        )
    return "\n".join(lines)


def overlay_verdict(ocs: list[OverlayCase]) -> str:
    """Does our time follow N, not the base size? Compares N=64 on both bases and the N scaling."""
    big = {oc.nmib: oc.median("ours") for oc in ocs if oc.key.startswith("overlay-")}
    small = [oc.median("ours") for oc in ocs if oc.key.startswith("overlaysmall-")]
    parts = []
    if small and 64 in big:
        parts.append(
            f"N=64: {big[64] * 1000:.0f} ms over the {human(max(oc.base_size for oc in ocs))} base vs"
            f" {small[0] * 1000:.0f} ms over the {human(OVERLAY_SMALL_BASE)} base"
            f" ({big[64] / small[0]:.2f}x)"
        )
    ns = sorted(big)
    if len(ns) >= 2:
        lo, hi = ns[0], ns[-1]
        parts.append(
            f"N={lo} -> N={hi} MiB ({hi / lo:.0f}x the bytes): our time x{big[hi] / big[lo]:.1f}"
            f" ({big[lo] * 1000 / lo:.2f} -> {big[hi] * 1000 / hi:.2f} ms per MiB)"
        )
    return "; ".join(parts)


def bigdisk_table(big: dict[str, dict[str, float]], disk: int, nmib: int) -> str:
    lines = [
        f"| {human(disk)} qcow2, {nmib} x 1 MiB scattered writes + flush, then reads | ours | qemu-nbd | target | |",
        "|---|---:|---:|---:|---|",
    ]
    ours, qemu = big.get("ours", {}), big.get("qemu", {})

    def cell(d: dict[str, float], key: str, spec: str) -> str:
        return format(d[key], spec) if key in d else "-"

    peak = ours.get("peak_mib", float("nan"))
    lines.append(
        f"| peak RSS (VmHWM), MiB | {cell(ours, 'peak_mib', '.1f')} | {cell(qemu, 'peak_mib', '.1f')}"
        f" | < {BIGDISK_RSS_LIMIT_MIB} | {verdict(peak < BIGDISK_RSS_LIMIT_MIB)} |"
    )
    lines.append(
        f"| idle RSS after start, MiB | {cell(ours, 'idle_mib', '.1f')} | {cell(qemu, 'idle_mib', '.1f')} | | |"
    )
    lines.append(f"| write + flush, s | {cell(ours, 'write_s', '.2f')} | {cell(qemu, 'write_s', '.2f')} | | |")
    lines.append(
        f"| read back {ours.get('read_mib', 128):.0f} x 1 MiB (written + unwritten), s | {cell(ours, 'read_s', '.2f')}"
        f" | {cell(qemu, 'read_s', '.2f')} | | |"
    )
    lines.append(
        f"| image file afterwards, MiB | {cell(ours, 'file_mib', '.1f')} | {cell(qemu, 'file_mib', '.1f')} | | |"
    )
    lines.append(f"| wrong data / failed requests | {cell(ours, 'bad', '.0f')} | {cell(qemu, 'bad', '.0f')} | 0 | |")
    lines.append(
        f"| qemu-img check afterwards | {checks_cell('bigdisk / ours')} | {checks_cell('bigdisk / qemu')} | pass | |"
    )
    return "\n".join(lines)


def git_head() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


def git_dirty() -> bool:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "sendense_nbd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return bool(out.strip())
    except Exception:  # noqa: BLE001
        return False


def code_digest() -> dict[str, str]:
    """Hashes of the server's sources: tell whether sendense_nbd/ changed while the benchmark ran."""
    import hashlib

    return {
        str(path.relative_to(REPO)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((REPO / "sendense_nbd").rglob("*.py"))
    }


def changed_files(start: dict[str, str], end: dict[str, str]) -> list[str]:
    return sorted(k for k in start.keys() | end.keys() if start.get(k) != end.get(k))


CODE: dict[str, str] = {}  # git HEAD at start and end
CODE_FILES: dict[str, dict[str, str]] = {}  # source hashes at start and end


def tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
    except Exception:  # noqa: BLE001
        return "?"


def section(
    args: argparse.Namespace,
    cfg: Config,
    cases: list[Case],
    memory: dict[str, dict[str, float]],
    size: int,
    argv: list[str],
    ocs: list[OverlayCase] | None = None,
    big: dict[str, dict[str, float]] | None = None,
) -> str:
    ocs, big = ocs or [], big or {}
    qcow2 = cfg.format == "qcow2"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    head = CODE.get("head_start") or git_head()
    head += " (with uncommitted changes under sendense_nbd/)" if git_dirty() else ""
    dense, sparse = WORK / f"dense-{size}.img", WORK / f"sparse-{size}.img"

    def rel(path: Path | str) -> str:
        return str(path).replace(str(REPO) + "/", "")

    qemu_text = " ".join(shlex.quote(a) for a in cfg.qemu_cmd(Path("IMAGE"), False, 0)).replace("-p 0", "-p PORT")
    out = [
        f"## {now}, commit {head}" + (", qcow2 images" if qcow2 else ""),
        "",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {platform.machine()}, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        f"- peers: {tool_version(['qemu-nbd', '--version'])}; {tool_version(['nbdcopy', '--version'])}"
        + (
            f"; load average (1 min) {LOAD['start']:.2f} at start, {LOAD['max']:.2f} max,"
            f" {LOAD['end']:.2f} at end (our own runs add about 1-2); CPU used by other processes during the"
            f" run: {LOAD['other_cpu']:.0f} s in {LOAD['wall']:.0f} s"
            if LOAD
            else ""
        ),
        f"- benchmark: `{' '.join(shlex.quote(a) for a in [rel(sys.executable), rel(sys.argv[0]), *argv])}`",
        f"- image size {human(size)}; {args.rounds} round(s) after "
        f"{'a warm-up run per server' if not args.no_warmup else 'no warm-up'}, order A B / B A alternating;"
        " median MB/s = 10^6 bytes of virtual size per second of nbdcopy wall time (includes --flush);"
        " a fresh server per run, a fresh "
        + (f"empty qcow2 target (`qemu-img create -f qcow2 target.qcow2 {size}`)" if qcow2 else "sparse target")
        + " per write run, the source read into page cache"
        + (" and `sync` before each run" if cfg.sync else " (no `sync` between runs: --no-sync)")
        + (
            "; `--prefault`: before each write run size+256 MiB of anonymous memory is touched and freed,"
            " because on this VM freed memory returns to the host and re-faulting it costs seconds per 2 GiB"
            if args.prefault
            else ""
        ),
        "- servers (same flags):",
        f"  - ours: `{' '.join(shlex.quote(a) for a in cfg.ours_cmd(Path('IMAGE'), False))}` (`-r` added for reads;"
        " prints its port)",
        f"  - qemu-nbd: `{qemu_text}` (`-r` added for reads)",
        "- clients:",
    ]
    for c in cases:
        out.append(f"  - {c.title}: `{c.command_text()}`")
    out.append(
        f"  - sources: `{rel(dense)}` = random data; `{rel(sparse)}` = sparse, 1 MiB random every 10 MiB (10% data)"
    )
    if qcow2:
        out.append(
            f"  - read export: `{rel(dense.with_suffix('.qcow2'))}` = `qemu-img convert -f raw -O qcow2` of"
            f" `{rel(dense)}` (64 KiB clusters, fully allocated)"
        )
        out.append(
            "  - correctness: after every write run, once the server has exited (SIGTERM; both exit 0 after"
            " flushing), `qemu-img check -f qcow2 target.qcow2`; after each server's first write run of a case also"
            " `qemu-img compare -f raw -F qcow2 SOURCE target.qcow2`"
        )
    if memory:
        out.append(
            f"  - memory: `{SYSTEM_PYTHON} -c HAMMER nbd://127.0.0.1:PORT 10 16 {2 * MiB} {args.memory_seconds:g}`"
            " (10 libnbd handles, aio_pwrite/aio_pread 50/50 at random 2 MiB slots, 16 in flight each),"
            " VmHWM from /proc/PID/status"
        )
    if ocs:
        bases = sorted({oc.base_raw for oc in ocs}, key=lambda b: -b.stat().st_size)
        base_text = " and ".join(
            f"`{rel(b.with_suffix('.qcow2'))}` (`qemu-img convert -O qcow2` of random data)" for b in bases
        )
        out.append(
            f"  - overlay: base {base_text}; per run a fresh `qemu-img create -f qcow2 -b BASE -F qcow2 overlay.qcow2`;"
            f" `{SYSTEM_PYTHON} -c SCATTER nbd://127.0.0.1:PORT N 0 SEED {OVERLAY_DEPTH} 16 16 BASE.img`:"
            f" libnbd, N distinct random 1 MiB-aligned slots, {OVERLAY_DEPTH} x 1 MiB aio_pwrite in flight,"
            " then flush; timed from the first write to the end of the flush (same slots for both servers in a"
            " round); then 16 written and 16 unwritten slots are read back and checked against the payload / the"
            " base; `qemu-img check` of the overlay after every run. Server start = spawn to port open."
        )
    if big:
        out.append(
            f"  - bigdisk: `qemu-img create -f qcow2 big.qcow2 {human(args.bigdisk_size).replace(' ', '')}`;"
            f" `{SYSTEM_PYTHON} -c SCATTER nbd://127.0.0.1:PORT {args.bigdisk_mib} 0 7 {BIGDISK_DEPTH} 64 64`:"
            f" {args.bigdisk_mib} x 1 MiB aio_pwrite at random distinct 1 MiB slots over the whole disk,"
            f" {BIGDISK_DEPTH} in flight, flush, then 64 written + 64 unwritten slots read back and checked;"
            " VmHWM read before the server is stopped; `qemu-img check` afterwards"
        )
    changed = changed_files(CODE_FILES["start"], CODE_FILES["end"]) if CODE_FILES else []
    if changed:
        out.append(
            f"- **files under sendense_nbd/ changed while this ran** (HEAD {CODE['head_start']} at start,"
            f" {CODE['head_end']} at end; later runs used the newer files): "
            + ", ".join(f"`{name}`" for name in changed[:10])
            + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        )
    out += ["", table(cases, memory, size, cfg.format), ""]
    if ocs:
        out += [overlay_table(ocs), ""]
        verdict_text = overlay_verdict(ocs)
        if verdict_text:
            out += [f"Overlay scaling (ours): {verdict_text}.", ""]
    if big:
        out += [bigdisk_table(big, args.bigdisk_size, args.bigdisk_mib), ""]
    if qcow2:
        passed, run, same, compared = check_summary()
        others = [c for c in CHECKS if c.tool in ("exit", "readback") and not c.ok]
        line = (
            f"Correctness: `qemu-img check` passed on {passed} of {run} written images;"
            f" `qemu-img compare` identical for {same} of {compared}; {len(others)} other problem(s)"
            " (server exit code, wrong data read back, failed requests)."
        )
        if passed != run or same != compared or others:
            line += " Failures: " + "; ".join(f"{c.what}: {c.tool} {c.detail[:300]}" for c in CHECKS if not c.ok)
        out += [line, ""]
    out.append(
        "Targets: dense write >= 1.0x, read >= 0.8x, sparse write >= 0.8x of qemu-nbd; our peak RSS < 100 MiB"
        + (f"; 2 TiB disk: our peak RSS < {BIGDISK_RSS_LIMIT_MIB} MiB, qemu-img check passes." if big else ".")
    )
    if args.quick:
        out.append("\n*Quick smoke run (--quick): too small and too few rounds to judge the targets.*")
    return "\n".join(out) + "\n"


def write_results(text: str) -> None:
    title = "# Benchmark results: sendense-nbd vs qemu-nbd\n\n"
    intro = (
        "Written by `benchmarks/bench_server.py --write-results`; newest run first."
        " See `benchmarks/README.md` for what each case measures.\n\n"
    )
    old = RESULTS.read_text() if RESULTS.exists() else ""
    idx = old.find("\n## ")
    previous = old[idx + 1 :] if idx >= 0 else ""
    RESULTS.write_text(title + intro + text + ("\n" + previous if previous else ""))
    print(f"wrote {RESULTS}")


# --------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("2G"), help="image size (default 2G)")
    p.add_argument(
        "--format",
        choices=["raw", "qcow2"],
        default="raw",
        help="image format served by both servers (-f); qcow2 adds the overlay and bigdisk cases",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case and server (default 5)")
    p.add_argument("--cache", choices=["writeback", "writethrough", "none"], default="writeback")
    p.add_argument("--discard", choices=["ignore", "unmap"], default="ignore", help="passed to both servers")
    p.add_argument("--shared", type=int, default=16, help="-e for both servers (default 16)")
    p.add_argument("--quick", action="store_true", help="smoke test: 256 MiB, 1 round, no warm-up, 3 s memory test")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument(
        "--nbdcopy-defaults",
        action="store_true",
        help="issue 19's configuration: 1 GiB, -e 4, 4 rounds, cases dense,dense1,dense2,dense4"
        " (explicit --size/--shared/--rounds/--cases win)",
    )
    p.add_argument("--no-sync", action="store_true", help="do not run sync before each run")
    p.add_argument(
        "--prefault",
        action="store_true",
        help="touch size+256 MiB of memory right before each write run (see prefault(); experimental)",
    )
    p.add_argument(
        "--cases",
        default=None,
        help="comma list of: dense dense1 dense2 dense4 sparse sparse1 read read1 memory, and with --format qcow2 also"
        " overlay bigdisk (default: all of them for the format)",
    )
    p.add_argument("--memory-seconds", type=float, default=10.0)
    p.add_argument(
        "--overlay-mib",
        default="16,64,256",
        help="overlay case: MiB written per run over the --size base (default 16,64,256); the first value"
        " closest to 64 is also run over a 200 MiB base",
    )
    p.add_argument("--bigdisk-size", type=parse_size, default=parse_size("2T"), help="bigdisk virtual size (2T)")
    p.add_argument("--bigdisk-mib", type=int, default=256, help="bigdisk: MiB written as 1 MiB writes (256)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one client run")
    p.add_argument("--write-results", action="store_true", help="add a section to benchmarks/RESULTS.md")
    p.add_argument("--json", type=Path, help="also dump raw samples here")
    p.add_argument(
        "--ours-prefix",
        default="",
        help="arguments put between our python and '-m sendense_nbd', e.g. '-m cProfile -o /tmp/x.prof'",
    )
    args = p.parse_args(argv)
    if args.nbdcopy_defaults:
        given = " ".join(argv)
        for flag, name, value in (
            ("--size", "size", 1024 * MiB),
            ("--shared", "shared", 4),
            ("--rounds", "rounds", 4),
            ("--cases", "cases", "dense,dense1,dense2,dense4"),
        ):
            if flag not in given:
                setattr(args, name, value)
    if args.quick:
        if "--size" not in " ".join(argv):
            args.size = 256 * MiB
        args.rounds, args.no_warmup, args.memory_seconds = 1, True, min(args.memory_seconds, 3.0)
        if "--overlay-mib" not in " ".join(argv):
            args.overlay_mib = "16,64"
        if "--bigdisk-mib" not in " ".join(argv):
            args.bigdisk_mib = 32
    if args.cases is None:
        args.cases = "dense,dense1,sparse,sparse1,read,read1,memory" + (
            ",overlay,bigdisk" if args.format == "qcow2" else ""
        )
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    for tool in ("nbdcopy", "qemu-nbd") + (("qemu-img",) if args.format == "qcow2" else ()):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.format != "qcow2" and {"overlay", "bigdisk"} & set(wanted):
        p.error("the overlay and bigdisk cases need --format qcow2")
    overlay_mib = [int(x) for x in args.overlay_mib.split(",") if x.strip()]
    cfg = Config(args)
    cfg.ours_prefix = shlex.split(args.ours_prefix)
    WORK.mkdir(exist_ok=True)
    size = args.size

    dense = make_dense(size)
    sparse = make_sparse(size) if any(w.startswith("sparse") for w in wanted) else None
    export = (
        make_qcow2_copy(dense) if args.format == "qcow2" and ({"read", "read1", "overlay"} & set(wanted)) else dense
    )
    all_cases = {
        "dense": Case("dense", dense_default_title(), "dense", None, source=dense),
        "dense1": Case("dense1", "dense write, 1 conn", "dense", 1, source=dense),
        "dense2": Case("dense2", "dense write, 2 conn", "dense", 2, source=dense),
        "dense4": Case("dense4", "dense write, 4 conn, 4 threads", "dense", 4, source=dense, threads=4),
        "sparse": Case("sparse", "sparse write (10% data), 4 conn", "sparse", None, source=sparse),
        "sparse1": Case("sparse1", "sparse write (10% data), 1 conn", "sparse", 1, source=sparse),
        "read": Case("read", "read to null:, 4 conn", "read", None, export=export),
        "read1": Case("read1", "read to null:, 1 conn", "read", 1, export=export),
    }
    unknown = [w for w in wanted if w not in all_cases and w not in ("memory", "overlay", "bigdisk")]
    if unknown:
        p.error(f"unknown case(s): {', '.join(unknown)}")
    cases = [all_cases[w] for w in wanted if w in all_cases]
    memory: dict[str, dict[str, float]] = {}
    ocs: list[OverlayCase] = []
    if "overlay" in wanted:
        ocs = [OverlayCase(f"overlay-{n}", dense, export, n) for n in overlay_mib]
        if overlay_mib:
            small_raw = make_dense(OVERLAY_SMALL_BASE)
            n_small = min(overlay_mib, key=lambda n: abs(n - 64))
            if n_small * MiB <= OVERLAY_SMALL_BASE:
                ocs.append(OverlayCase(f"overlaysmall-{n_small}", small_raw, make_qcow2_copy(small_raw), n_small))
        for oc in ocs:
            if oc.nmib * MiB > oc.base_size:
                p.error(f"--overlay-mib {oc.nmib} does not fit in the {human(oc.base_size)} base")
    big: dict[str, dict[str, float]] = {}
    LOAD["start"] = os.getloadavg()[0]
    cpu_start = _cpu_snapshot()
    load_stop = threading.Event()
    threading.Thread(target=_watch_load, args=(load_stop,), daemon=True).start()
    CODE_FILES["start"], CODE["head_start"] = code_digest(), git_head()
    print(
        f"format {args.format}, sizes {human(size)}, cache={args.cache}, discard={args.discard}, -e {args.shared},"
        f" rounds {args.rounds}"
    )
    try:
        for case in cases:
            run_case(cfg, case, size, args.rounds, warmup=not args.no_warmup)
        if "memory" in wanted:
            print(f"\n== memory: 10 clients x 16 x 2 MiB in flight, {args.memory_seconds:g} s", flush=True)
            for which in ("ours", "qemu"):
                memory[which] = run_memory(cfg, which, size, args.memory_seconds)
                m = memory[which]
                print(
                    f"   {which:4s} peak RSS {m['peak_mib']:.1f} MiB (idle {m['idle_mib']:.1f}),"
                    f" {m['mbs']:.0f} MB/s, {m['errors']:.0f} failed requests",
                    flush=True,
                )
        for oc in ocs:
            run_overlay(cfg, oc, args.rounds, warmup=not args.no_warmup)
        if "bigdisk" in wanted:
            print(
                f"\n== bigdisk: {human(args.bigdisk_size)} qcow2, {args.bigdisk_mib} x 1 MiB scattered writes,"
                f" {BIGDISK_DEPTH} in flight, flush, read back",
                flush=True,
            )
            for which in ("ours", "qemu"):
                big[which] = b = run_bigdisk(cfg, which, args.bigdisk_size, args.bigdisk_mib)
                print(
                    f"   {which:4s} peak RSS {b['peak_mib']:.1f} MiB (idle {b['idle_mib']:.1f}), write+flush"
                    f" {b['write_s']:.2f} s, read back {b['read_s']:.2f} s, file {b['file_mib']:.0f} MiB,"
                    f" {b['bad']:.0f} bad, qemu-img check {'ok' if b['check_ok'] else 'FAILED'}",
                    flush=True,
                )
    finally:
        _kill_all()
        for leftover in ("target.img", "target.qcow2", "overlay.qcow2", "big.qcow2"):
            (WORK / leftover).unlink(missing_ok=True)

    load_stop.set()
    LOAD["end"] = os.getloadavg()[0]
    LOAD["other_cpu"], LOAD["wall"] = other_cpu(cpu_start, _cpu_snapshot())
    LOAD["max"] = max(LOAD.get("max", 0.0), LOAD["start"], LOAD["end"])
    CODE_FILES["end"], CODE["head_end"] = code_digest(), git_head()
    changed = changed_files(CODE_FILES["start"], CODE_FILES["end"])
    if changed:
        print(
            f"\n!! files under sendense_nbd/ changed during the run (HEAD {CODE['head_start']} ->"
            f" {CODE['head_end']}): {', '.join(changed)}"
        )
    print(
        f"\nload average (1 min): {LOAD['start']:.2f} at start, {LOAD['max']:.2f} max, {LOAD['end']:.2f} at end;"
        f" CPU used by other processes: {LOAD['other_cpu']:.0f} s in {LOAD['wall']:.0f} s"
    )
    print(table(cases, memory, size, cfg.format))
    if ocs:
        print()
        print(overlay_table(ocs))
        print(f"\nOverlay scaling (ours): {overlay_verdict(ocs)}")
    if big:
        print()
        print(bigdisk_table(big, args.bigdisk_size, args.bigdisk_mib))
    if cfg.format == "qcow2":
        passed, run, same, compared = check_summary()
        print(f"\nqemu-img check: {passed}/{run} passed; qemu-img compare: {same}/{compared} identical")
        for c in CHECKS:
            if not c.ok:
                print(f"   FAILED {c.what}: {c.tool} {c.detail}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": size,
                    "format": cfg.format,
                    "cases": {c.key: {"samples": c.samples, "cpu": c.cpu, "extra": c.extra} for c in cases},
                    "memory": memory,
                    "overlay": {
                        oc.key: {"nmib": oc.nmib, "base": oc.base_size, "seconds": oc.samples, "startup": oc.startup}
                        for oc in ocs
                    },
                    "bigdisk": big,
                    "checks": [vars(c) for c in CHECKS],
                },
                indent=2,
            )
        )
    if args.write_results:
        write_results(section(args, cfg, cases, memory, size, argv, ocs, big))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        _kill_all()
        sys.exit(130)
