"""``sendense-nbd copies ...``: a hub's offsite copies (S3 with Object Lock), through its API (docs/HUB_API.md, 10).

Thin over ``/api/v1/copies``: every refusal is the hub's (``Error: HTTP 409 locked: ...``), exit status 1.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any
from urllib.parse import quote

import click

from sendense_nbd.cli.hubclient import HubClient, hub_options

#: Seconds a download or a verify may take (the hub reads the whole copy from the bucket).
LONG = 24 * 3600.0


def _path(copy_id: str, tail: str = "") -> str:
    return f"/copies/{quote(copy_id, safe='')}{tail}"


def _when(moment: float | None) -> str:
    if moment is None:
        return "-"
    return datetime.datetime.fromtimestamp(moment, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(copy: dict[str, Any]) -> str:
    """One copy as a tab-separated line: ID, state, kind, VM and disk, point, chain, lock's end, error."""
    where = f"{copy['vm_path']}:{copy['disk_key']}"
    fields = [copy["id"], copy["state"], copy.get("kind") or "-", where, copy["point_id"], copy.get("chain_id") or "-"]
    line = "\t".join([*fields, f"locked until {_when(copy.get('locked_until'))}"])
    return line + (f"\t{copy['error']}" if copy.get("error") else "")


@click.group("copies")
def copies_group() -> None:
    """A hub's offsite copies: list, show, serve from the bucket, download, verify, delete."""


@copies_group.command("list")
@click.option("--vm", "vm_path", help="Only this VM's copies (its inventory path).")
@click.option("--json", "as_json", is_flag=True, help="The API's JSON instead of one line per copy.")
@hub_options
def copies_list(vm_path: str | None, as_json: bool, hub: HubClient) -> None:
    """Every copy not deleted, oldest first: ID, state, kind, VM:disk, point, chain, lock's end, error."""
    query = f"?vm_path={quote(vm_path, safe='')}" if vm_path else ""
    copies = hub.call("GET", "/copies" + query)["copies"]
    if as_json:
        click.echo(json.dumps(copies, indent=2))
        return
    for copy in copies:
        click.echo(_line(copy))


@copies_group.command("show")
@click.argument("copy_id")
@hub_options
def copies_show(copy_id: str, hub: HubClient) -> None:
    """One copy with its manifest and target (JSON)."""
    click.echo(json.dumps(hub.call("GET", _path(copy_id)), indent=2))


@copies_group.command("export")
@click.argument("copy_id")
@click.option("--reader", help="The client certificate name the export admits (hubs checking client certificates).")
@click.option("--stop", is_flag=True, help="Stop serving the copy instead.")
@hub_options
def copies_export(copy_id: str, reader: str | None, stop: bool, hub: HubClient) -> None:
    """Serve a copy read-only over NBD straight from the bucket; prints its NBD URI (--stop: stop it)."""
    if stop:
        stopped = hub.call("DELETE", _path(copy_id, "/export"))["stopped"]
        click.echo(f"stopped serving {copy_id}" if stopped else f"{copy_id} was not served")
        return
    served = hub.call("POST", _path(copy_id, "/export"), {"reader": reader} if reader else {})
    click.echo(served["uri"])


@copies_group.command("download")
@click.argument("copy_id")
@click.argument("name")
@hub_options
def copies_download(copy_id: str, name: str, hub: HubClient) -> None:
    """Download a copy's chain into a new folder NAME of the hub's restore directory, checked; prints the top
    file's path (it opens with qemu-img as is)."""
    hub.timeout = LONG
    click.echo(hub.call("POST", _path(copy_id, "/download"), {"path": name})["path"])


@copies_group.command("verify")
@click.argument("copy_id")
@hub_options
def copies_verify(copy_id: str, hub: HubClient) -> None:
    """Read a copy from the bucket and compare every chunk with the digests recorded at backup time; exit 2
    when it differs (the bucket failing is exit 1, as every refusal)."""
    hub.timeout = LONG
    verdict = hub.call("POST", _path(copy_id, "/verify"))
    if verdict["verified"]:
        click.echo(f"{copy_id} verified")
        return
    click.echo(f"{copy_id} DAMAGED: {verdict['error']}", err=True)
    sys.exit(2)


@copies_group.command("delete")
@click.argument("copy_id")
@hub_options
def copies_delete(copy_id: str, hub: HubClient) -> None:
    """Delete a copy and the copies above it in its chain (refused while Object Lock holds it)."""
    for deleted in hub.call("DELETE", _path(copy_id))["deleted"]:
        click.echo(f"deleted copy {deleted}")
