"""One device's changes, queued on one pool thread at a time, answered in batches.

A backend that runs one write at a time anyway (``Capabilities.serial_writes``:
a buffered raw file, a qcow2 image, each behind one lock) gains nothing from
handing every WRITE to its own pool thread: the threads only queue on the
device's lock and on the GIL, and every completion wakes the event loop on
its own. A :class:`WriteQueue` keeps such requests in a queue that one job
in the server's thread pool drains in order (other pool threads stay free
for reads and flushes), and hands results back to the event loop in
batches: one wake-up for all that completed since the last one.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


class WriteQueue:
    """Runs calls in order, one at a time, in ``executor``; results come back in batches."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._lock = threading.Lock()
        self._queue: deque[tuple[asyncio.Future[Any], Callable[[], Any]]] = deque()
        self._done: list[_Outcome] = []
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, call: Callable[[], Any]) -> asyncio.Future[Any]:
        """Queue ``call`` (from the event loop); the future gets its result or exception."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._queue.append((future, call))
            if self._draining:
                return future
            self._draining = True
        self._executor.submit(self._drain)
        return future

    def _drain(self) -> None:
        """In the pool: run queued calls until none is left, posting outcomes as they come."""
        queue, done, lock = self._queue, self._done, self._lock
        while True:
            with lock:
                if not queue:
                    self._draining = False
                    return
                future, call = queue.popleft()
            try:
                outcome: _Outcome = (future, call(), None)
            except BaseException as exc:  # handed to the awaiting request, as an executor would
                outcome = (future, None, exc)
            with lock:
                done.append(outcome)
                first = len(done) == 1
            if first:  # the loop has not been woken for this batch yet
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """In the event loop: settle every future that completed since the last batch."""
        with self._lock:
            done = self._done[:]
            self._done.clear()  # in place: the draining thread holds this list
        for future, result, exc in done:
            if future.cancelled():
                continue
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)
