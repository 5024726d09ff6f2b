#!/usr/bin/env python3
"""Benchmark ``sendense-nbd copy`` against ``nbdcopy``, in the same run, on loopback.

Run with the project's venv python (stdlib only)::

    /work/main/.venv/bin/python benchmarks/bench_copy.py --quick          # smoke test
    /work/main/.venv/bin/python benchmarks/bench_copy.py --write-results  # full, 2 GiB

Both copy tools read from an nbdkit source on a unix socket and write into
an NBD server on 127.0.0.1 serving a fresh sparse raw file; both get the
same flags (``nbdcopy --connections=N --flush`` / ``sendense-nbd copy -C N
--flush``, each with its own default request count and size):

* ``dense``: ``nbdkit file dense.img`` (random data), 4 and 1 connections,
  into ``qemu-nbd -f raw -t -e 8 --cache=writeback`` and into our server
  (``sendense-nbd serve -f raw -t -e 8 --cache writeback``);
* ``sparse``: ``nbdkit sparse-random SIZE seed=1 percent=10``, the same;
* ``latency``: the dense source behind ``nbdkit --filter=delay
  delay-read=10ms``, 4 connections, into qemu-nbd; ours (default ``-R``),
  ours with ``-R 64``, nbdcopy, and ours and nbdcopy without the delay in the
  same rounds: ours-with-latency / ours-without should be >= 0.8;
* ``memory``: the peak RSS of every copy process (GNU ``/usr/bin/time``
  ``%M``, the "Maximum resident set size" of ``time -v``); the 4 x 16 dense
  rows are the memory case.

Each case: one warm-up run per variant, then ``--rounds`` rounds whose order
alternates (A B, B A, ...). Every run starts a fresh source and target
server, copies into a fresh sparse target file, stops both servers, and
``cmp``-s the target file with the source data (the dense image, or a file
made once from the sparse-random source with nbdcopy). MB/s = 10^6 bytes of
virtual size per second of the copy process's wall time (start-up and the
final flush included). Every server is killed at exit.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE))

import bench_server as bs  # noqa: E402 - the house helpers: process bookkeeping, images, load, git

REPO, WORK, RESULTS, VENV_PYTHON, HOST, MiB = bs.REPO, bs.WORK, bs.RESULTS, bs.VENV_PYTHON, bs.HOST, bs.MiB
# not bench_server's target.img, and one per process: a second benchmark running at once must not clobber it
TARGET_FILE = WORK / f"copy-target-{os.getpid()}.img"
TIME = "/usr/bin/time"  # GNU time: the copy's own peak RSS and CPU
SPARSE_SEED, SPARSE_PERCENT = 1, 10
DELAY = "10ms"
SHARED = 8  # -e for both target servers
NBDCOPY_DEFAULT = "64 x 256 KiB"  # nbdcopy 1.14 defaults per connection (--requests, --request-size)
#: sendense-nbd copy's defaults (-R, --request-size), read from its --help at start-up
OURS_DEFAULTS: dict[str, int] = {"requests": 16, "request_size": 4 * MiB}


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def ours_defaults_text() -> str:
    return f"{OURS_DEFAULTS['requests']} x {size_text(OURS_DEFAULTS['request_size'])}"


def read_ours_defaults(help_text: str) -> None:
    """Take -R and --request-size defaults from ``sendense-nbd copy --help`` (they have changed before)."""
    m = re.search(r"--requests\b.*?\[default: (\d+)", help_text, re.S)
    if m:
        OURS_DEFAULTS["requests"] = int(m.group(1))
    m = re.search(r"--request-size\b.*?\[default: (\d+)([KMG]?)", help_text, re.S)
    if m:
        OURS_DEFAULTS["request_size"] = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": MiB, "G": 1 << 30}[m.group(2)]


TARGETS = {"dense": 1.0, "sparse": 0.9, "latency": 0.8}


# --------------------------------------------------------------------------
# what runs


@dataclass(frozen=True)
class Variant:
    key: str  # unique within a case
    label: str  # table label
    tool: str  # ours | nbdcopy
    connections: int
    requests: int | None = None  # None: the tool's default
    delay: bool = False  # source behind the delay filter

    def command(self, src_uri: str, dst_uri: str, prefix: list[str] | None = None) -> list[str]:
        if self.tool == "nbdcopy":
            cmd = ["nbdcopy", f"--connections={self.connections}", "--flush"]
            if self.requests is not None:
                cmd.append(f"--requests={self.requests}")
            return cmd + [src_uri, dst_uri]
        cmd = [str(VENV_PYTHON), *(prefix or []), "-m", "sendense_nbd", "copy", "-C", str(self.connections)]
        if self.requests is not None:
            cmd += ["-R", str(self.requests)]
        return cmd + ["--flush", src_uri, dst_uri]

    def command_text(self) -> str:
        src = "nbd+unix:///?socket=SRC.sock"
        return " ".join(shlex.quote(a) for a in self.command(src, "nbd://127.0.0.1:PORT")).replace(
            str(VENV_PYTHON), ".venv/bin/python"
        )


@dataclass
class Sample:
    mbs: float
    seconds: float
    cpu: float  # user + system CPU seconds of the copy process (and its children)
    rss_mib: float  # peak RSS of the copy process (GNU time %M)
    cmp_ok: bool
    note: str = ""


@dataclass
class Case:
    key: str
    title: str
    source: str  # dense | sparse
    target: str  # qemu | ours (the target server)
    variants: list[Variant]
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # per variant key, warm-up first
    warmup: bool = True

    def timed(self, key: str) -> list[Sample]:
        return self.samples.get(key, [])[1:] if self.warmup else self.samples.get(key, [])

    def median(self, key: str) -> float:
        s = self.timed(key)
        return statistics.median(x.mbs for x in s) if s else float("nan")

    def best(self, key: str) -> float:
        s = self.timed(key)
        return max(x.mbs for x in s) if s else float("nan")

    def median_of(self, key: str, attr: str) -> float:
        s = self.timed(key)
        return statistics.median(getattr(x, attr) for x in s) if s else float("nan")

    def peak_rss(self, key: str) -> float:
        s = self.samples.get(key, [])
        return max(x.rss_mib for x in s) if s else float("nan")

    def cmp_counts(self, key: str) -> tuple[int, int]:
        s = self.samples.get(key, [])
        return sum(x.cmp_ok for x in s), len(s)


def throughput_cases(kinds: list[str]) -> list[Case]:
    cases = []
    for source in ("dense", "sparse"):
        for conns in (4, 1):
            key = f"{source}{'' if conns == 4 else '1'}"
            if key not in kinds:
                continue
            for target in ("qemu", "ours"):
                what = "dense (random data)" if source == "dense" else f"sparse-random ({SPARSE_PERCENT}% data)"
                cases.append(
                    Case(
                        f"{key}-{target}",
                        f"{what}, {conns} conn -> {'qemu-nbd' if target == 'qemu' else 'our server'}",
                        source,
                        target,
                        [Variant("ours", "ours", "ours", conns), Variant("nbdcopy", "nbdcopy", "nbdcopy", conns)],
                    )
                )
    return cases


def latency_case(target: str, high_requests: int) -> Case:
    return Case(
        "latency",
        f"dense, 4 conn, source delay-read={DELAY} -> {'qemu-nbd' if target == 'qemu' else 'our server'}",
        "dense",
        target,
        [
            Variant("ours", f"ours, delay {DELAY}", "ours", 4, None, True),
            Variant("nbdcopy", f"nbdcopy, delay {DELAY}", "nbdcopy", 4, None, True),
            Variant("oursR", f"ours -R {high_requests}, delay {DELAY}", "ours", 4, high_requests, True),
            Variant("ours0", "ours, no delay", "ours", 4, None, False),
            Variant("nbdcopy0", "nbdcopy, no delay", "nbdcopy", 4, None, False),
        ],
    )


# --------------------------------------------------------------------------
# servers


def wait_unix(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nbdkit exited with {proc.returncode} before listening")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nbdkit not listening on {path} after {timeout}s")


class Runner:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.size: int = args.size
        self.timeout: float = args.timeout
        self.dense: Path | None = args.dense
        self.sparse_ref: Path | None = None
        self.tmp = tmp
        self.sock = tmp / "src.sock"
        self.ours_prefix: list[str] = shlex.split(args.ours_prefix)
        self.verify: bool = not args.no_cmp

    # source: nbdkit on a unix socket, a fresh one per run
    def source_cmd(self, kind: str, delay: bool) -> list[str]:
        cmd = ["nbdkit", "-U", str(self.sock), "-f", "--exit-with-parent"]
        if delay:
            cmd.append("--filter=delay")
        if kind == "dense":
            cmd += ["file", str(self.dense)]
        else:
            cmd += ["sparse-random", str(self.size), f"seed={SPARSE_SEED}", f"percent={SPARSE_PERCENT}"]
        if delay:
            cmd.append(f"delay-read={DELAY}")
        return cmd

    @property
    def src_uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start_source(self, kind: str, delay: bool) -> subprocess.Popen[bytes]:
        self.sock.unlink(missing_ok=True)
        proc = bs._spawn(self.source_cmd(kind, delay), WORK / "copy-nbdkit.log", stdout=subprocess.DEVNULL)
        try:
            wait_unix(self.sock, proc)
        except BaseException:
            bs._kill(proc)
            raise
        return proc

    # target: qemu-nbd or our server on 127.0.0.1, a fresh one per run
    @staticmethod
    def qemu_cmd(image: Path, port: int) -> list[str]:
        return [
            "qemu-nbd", "-f", "raw", "-x", "", "-p", str(port), "-b", HOST,
            "-t", "-e", str(SHARED), "--cache=writeback", str(image),
        ]  # fmt: skip

    @staticmethod
    def ours_server_cmd(image: Path) -> list[str]:
        return [
            str(VENV_PYTHON), "-m", "sendense_nbd", "serve", "-f", "raw", "-b", HOST, "-p", "0",
            "-t", "-e", str(SHARED), "--cache", "writeback", str(image),
        ]  # fmt: skip

    def start_target(self, which: str, image: Path) -> bs.Server:
        log = WORK / f"copy-{which}-server.log"
        if which == "qemu":
            port = bs.free_port()
            cmd = self.qemu_cmd(image, port)
            proc = bs._spawn(cmd, log, stdout=subprocess.DEVNULL)
        else:
            cmd = self.ours_server_cmd(image)
            out_path = self.tmp / "server.out"
            with open(out_path, "wb") as stdout:
                proc = bs._spawn(cmd, log, stdout=stdout, cwd=str(REPO))
            port, deadline = 0, time.monotonic() + 30
            while not port and time.monotonic() < deadline:
                m = re.match(r"\s*(\d+)\s*\n", out_path.read_text())
                if m:
                    port = int(m.group(1))
                elif proc.poll() is not None:
                    break
                else:
                    time.sleep(0.02)
            if not port:
                bs._kill(proc)
                raise RuntimeError(f"our server printed no port (exit {proc.returncode}); see {log}")
        try:
            bs.wait_listening(port, proc)
        except BaseException:
            bs._kill(proc)
            raise
        return bs.Server(which, proc, port, cmd)

    def fresh_target(self) -> Path:
        TARGET_FILE.unlink(missing_ok=True)
        with open(TARGET_FILE, "wb") as f:
            f.truncate(self.size)
        return TARGET_FILE

    def reference(self, kind: str) -> Path:
        if kind == "dense":
            assert self.dense is not None
            return self.dense
        assert self.sparse_ref is not None
        return self.sparse_ref

    def make_sparse_reference(self) -> Path:
        """The sparse-random source as a file, made once with nbdcopy: what every sparse target must equal."""
        path = WORK / f"sparse-random-{self.size}-seed{SPARSE_SEED}-p{SPARSE_PERCENT}.img"
        if not (path.exists() and path.stat().st_size == self.size):
            print(f"writing {path.relative_to(REPO)} (nbdcopy of the sparse-random source)...", flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            with open(tmp, "wb") as f:
                f.truncate(self.size)
            src = self.start_source("sparse", False)
            try:
                res = subprocess.run(
                    ["nbdcopy", "--flush", self.src_uri, str(tmp)], capture_output=True, timeout=self.timeout
                )
                if res.returncode != 0:
                    raise RuntimeError(f"nbdcopy to {tmp} failed: {res.stderr.decode(errors='replace')}")
            finally:
                bs._kill(src)
            tmp.rename(path)
        self.sparse_ref = path
        return path

    # one timed copy
    def run_once(self, case: Case, v: Variant, prefix: list[str] | None = None) -> Sample:
        image = self.fresh_target()
        if case.source == "dense":
            assert self.dense is not None
            bs.warm_cache(self.dense)
        os.sync()  # the previous run's writeback must not land in this one
        src = self.start_source(case.source, v.delay)
        try:
            dst = self.start_target(case.target, image)
            try:
                cmd = v.command(self.src_uri, dst.uri, self.ours_prefix + (prefix or []) if v.tool == "ours" else None)
                seconds, cpu, rss, rc, out, err = timed_run(cmd, self.timeout, self.tmp, cwd=REPO)
                if rc is None:
                    raise RuntimeError(f"{shlex.join(cmd)} timed out after {self.timeout:g} s (killed)")
                if rc != 0:
                    raise RuntimeError(f"{shlex.join(cmd)} failed ({rc}): {err.strip()[-2000:]}")
            finally:
                dst.stop()
                server_rc = dst.proc.returncode
        finally:
            bs._kill(src)
        note = ""
        if v.tool == "ours":
            note = err.strip().splitlines()[-1] if err.strip() else ""
        if server_rc not in (0, -15):
            note += f" [target server exit {server_rc}]"
        ok = True
        if self.verify:
            res = subprocess.run(
                ["cmp", str(self.reference(case.source)), str(image)], capture_output=True, text=True, timeout=600
            )
            ok = res.returncode == 0
            if not ok:
                note += f" [cmp: {(res.stdout + res.stderr).strip()[:200]}]"
        image.unlink(missing_ok=True)
        return Sample(self.size / seconds / 1e6, seconds, cpu, rss / 1024, ok, note.strip())


def timed_run(cmd: list[str], timeout: float, tmp: Path, cwd: Path) -> tuple[float, float, int, int | None, str, str]:
    """Run ``cmd``; (wall s, CPU s, peak RSS KiB, exit code or None on timeout, stdout, stderr).

    Peak RSS and CPU come from GNU time (``%M``, ``%U + %S``), which forks the
    command itself: ``ru_maxrss`` from our own ``wait4`` is never below this
    benchmark's own peak RSS (subprocess uses vfork, and exec keeps the
    maximum of the address space it replaces).
    """
    out_path, err_path, time_path = tmp / "client.out", tmp / "client.err", tmp / "client.time"
    time_path.unlink(missing_ok=True)
    full = [TIME, "-f", "%M %U %S", "-o", str(time_path), *cmd] if os.path.exists(TIME) else cmd
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=str(cwd), start_new_session=True
        )
    bs._children[proc.pid] = proc  # killed at exit if we die meanwhile
    # a blocking wait returns the moment the copy exits; Popen.wait(timeout=...) polls with sleeps of up to
    # 50 ms, which would round sub-second copies up by as much
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        proc.wait()
        seconds = time.perf_counter() - t0
    finally:
        timer.cancel()
        bs._children.pop(proc.pid, None)
    rc: int | None = None if timed_out.is_set() else proc.returncode
    cpu, rss = float("nan"), 0
    if time_path.exists():
        lines = time_path.read_text().strip().splitlines()
        fields = lines[-1].split() if lines else []
        if len(fields) == 3:
            rss, cpu = int(fields[0]), float(fields[1]) + float(fields[2])
    return (
        seconds,
        cpu,
        rss,
        rc,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
    )


STARTUP: dict[str, float] = {}


def measure_startup(runs: int = 5) -> float:
    """Median wall time of ``python -m sendense_nbd copy --help``: the fixed cost in every row of ours."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        res = subprocess.run(
            [str(VENV_PYTHON), "-m", "sendense_nbd", "copy", "--help"],
            capture_output=True,
            text=True,
            cwd=str(REPO),
            timeout=60,
        )
        times.append(time.perf_counter() - t0)
        read_ours_defaults(res.stdout)
    STARTUP["ours"] = statistics.median(times)
    return STARTUP["ours"]


def run_case(runner: Runner, case: Case, rounds: int, warmup: bool) -> None:
    print(f"\n== {case.title}", flush=True)
    case.warmup = warmup
    order = list(case.variants)

    def one(v: Variant, label: str) -> None:
        s = runner.run_once(case, v)
        case.samples.setdefault(v.key, []).append(s)
        print(
            f"   {label:8s} {v.label:28s} {s.mbs:7.1f} MB/s  {s.seconds:6.2f} s  CPU {s.cpu:5.2f} s"
            f"  RSS {s.rss_mib:6.1f} MiB  cmp {'ok' if s.cmp_ok else 'DIFFERS'}  {s.note}",
            flush=True,
        )

    if warmup:
        for v in order:
            one(v, "warm-up")
    for r in range(rounds):
        for v in order if r % 2 == 0 else reversed(order):
            one(v, f"round {r + 1}")


# --------------------------------------------------------------------------
# reporting


def fmt_ratio(r: float) -> str:
    return "n/a" if r != r else f"{r:.2f}x"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def cmp_cell(case: Case, key: str) -> str:
    ok, n = case.cmp_counts(key)
    return f"{ok}/{n}" if ok == n else f"**{ok}/{n}**"


def table(cases: list[Case], size: int) -> str:
    gib = size / (1 << 30)
    lines = [
        "| case | ours MB/s | nbdcopy MB/s | ours/nbdcopy | target | met | best MB/s ours / nbdcopy"
        " | client CPU s/GiB ours / nbdcopy | peak RSS MiB ours / nbdcopy | cmp ok ours / nbdcopy |",
        "|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|",
    ]
    for c in cases:
        if c.key == "latency":
            continue
        ours, theirs = c.median("ours"), c.median("nbdcopy")
        ratio = ours / theirs if theirs else float("nan")
        want = TARGETS[c.source]
        lines.append(
            f"| {c.title} | {ours:.0f} | {theirs:.0f} | {fmt_ratio(ratio)} | >= {want:.1f}x | {verdict(ratio >= want)}"
            f" | {c.best('ours'):.0f} / {c.best('nbdcopy'):.0f}"
            f" | {c.median_of('ours', 'cpu') / gib:.2f} / {c.median_of('nbdcopy', 'cpu') / gib:.2f}"
            f" | {c.peak_rss('ours'):.0f} / {c.peak_rss('nbdcopy'):.0f}"
            f" | {cmp_cell(c, 'ours')} / {cmp_cell(c, 'nbdcopy')} |"
        )
    return "\n".join(lines)


def latency_table(case: Case, size: int) -> str:
    gib = size / (1 << 30)
    base = case.median("ours0")
    lines = [
        "| variant | MB/s | best MB/s | vs ours without delay | vs nbdcopy with delay | client CPU s/GiB | peak RSS MiB"
        " | cmp ok |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nbd = case.median("nbdcopy")
    for v in case.variants:
        m = case.median(v.key)
        lines.append(
            f"| {v.label} | {m:.0f} | {case.best(v.key):.0f} | {fmt_ratio(m / base)} | {fmt_ratio(m / nbd)}"
            f" | {case.median_of(v.key, 'cpu') / gib:.2f} | {case.peak_rss(v.key):.0f} | {cmp_cell(case, v.key)} |"
        )
    r = case.median("ours") / base
    lines.append("")
    lines.append(
        f"Latency target: ours with delay / ours without = {fmt_ratio(r)} (target >= {TARGETS['latency']:.1f}x):"
        f" {verdict(r >= TARGETS['latency'])}; with -R {case.variants[2].requests}:"
        f" {fmt_ratio(case.median('oursR') / base)}; nbdcopy with delay / without:"
        f" {fmt_ratio(nbd / case.median('nbdcopy0'))}."
    )
    return "\n".join(lines)


def memory_line(cases: list[Case], size: int) -> str:
    dense4 = [c for c in cases if c.key.startswith("dense-")]
    if not dense4:
        return ""
    peaks = [c.peak_rss("ours") for c in dense4]
    medians = [statistics.median(x.rss_mib for x in c.samples["ours"]) for c in dense4 if c.samples.get("ours")]
    nbd = [c.peak_rss("nbdcopy") for c in dense4]
    one = [c.peak_rss("ours") for c in cases if c.key.startswith("dense1-")]
    requests, request_size = OURS_DEFAULTS["requests"], OURS_DEFAULTS["request_size"]
    text = (
        f"Memory (the {bs.human(size)} dense copy, 4 connections x {requests} requests x {size_text(request_size)},"
        " all runs of the dense 4 conn rows):"
        f" our copy's peak RSS max {max(peaks):.0f} MiB, median {statistics.median(medians):.0f} MiB"
        f" (GNU time %M; nbdcopy: max {max(nbd):.0f} MiB)"
    )
    if one:
        text += f"; with 1 connection x {requests} requests: max {max(one):.0f} MiB"
    buffers = 4 * requests * request_size
    return (
        text + f". Bounded by connections x requests x request size ({size_text(buffers)} of buffers here) plus the"
        " interpreter, not by the disk size."
    )


def all_cmp(cases: list[Case]) -> tuple[int, int]:
    ok = n = 0
    for c in cases:
        for s in c.samples.values():
            ok += sum(x.cmp_ok for x in s)
            n += len(s)
    return ok, n


OVERLAP: dict[str, object] = {"seen": False, "waited": 0.0, "gave_up": False, "copy": False}


def _ancestors() -> set[int]:
    """This process and its parents (a ``timeout``/``sh -c`` wrapper also names bench_copy.py)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def script_running(script: str) -> bool:
    """A python process (not this one or its wrappers) runs ``script``.

    Not ``pgrep -f``: that also matches an editor, grep or git command that
    merely names the file.
    """
    mine = _ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if not args or "python" not in os.path.basename(args[0]):
            continue
        if any(os.path.basename(a) == script for a in args[1:3]):  # python [-u] SCRIPT ...
            return True
    return False


def bench_server_running() -> bool:
    return script_running("bench_server.py")


def other_copy_bench_running() -> bool:
    return script_running("bench_copy.py")


def _watch(stop: threading.Event) -> None:
    while not stop.wait(5.0):
        bs.LOAD["max"] = max(bs.LOAD.get("max", 0.0), os.getloadavg()[0])
        if bench_server_running():
            OVERLAP["seen"] = True
        if other_copy_bench_running():
            OVERLAP["copy"] = True


def section(args: argparse.Namespace, argv: list[str], cases: list[Case], runner: Runner) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    head = bs.CODE.get("head_start") or bs.git_head()
    head += " (with uncommitted changes under sendense_nbd/)" if bs.git_dirty() else ""
    size = args.size

    def rel(path: Path | str) -> str:
        return str(path).replace(str(REPO) + "/", "")

    throughput = [c for c in cases if c.key != "latency"]
    lat = next((c for c in cases if c.key == "latency"), None)
    variants: dict[str, Variant] = {}
    for c in cases:
        for v in c.variants:
            variants.setdefault(v.label + str(v.connections), v)

    def source_line(name: str, kind: str, delay: bool) -> str:
        command = shlex.join(runner.source_cmd(kind, delay))
        return f"  - {name}: `{command}`".replace(str(runner.sock), "SRC.sock").replace(str(REPO) + "/", "")

    ran = {c.source for c in cases} | ({"latency"} if any(c.key == "latency" for c in cases) else set())
    source_lines = [
        source_line(name, kind, delay)
        for name, kind, delay in (("dense", "dense", False), ("sparse", "sparse", False), ("latency", "dense", True))
        if name in ran
    ]
    out = [
        f"## {now}, commit {head}, copy: sendense-nbd copy vs nbdcopy",
        "",
        f"- written by `benchmarks/bench_copy.py --write-results`; machine: {os.cpu_count()} CPUs,"
        f" {platform.machine()}, Linux {platform.release()}, Python {platform.python_version()}",
        f"- peers: {bs.tool_version(['nbdcopy', '--version'])}; {bs.tool_version(['nbdkit', '--version'])};"
        f" {bs.tool_version(['qemu-nbd', '--version'])}; load average (1 min) {bs.LOAD['start']:.2f} at start,"
        f" {bs.LOAD['max']:.2f} max, {bs.LOAD['end']:.2f} at end (our own runs add about 1-2);"
        f" CPU used by other processes during the run: {bs.LOAD['other_cpu']:.0f} s in {bs.LOAD['wall']:.0f} s",
        f"- benchmark: `.venv/bin/python benchmarks/bench_copy.py {' '.join(shlex.quote(a) for a in argv)}`",
        f"- size {bs.human(size)}; {args.rounds} round(s)"
        + (" after a warm-up run per variant" if not args.no_warmup else ", no warm-up")
        + ", order alternating (A B / B A); median MB/s = 10^6 bytes of virtual size per second of the copy"
        " process's wall time (start-up and the final --flush included); a fresh source, a fresh target server"
        " and a fresh sparse target file per run; the dense source read into page cache and `sync` before each run",
        "- sources (nbdkit on a unix socket, `nbd+unix:///?socket=SRC.sock`):",
        *source_lines,
        "- targets (fresh sparse raw file per run):",
        f"  - qemu-nbd: `{shlex.join(Runner.qemu_cmd(Path('TARGET.img'), 0)).replace('-p 0', '-p PORT')}`",
        f"  - our server: `{shlex.join(Runner.ours_server_cmd(Path('TARGET.img')))}`".replace(
            str(VENV_PYTHON), ".venv/bin/python"
        ),
        f"- copy commands (each tool's default requests: ours {ours_defaults_text()}, nbdcopy {NBDCOPY_DEFAULT} per"
        " connection):",
    ]
    for v in variants.values():
        out.append(f"  - {v.label}, {v.connections} conn: `{v.command_text()}`")
    dense_ref = rel(runner.dense) if runner.dense else "dense-*.img"
    sparse_ref = rel(runner.sparse_ref) if runner.sparse_ref else "sparse-random-*.img"
    out.append(
        "- correctness: after every run (servers stopped) `cmp` of the target file with the source data"
        f" (`{dense_ref}`, or `{sparse_ref}` = nbdcopy of the sparse-random source, made once)"
        if runner.verify
        else "- correctness: **not checked** (--no-cmp)"
    )
    if OVERLAP["seen"] or OVERLAP["gave_up"]:
        out.append(
            f"- **overlap**: `benchmarks/bench_server.py` was running during (part of) this run"
            f" (waited {OVERLAP['waited']:.0f} s for it first{', then gave up' if OVERLAP['gave_up'] else ''});"
            " both benchmarks share the 2 CPUs, so absolute figures are low and ratios noisier"
        )
    if OVERLAP["copy"]:
        out.append("- **overlap**: another `bench_copy.py` was running during (part of) this run")
    changed = bs.changed_files(bs.CODE_FILES["start"], bs.CODE_FILES["end"]) if bs.CODE_FILES else []
    if changed:
        out.append(
            "- **files under sendense_nbd/ changed while this ran**: " + ", ".join(f"`{n}`" for n in changed[:10])
        )
    out += ["", table(throughput, size), ""]
    if lat:
        out += [latency_table(lat, size), ""]
    mem = memory_line(cases, args.size)
    if mem:
        out += [mem, ""]
    if STARTUP:
        out += [
            f"Start-up: `.venv/bin/python -m sendense_nbd copy --help` takes {STARTUP['ours']:.3f} s (median of 5),"
            " a fixed cost inside every `ours` time above.",
            "",
        ]
    ok, n = all_cmp(cases)
    out.append(f"Correctness: {ok} of {n} target files identical to the source (`cmp`).")
    out.append("")
    out.append(
        "Targets: ours/nbdcopy >= 1.0x dense, >= 0.9x sparse; ours with 10 ms read latency >= 0.8x of ours without;"
        " our peak RSS bounded."
    )
    if args.quick:
        out.append("\n*Quick smoke run (--quick): too small and too few rounds to judge the targets.*")
    return "\n".join(out) + "\n"


def write_results(text: str) -> None:
    """Put the section first (newest first), keeping every existing section below it."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    idx = old.find("\n## ")
    if idx >= 0:
        new = old[: idx + 1] + text + "\n" + old[idx + 1 :]
    else:
        new = (old.rstrip("\n") + "\n\n" if old else "# Benchmark results\n\n") + text
    RESULTS.write_text(new)
    print(f"wrote {RESULTS}")


# --------------------------------------------------------------------------


def profile(runner: Runner, case: Case, out: Path, top: int) -> None:
    """One untimed-comparison run of our copy under cProfile; prints the top functions."""
    import pstats

    v = case.variants[0]
    s = runner.run_once(case, v, prefix=["-m", "cProfile", "-o", str(out)])
    print(f"profiled {case.title}: {s.mbs:.0f} MB/s under cProfile, cmp {'ok' if s.cmp_ok else 'DIFFERS'}")
    st = pstats.Stats(str(out))
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=bs.parse_size, default=bs.parse_size("2G"), help="virtual size (default 2G)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case (default 5)")
    p.add_argument("--quick", action="store_true", help="smoke test: 128 MiB, 1 round, no warm-up")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument(
        "--cases",
        default="dense,dense1,sparse,sparse1,latency",
        help="comma list of dense dense1 sparse sparse1 latency (default: all)",
    )
    p.add_argument("--targets", default="qemu,ours", help="target servers for the throughput cases (qemu,ours)")
    p.add_argument("--latency-target", choices=["qemu", "ours"], default="qemu")
    p.add_argument("--high-requests", type=int, default=64, help="-R of the extra latency variant (64)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one copy")
    p.add_argument("--no-cmp", action="store_true", help="skip the cmp of every target (not for recorded runs)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="first wait (polling every 30 s) until no bench_server.py runs, at most this long",
    )
    p.add_argument("--write-results", action="store_true", help="add a section to benchmarks/RESULTS.md")
    p.add_argument("--json", type=Path, help="also dump raw samples here")
    p.add_argument("--ours-prefix", default="", help="arguments between our python and '-m sendense_nbd' (copy)")
    p.add_argument(
        "--profile",
        metavar="CASE",
        help="instead of benchmarking: one run of our copy under cProfile for CASE (e.g. dense-qemu,"
        " sparse-ours, latency), printing the top functions",
    )
    p.add_argument("--profile-out", type=Path, default=Path("/tmp/bench-copy.prof"))
    args = p.parse_args(argv)
    if args.quick:
        if "--size" not in " ".join(argv):
            args.size = 128 * MiB
        args.rounds, args.no_warmup = 1, True
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    for tool in ("nbdcopy", "nbdkit", "qemu-nbd", "cmp"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")
    kinds = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(kinds) - {"dense", "dense1", "sparse", "sparse1", "latency"}
    if unknown:
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    target_kinds = [t.strip() for t in args.targets.split(",") if t.strip()]
    WORK.mkdir(exist_ok=True)

    if args.wait_idle > 0:
        deadline = time.monotonic() + args.wait_idle * 60
        t0 = time.monotonic()
        while bench_server_running():
            if time.monotonic() >= deadline:
                OVERLAP["gave_up"] = True
                print("bench_server.py still running; starting anyway", flush=True)
                break
            print("waiting for bench_server.py to finish...", flush=True)
            time.sleep(30)
        OVERLAP["waited"] = time.monotonic() - t0

    cases = [c for c in throughput_cases(kinds) if c.target in target_kinds]
    if "latency" in kinds:
        cases.append(latency_case(args.latency_target, args.high_requests))
    needs_dense = any(c.source == "dense" for c in cases) or (args.profile or "").startswith(("dense", "latency"))
    args.dense = bs.make_dense(args.size) if needs_dense else None
    tmp = Path(tempfile.mkdtemp(prefix="bench-copy-"))
    runner = Runner(args, tmp)

    bs.LOAD["start"] = os.getloadavg()[0]
    cpu_start = bs._cpu_snapshot()
    stop = threading.Event()
    threading.Thread(target=_watch, args=(stop,), daemon=True).start()
    bs.CODE_FILES["start"], bs.CODE["head_start"] = bs.code_digest(), bs.git_head()
    if bench_server_running():
        OVERLAP["seen"] = True
    try:
        if any(c.source == "sparse" for c in cases) or (args.profile or "").startswith("sparse"):
            runner.make_sparse_reference()
        if args.profile:
            every = {c.key: c for c in throughput_cases(["dense", "dense1", "sparse", "sparse1"])}
            every["latency"] = latency_case(args.latency_target, args.high_requests)
            if args.profile not in every:
                p.error(f"--profile: one of {', '.join(every)}")
            profile(runner, every[args.profile], args.profile_out, 30)
            return 0
        print(f"size {bs.human(args.size)}, rounds {args.rounds}, cases {', '.join(c.key for c in cases)}")
        print(f"ours start-up (copy --help): {measure_startup():.3f} s", flush=True)
        for case in cases:
            run_case(runner, case, args.rounds, warmup=not args.no_warmup)
    finally:
        bs._kill_all()
        TARGET_FILE.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    stop.set()
    bs.LOAD["end"] = os.getloadavg()[0]
    bs.LOAD["other_cpu"], bs.LOAD["wall"] = bs.other_cpu(cpu_start, bs._cpu_snapshot())
    bs.LOAD["max"] = max(bs.LOAD.get("max", 0.0), bs.LOAD["start"], bs.LOAD["end"])
    bs.CODE_FILES["end"], bs.CODE["head_end"] = bs.code_digest(), bs.git_head()
    print(
        f"\nload average (1 min): {bs.LOAD['start']:.2f} at start, {bs.LOAD['max']:.2f} max,"
        f" {bs.LOAD['end']:.2f} at end; CPU used by other processes: {bs.LOAD['other_cpu']:.0f} s"
        f" in {bs.LOAD['wall']:.0f} s" + ("; bench_server.py ran meanwhile" if OVERLAP["seen"] else "")
    )
    print(table([c for c in cases if c.key != "latency"], args.size))
    lat = next((c for c in cases if c.key == "latency"), None)
    if lat:
        print()
        print(latency_table(lat, args.size))
    mem = memory_line(cases, args.size)
    if mem:
        print()
        print(mem)
    if STARTUP:
        print(f"\nours start-up (copy --help): {STARTUP['ours']:.3f} s")
    ok, n = all_cmp(cases)
    print(f"\ncmp: {ok}/{n} targets identical to the source")
    for c in cases:
        for key, samples in c.samples.items():
            for s in samples:
                if not s.cmp_ok:
                    print(f"   DIFFERS {c.title} / {key}: {s.note}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": args.size,
                    "load": bs.LOAD,
                    "overlap": OVERLAP,
                    "startup": STARTUP,
                    "cases": {c.key: {k: [vars(s) for s in v] for k, v in c.samples.items()} for c in cases},
                },
                indent=2,
            )
        )
    if args.write_results:
        write_results(section(args, argv, cases, runner))
    return 0 if ok == n else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        bs._kill_all()
        sys.exit(130)
