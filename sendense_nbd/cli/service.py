"""What the long-running commands (hub, node) share: announce readiness, run until a signal."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import click


async def ready_then_wait(announcement: dict[str, object]) -> None:
    """Print ``announcement`` as one JSON line (the service is ready), then wait for SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Handlers first: a caller may signal the moment it reads the line.
    click.echo(json.dumps(announcement))
    sys.stdout.flush()
    await stop.wait()
