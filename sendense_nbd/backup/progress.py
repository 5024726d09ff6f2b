"""Job progress: stages, per-disk figures, and a rate-bounded publisher that never drops the final state."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import attrs

from sendense_nbd.copy import Progress

log = logging.getLogger(__name__)

#: The stages of a backup, in order.
STAGES = (
    "initializing",
    "cleaning old snapshots",
    "enabling CBT",
    "creating snapshot",
    "setting up NBD",
    "preparing",
    "transferring",
    "finalizing",
)

#: A report lists at most this many stages entered (the hub takes as many).
MAX_HISTORY = 64


@attrs.define
class DiskProgress:
    """One disk's figures, as the copy engine last reported them."""

    disk_key: int
    sync_type: str = ""
    #: Bytes the copy reads (holes and unchanged areas excluded).
    total_bytes: int = 0
    #: Data bytes sent to the target.
    bytes_transferred: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    #: The disk's size: transferred + zeroed + skipped reach it at the end.
    disk_size: int = 0
    throughput_bps: float = 0.0
    eta_seconds: float | None = None
    done: bool = False
    #: Bytes that changed: the CBT areas of an incremental (known before the copy); for a full, the data read.
    bytes_changed: int = 0

    def update(self, event: Progress) -> None:
        """Take the copy engine's latest figures."""
        if self.sync_type == "full":
            self.bytes_changed = event.copied
        self.total_bytes = event.to_read
        self.bytes_transferred = event.copied
        self.bytes_zeroed = event.zeroed
        self.bytes_skipped = event.skipped
        self.disk_size = event.total
        self.throughput_bps = event.rate
        self.eta_seconds = event.eta
        self.done = event.done


Sink = Callable[[dict[str, object]], Awaitable[None]]


class JobProgress:
    """The state of one job; every change goes to the local listeners and, rate-bounded, to ``sink``.

    ``sink`` (the hub API) gets at most one report per ``interval`` seconds,
    always the latest; :meth:`finish` delivers the final report, retrying.
    """

    def __init__(
        self,
        job_id: str,
        sink: Sink | None,
        *,
        interval: float = 2.0,
        listeners: tuple[Callable[[dict[str, object]], None], ...] = (),
        final_retries: int = 5,
    ) -> None:
        self.job_id = job_id
        self.stage = STAGES[0]
        self.status = "running"
        self.error: dict[str, str] | None = None
        self.disks: dict[int, DiskProgress] = {}
        self.started = time.monotonic()
        #: Every stage entered, with its start in seconds after ``started`` (the hub times them from it).
        self.history: list[tuple[str, float]] = [(self.stage, 0.0)]
        self._sink = sink
        self._interval = interval
        self._listeners = listeners
        self._final_retries = final_retries
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.posted = 0

    def start(self) -> None:
        """Start publishing to the sink (rate-bounded); no-op without one."""
        if self._sink is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._publish())

    def set_stage(self, stage: str) -> None:
        """Enter ``stage`` (one of :data:`STAGES`)."""
        assert stage in STAGES, stage
        if stage != self.stage and len(self.history) < MAX_HISTORY:
            self.history.append((stage, round(time.monotonic() - self.started, 3)))
        self.stage = stage
        self._changed()

    def disk(self, key: int) -> DiskProgress:
        """The figures of disk ``key`` (created on first use)."""
        return self.disks.setdefault(key, DiskProgress(key))

    def copy_event(self, key: int, event: Progress) -> None:
        """A copy progress event of disk ``key``."""
        self.disk(key).update(event)
        self._changed()

    def report(self) -> dict[str, object]:
        """The job's progress report (docs/HUB_API.md): totals over every disk, and each disk."""
        disks = sorted(self.disks.values(), key=lambda d: d.disk_key)
        transferred = sum(d.bytes_transferred for d in disks)
        changed = sum(d.bytes_changed for d in disks)
        total = sum(d.total_bytes for d in disks)
        size = sum(d.disk_size for d in disks)
        processed = sum(d.bytes_transferred + d.bytes_zeroed + d.bytes_skipped for d in disks)
        rate = sum(d.throughput_bps for d in disks if not d.done)
        etas = [d.eta_seconds for d in disks if not d.done and d.eta_seconds is not None]
        return {
            "job_id": self.job_id,
            "stage": self.stage,
            "status": self.status,
            "bytes_transferred": transferred,
            "bytes_changed": changed,
            "total_bytes": total,
            "percent": round(100.0 * processed / size, 2) if size else (100.0 if self.status == "completed" else 0.0),
            "throughput_bps": round(rate),
            "eta_seconds": round(max(etas), 1) if etas else None,
            "elapsed_seconds": round(time.monotonic() - self.started, 3),
            "disks": [attrs.asdict(d) for d in disks],
            "error": self.error,
            "stages": [{"name": name, "elapsed": elapsed} for name, elapsed in self.history],
        }

    def _changed(self) -> None:
        report = self.report()
        for listener in self._listeners:
            listener(report)
        self._dirty.set()

    async def _publish(self) -> None:
        assert self._sink is not None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._sink(self.report())
                self.posted += 1
            except Exception as exc:  # noqa: BLE001 - progress is best effort until the final report
                log.warning("progress report for job %s failed: %s", self.job_id, exc)
            await asyncio.sleep(self._interval)

    async def finish(self, status: str, error: dict[str, str] | None = None) -> bool:
        """Set the final state and deliver it (retried); False if the sink never took it."""
        self.status = status
        self.error = error
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        report = self.report()
        for listener in self._listeners:
            listener(report)
        if self._sink is None:
            return True
        for attempt in range(self._final_retries + 1):
            try:
                await self._sink(report)
                self.posted += 1
                return True
            except Exception as exc:  # noqa: BLE001
                log.warning("final progress report for job %s failed (try %d): %s", self.job_id, attempt + 1, exc)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        return False
