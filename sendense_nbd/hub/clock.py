"""The hub's clock, injectable: services read the time and wait through it, so tests move time by hand."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Where the hub's schedules, health checks and alerts read the time (epoch seconds)."""

    def now(self) -> float:
        """The current time."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""


class SystemClock:
    """The machine's clock."""

    def now(self) -> float:
        """``time.time()``."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told (:meth:`advance`); sleepers wake when their time has come."""

    def __init__(self, start: float) -> None:
        self._now = start
        self._moved = asyncio.Condition()

    def now(self) -> float:
        """The time :meth:`advance` has reached."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until :meth:`advance` has moved the clock ``seconds`` on."""
        wake = self._now + seconds
        async with self._moved:
            await self._moved.wait_for(lambda: self._now >= wake)

    async def advance(self, seconds: float) -> None:
        """Move the clock on and wake the sleepers whose time has come."""
        async with self._moved:
            self._now += seconds
            self._moved.notify_all()
        await asyncio.sleep(0)
