"""The hub's export worker processes: a pool that serves exports outside the hub's event loop, one event loop
and one set of storage handles per process (:mod:`~sendense_nbd.hub.export_worker`).

The hub keeps leasing ports and binding their sockets (:mod:`~sendense_nbd.hub.ports` decides which port is
free, in one place); :meth:`WorkerPool.start` passes the bound socket to the least-loaded worker over its
channel (:mod:`~sendense_nbd.hub.channel`) with the export's :class:`~sendense_nbd.hub.exports.ExportSpec`,
and closes the hub's copy, so the port is held by that worker alone and freed by the kernel if it dies.
Workers start on first use (a hub that serves nothing starts none) and are supervised: a request that is not
answered in time fails alone (a slow image open or flush is one export's trouble: a start's port is stopped
behind it), and the worker is then pinged; one whose event loop does not answer a ping in
:data:`PING_TIMEOUT` seconds is hung and killed. A worker whose channel closes (it died) or that was killed is
reaped first, then reported to ``on_crash`` with a sentence naming it and how it ended (so that nothing it
still wrote lands after its jobs are failed), and a new one takes its place. Workers never outlive the hub: each
asks the kernel for SIGKILL when the hub dies (``PR_SET_PDEATHSIG``) and exits when its channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from sendense_nbd.errors import ExportWorkerError
from sendense_nbd.hub.channel import Channel, channel_pair

if TYPE_CHECKING:
    from sendense_nbd.hub.serving import ExportSpec, ExportStats
    from sendense_nbd.tls import ServerCredentials

log = logging.getLogger(__name__)

#: Seconds a worker may take to start and load the hub's TLS credentials.
READY_TIMEOUT = 60.0
#: Seconds a worker may take to open an export's image and start serving it (an RBD image opens over the
#: network, a copy from its bucket).
START_TIMEOUT = 120.0
#: Seconds a worker may take to stop an export: drain its clients, flush and close its image.
STOP_TIMEOUT = 600.0
#: Seconds a worker may take to answer for its exports' counters.
STATS_TIMEOUT = 10.0
#: Seconds a worker's event loop may take to answer a ping (else it is hung: killed).
PING_TIMEOUT = 10.0
#: Seconds a worker may take to exit when the hub stops it.
EXIT_TIMEOUT = 10.0
#: Seconds between two looks at whether a worker process exited (reaped without a thread).
REAP_INTERVAL = 0.02
#: The backlog of an export's socket, listening from when the hub hands it over (asyncio's own default).
LISTEN_BACKLOG = 100


@attrs.frozen
class WorkerSetup:
    """What every worker is told when it starts: clients per export, and the hub's TLS credentials (loaded in
    the worker)."""

    shared: int
    tls: ServerCredentials | None


@attrs.frozen
class WorkerView:
    """One export worker as ``GET /ports`` shows it: its slot, process (None: not running) and exports;
    ``responsive``: whether it answered for its exports' counters the last time it was asked."""

    index: int
    pid: int | None
    exports: int
    responsive: bool = True

    def to_json(self) -> dict[str, object]:
        """As JSON."""
        return attrs.asdict(self)


class _Worker:
    """One running worker process and its channel: requests, with their answers matched by ID."""

    def __init__(self, index: int, process: subprocess.Popen[bytes], channel: Channel) -> None:
        self.index = index
        self.process = process
        self.channel = channel
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)
        self.reader: asyncio.Task[None] | None = None
        #: How it ended (None while it runs).
        self.ended: str | None = None
        #: Why the pool killed it (None: it was not killed for a reason of the pool's).
        self.killed_for: str | None = None
        #: Whether it answered the last stats request in time.
        self.responsive = True
        #: Set once the process is reaped and the pool heard of its end.
        self.reaped = asyncio.Event()

    @property
    def label(self) -> str:
        """``export worker N (pid P)``, for sentences."""
        return f"export worker {self.index} (pid {self.process.pid})"

    @property
    def dying(self) -> bool:
        """Killed by the pool, or its channel closed: no new exports for it (it is being reaped)."""
        return self.killed_for is not None or self.channel.sock.fileno() < 0

    async def request(self, kind: str, body: object, limit: float, fds: Sequence[int] = ()) -> Any:
        """Send a request and await its answer; :class:`ExportWorkerError` when the worker is gone, or does not
        answer within ``limit`` seconds (then it is pinged, and killed and reaped if it is hung)."""
        try:
            return await self.ask(kind, body, limit, fds)
        except TimeoutError:
            slow = f"{self.label} did not answer {kind} within {limit:g} s"
            await self.check()
            raise ExportWorkerError(self.ended or slow) from None

    async def ask(self, kind: str, body: object, limit: float, fds: Sequence[int] = ()) -> Any:
        """Send a request and await its answer (:class:`TimeoutError` after ``limit`` seconds)."""
        if self.ended is not None or self.killed_for is not None:
            raise ExportWorkerError(self.ended or f"{self.label} {self.killed_for}: killed")
        request_id = next(self.ids)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = answer
        try:
            async with asyncio.timeout(limit):  # the send too: a stuck worker's channel may be full
                await self.channel.send((kind, request_id, body), fds)
                ok, value = await answer
        except TimeoutError:  # an OSError too: the caller's to handle
            raise
        except (OSError, ValueError) as exc:  # ValueError: the channel was closed meanwhile
            raise ExportWorkerError(self.ended or f"{self.label} cannot be reached: {exc}") from exc
        finally:
            self.pending.pop(request_id, None)
        if not ok:
            raise _rebuilt(value)
        return value

    async def check(self) -> None:
        """Ping the worker's event loop; if it does not answer in :data:`PING_TIMEOUT` seconds it is hung:
        killed, and returns once it is reaped (and the pool heard of it)."""
        try:
            await self.ask("ping", None, PING_TIMEOUT)
        except TimeoutError:
            self.kill(f"did not answer a ping within {PING_TIMEOUT:g} s")
        except ExportWorkerError:
            pass
        if self.killed_for is not None or self.ended is not None:
            await self.reaped.wait()

    def deliver(self, message: tuple[int, bool, Any]) -> None:
        """An answer from the worker: ``(request id, ok, value)``."""
        request_id, ok, value = message
        answer = self.pending.get(request_id)
        if answer is not None and not answer.done():
            answer.set_result((ok, value))

    def fail_pending(self) -> None:
        """The worker is gone: every request waiting fails with how it ended."""
        for answer in self.pending.values():
            if not answer.done():
                answer.set_exception(ExportWorkerError(self.ended or f"{self.label} is gone"))

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL it (the reader then sees its channel close); ``reason``: why, for how it ended."""
        self.killed_for = self.killed_for or reason
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def ending(self) -> str:
        """Reap the process (killing it if it lingers after closing its channel); how it ended."""
        code = await self._exited(EXIT_TIMEOUT)
        if code is None:
            self.kill()
            code = await self._exited(None)
        assert code is not None
        if self.killed_for is not None:
            return f"{self.label} {self.killed_for}: killed"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"{self.label} died: killed by signal {-code} ({signal.Signals(-code).name})"
        return f"{self.label} died: exit status {code}"

    async def _exited(self, limit: float | None) -> int | None:
        """The exit status once the process is reaped (looked at every :data:`REAP_INTERVAL` seconds, no
        thread), None if it still runs after ``limit`` seconds."""
        deadline = None if limit is None else time.monotonic() + limit
        while (code := self.process.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            await asyncio.sleep(REAP_INTERVAL)
        return code


class WorkerPool:
    """``size`` export worker processes (started on first use); ``on_crash(index, why)`` hears of each that
    died or was killed, before the requests it had in flight fail."""

    def __init__(self, size: int, setup: WorkerSetup, *, on_crash: Callable[[int, str], None]) -> None:
        self.size = size
        self.setup = setup
        self._on_crash = on_crash
        self._workers: list[_Worker | None] = [None] * size
        self._starting: list[asyncio.Task[_Worker] | None] = [None] * size
        #: Exports per worker (those starting included): the least-loaded worker gets the next.
        self._load = [0] * size
        self._ports: list[set[int]] = [set() for _ in range(size)]
        #: Background work: restarts of crashed workers, stops of exports whose start was cancelled.
        self._restarts: set[asyncio.Task[Any]] = set()
        self._closed = False

    def views(self) -> tuple[WorkerView, ...]:
        """Each worker's slot, process ID and exports."""
        return tuple(
            WorkerView(
                index,
                None if worker is None else worker.process.pid,
                len(self._ports[index]),
                worker is None or worker.responsive,
            )
            for index, worker in enumerate(self._workers)
        )

    async def start(self, spec: ExportSpec, sock: socket.socket) -> tuple[int, int]:
        """Serve ``spec`` on the bound socket ``sock`` in the least-loaded worker (closing the hub's copy);
        ``(worker, port)``."""
        index = min(range(self.size), key=lambda i: (self._load[i], i))
        self._load[index] += 1
        bound = int(sock.getsockname()[1])
        try:
            try:
                # Listening now holds the port against other processes' SO_REUSEADDR binds while the worker
                # starts (a bound socket that does not listen yet does not); connections wait in the backlog.
                sock.listen(LISTEN_BACKLOG)
                worker = await self._running(index)
                port = await worker.ask("start", spec, START_TIMEOUT, [sock.fileno()])
            finally:
                sock.close()
            if worker.ended is not None:  # it died right after answering: the export is gone
                raise ExportWorkerError(worker.ended)
        except TimeoutError:
            self._forget(index, bound)  # this export only: the worker stops it once its start ended
            await worker.check()
            raise ExportWorkerError(
                worker.ended or f"{worker.label} did not start export {spec.name} within {START_TIMEOUT:g} s"
            ) from None
        except asyncio.CancelledError:
            self._forget(index, bound)  # the worker may still start it: it is stopped after
            raise
        except BaseException:
            self._load[index] -= 1
            raise
        self._ports[index].add(port)
        return index, int(port)

    def _forget(self, index: int, port: int) -> None:
        """A start was cancelled or timed out: stop the export on ``port`` in the background (the worker stops
        it once its start ended), so that no export the hub does not know keeps the port."""
        self._load[index] -= 1
        worker = self._workers[index]
        if worker is None or worker.dying:
            return
        self._background(worker.request("stop", port, STOP_TIMEOUT))

    async def stop(self, index: int, port: int) -> None:
        """Stop the export on ``port``; returns once the worker flushed and closed its image."""
        worker = self._workers[index]
        if port not in self._ports[index]:
            return
        self._ports[index].discard(port)
        self._load[index] -= 1
        if worker is None:
            raise ExportWorkerError(f"export worker {index} is gone")
        await worker.request("stop", port, STOP_TIMEOUT)

    async def stats(self) -> list[ExportStats]:
        """The counters of every export the running workers serve; a worker that does not answer in time is
        left out and shown unresponsive (:meth:`views`), and pinged in the background (killed if hung)."""
        running = [worker for worker in self._workers if worker is not None]
        answers = await asyncio.gather(
            *(worker.ask("stats", None, STATS_TIMEOUT) for worker in running), return_exceptions=True
        )
        found: list[ExportStats] = []
        for worker, answer in zip(running, answers, strict=True):
            worker.responsive = not isinstance(answer, TimeoutError)
            if isinstance(answer, TimeoutError):
                log.warning("%s did not answer stats within %g s: unresponsive", worker.label, STATS_TIMEOUT)
                self._background(worker.check())
            elif isinstance(answer, BaseException):
                log.warning("%s: no counters: %s", worker.label, answer)
            else:
                found += answer
        return found

    def _background(self, work: Any) -> None:
        """Run ``work`` in a task the pool awaits when it closes."""
        task = asyncio.ensure_future(work)
        self._restarts.add(task)
        task.add_done_callback(self._restarted)

    async def close(self) -> None:
        """Stop every worker (asked to exit, killed after :data:`EXIT_TIMEOUT` seconds)."""
        self._closed = True
        await asyncio.gather(*self._restarts, return_exceptions=True)
        for task in self._starting:
            if task is not None:
                with contextlib.suppress(Exception):
                    await task
        for worker in [w for w in self._workers if w is not None]:
            with contextlib.suppress(ExportWorkerError, TimeoutError):
                await worker.ask("exit", None, EXIT_TIMEOUT)
            if worker.reader is not None:
                await asyncio.wait([worker.reader], timeout=EXIT_TIMEOUT)
                worker.kill()
                await asyncio.gather(worker.reader, return_exceptions=True)

    async def _running(self, index: int) -> _Worker:
        """Worker ``index``, started if it is not running (one start at a time per slot)."""
        worker = self._workers[index]
        if worker is not None and worker.dying:
            await worker.reaped.wait()  # no new exports for it; its slot is emptied once it is reaped
            worker = self._workers[index]
        if worker is not None and not worker.dying:
            return worker
        if self._closed:
            raise ExportWorkerError("the hub is stopping: no new exports")
        task = self._starting[index]
        if task is None:
            task = self._starting[index] = asyncio.ensure_future(self._spawn(index))
            task.add_done_callback(lambda _: self._starting.__setitem__(index, None))
        return await asyncio.shield(task)

    async def _spawn(self, index: int) -> _Worker:
        """Start worker ``index`` and wait until it says it is ready."""
        ours, theirs = channel_pair()
        # -P: the hub's working directory is not on the worker's sys.path (a module there would shadow ours)
        command = [sys.executable, "-P", "-m", "sendense_nbd.hub.export_worker", str(theirs.fileno()), str(os.getpid()),
                   str(logging.getLogger().getEffectiveLevel())]  # fmt: skip
        try:
            with theirs:  # forked by the loop's thread, whose end (not a pool thread's) PR_SET_PDEATHSIG watches
                process = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)  # noqa: ASYNC220
        except BaseException:
            ours.close()
            raise
        worker = _Worker(index, process, Channel(ours))
        worker.reader = asyncio.ensure_future(self._read(worker))
        started = time.monotonic()
        try:
            await worker.request("setup", self.setup, READY_TIMEOUT)
        except BaseException:
            worker.kill()
            await asyncio.gather(worker.reader, return_exceptions=True)
            raise
        self._workers[index] = worker
        log.info("%s started in %.2f s", worker.label, time.monotonic() - started)
        return worker

    async def _read(self, worker: _Worker) -> None:
        """Deliver the worker's answers until its channel closes; then it is gone (crashed, unless the pool
        is closing)."""
        try:
            while True:
                message, fds = await worker.channel.recv()
                for fd in fds:
                    os.close(fd)
                worker.deliver(message)
        except (EOFError, OSError) as exc:
            log.debug("%s: channel closed: %s", worker.label, exc)
        except Exception as exc:  # noqa: BLE001 - a message the hub cannot read: the worker is no use any more
            log.error("%s: unreadable message: %r", worker.label, exc)
            worker.kill(f"sent an unreadable message ({type(exc).__name__}: {exc})")
        finally:
            worker.channel.close()
        worker.ended = await worker.ending()
        self._gone(worker)

    def _gone(self, worker: _Worker) -> None:
        """A worker ended: its slot is emptied, its exports reported lost, its requests failed."""
        index = worker.index
        ended = worker.ended or f"{worker.label} is gone"
        if self._workers[index] is worker:
            self._workers[index] = None
            lost = self._ports[index]
            self._ports[index] = set()
            self._load[index] -= len(lost)
            if not self._closed:
                log.error("%s; %d export(s) lost; starting another", ended, len(lost))
                self._on_crash(index, ended)
                restart = asyncio.ensure_future(self._running(index))
                self._restarts.add(restart)
                restart.add_done_callback(self._restarted)
        worker.fail_pending()
        worker.reaped.set()

    def _restarted(self, task: asyncio.Task[Any]) -> None:
        self._restarts.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("export workers: %s", task.exception())


def _rebuilt(chain: list[BaseException]) -> BaseException:
    """A worker's error, rebuilt from its chain of causes (outermost first) as the worker sent it."""
    for outer, inner in itertools.pairwise(chain):
        outer.__cause__ = inner
    return chain[0]
