"""``sendense-nbd verify``: start a verify job on the hub (``POST /api/v1/verify``), and wait for it."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from sendense_nbd.cli.hubclient import HubClient, hub_options

#: Seconds between two looks at a job being waited for.
POLL = 1.0


def _verdict_line(point: dict[str, Any]) -> str:
    """``POINT disk KEY: verified`` or ``...: damaged at offset N: why``; ``(structure only)`` without digests."""
    line = f"{point['point_id']} disk {point['disk_key']}: {point['state']}"
    if point.get("bad_offset") is not None:
        line += f" at offset {point['bad_offset']}"
    if point.get("error"):
        line += f": {point['error']}"
    if not point.get("digests"):
        line += " (structure only: no digests)"
    return line


@click.command("verify")
@click.argument("vm_path", required=False)
@click.option("--point", "point_id", help="Verify this point's chain (instead of every point of VM_PATH).")
@click.option("--wait", is_flag=True, help="Wait for the job; print each point's verdict, exit 1 if one is damaged.")
@click.option("--wait-timeout", type=click.FloatRange(min=1), default=24 * 3600.0, show_default=True,
              help="Seconds --wait waits at most.")  # fmt: skip
@hub_options
def verify_command(hub: HubClient, vm_path: str | None, point_id: str | None, wait: bool, wait_timeout: float) -> None:
    """Re-read every point of VM_PATH (or one point's chain) from the repository, recompute its chunk
    digests and check its qcow2 files; each point is marked verified or damaged."""
    if (vm_path is None) == (point_id is None):
        raise click.UsageError("give VM_PATH or --point ID (one of them)")
    body = {"vm_path": vm_path} if vm_path is not None else {"point_id": point_id}
    job = hub.call("POST", "/verify", body)
    if not wait:
        click.echo(json.dumps(job, indent=2))
        return
    deadline = time.monotonic() + wait_timeout
    while job["state"] == "running":
        if time.monotonic() > deadline:
            raise click.ClickException(f"verify job {job['job_id']} still runs after {wait_timeout:.0f} s")
        time.sleep(POLL)
        job = hub.call("GET", f"/verify/{job['job_id']}")
    for point in job["detail"]["points"]:
        click.echo(_verdict_line(point))
    detail = job["detail"]
    click.echo(f"verify job {job['job_id']} {job['state']}: {detail['verified']} verified, {detail['damaged']} damaged")
    if job["state"] != "completed":
        reason = (job.get("error") or {}).get("message")
        raise click.ClickException(f"verify job {job['job_id']} {job['state']}: {reason}")
    if detail["damaged"]:
        raise SystemExit(1)
