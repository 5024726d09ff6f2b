"""``sendense-nbd policy ...`` and ``sendense-nbd status``: the operating layer, through the hub's API."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import click

from sendense_nbd.cli.hubclient import HubClient, hub_options

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _seconds(text: str | None, option: str) -> float | None:
    """``90``, ``90s``, ``15m``, ``4h``, ``1d``, ``2w`` as seconds."""
    if text is None:
        return None
    unit = text[-1:] if text[-1:] in _DURATION else "s"
    number = text[:-1] if text[-1:] in _DURATION else text
    try:
        value = float(number) * _DURATION[unit]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give seconds or a number with s, m, h, d or w", param_hint=option
        ) from None
    return value


def _spec_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The options that make (``add``) or change (``edit``) a policy; each maps to one JSON field."""
    options = [
        click.option("--file", "spec_file", type=click.File(), help="The policy as JSON (docs/OPERATIONS.md)."),
        click.option("--node", help="The node that runs its backups (default: the hub's default node)."),
        click.option("--include", multiple=True, help="Inventory path, folder or glob of VMs (repeatable)."),
        click.option("--exclude", multiple=True, help="Inventory path, folder or glob left out (repeatable)."),
        click.option("--cron", help='A cron expression, e.g. "0 22 * * 1-5".'),
        click.option("--every", help="An interval instead of cron: 90s, 15m, 4h, 1d."),
        click.option("--timezone", help="The schedule's time zone, e.g. Europe/Berlin (default UTC)."),
        click.option("--window", help="No new job starts this long after a slot: 4h."),
        click.option("--verify-cron", help="Verify the policy's points on this cron schedule."),
        click.option("--verify-every", help="Verify the policy's points at this interval."),
        click.option("--per-policy", type=int, help="VMs backed up at once by this policy."),
        click.option("--per-node", type=int, help="Jobs at once on its node, all policies together."),
        click.option("--mode", type=click.Choice(["auto", "full", "incremental"])),
        click.option("--full-every", type=int, help="A new full after this many incrementals (caps the chain)."),
        click.option("--keep-last", type=int),
        click.option("--keep-daily", type=int),
        click.option("--keep-weekly", type=int),
        click.option("--keep-monthly", type=int),
        click.option("--keep-yearly", type=int),
        click.option("--enable/--disable", "enabled", default=None, help="Whether its schedules run."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _schedule(cron: str | None, every: str | None, option: str) -> dict[str, Any] | None:
    if cron is not None and every is not None:
        raise click.UsageError(f"give {option}cron or {option}every, not both")
    if cron is not None:
        return {"cron": cron, "every": None}  # null: a merge patch drops the other kind
    if every is not None:
        return {"every": _seconds(every, f"--{option}every"), "cron": None}
    return None


def _patch(o: dict[str, Any]) -> dict[str, Any]:
    """The JSON fields the options give (a --file first, options over it)."""
    body: dict[str, Any] = json.load(o["spec_file"]) if o["spec_file"] is not None else {}
    if not isinstance(body, dict):
        raise click.BadParameter("the file holds a JSON object", param_hint="--file")
    if o["include"] or o["exclude"]:
        body["vms"] = {**body.get("vms", {}), **({"include": list(o["include"])} if o["include"] else {})}
        if o["exclude"]:
            body["vms"]["exclude"] = list(o["exclude"])
    schedule = _schedule(o["cron"], o["every"], "--")
    extra = {
        key: value
        for key, value in (("timezone", o["timezone"]), ("window", _seconds(o["window"], "--window")))
        if value is not None
    }
    if schedule is not None or extra:
        body["schedule"] = {**(schedule or body.get("schedule", {})), **extra}
    verify = _schedule(o["verify_cron"], o["verify_every"], "--verify-")
    if verify is not None:
        body["verify"] = {**verify, **({"timezone": o["timezone"]} if o["timezone"] else {})}
    for name in ("node", "per_policy", "per_node", "mode", "full_every", "enabled"):
        if o[name] is not None:
            body[name] = o[name]
    keeps = {name: o[name] for name in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")}
    if any(value is not None for value in keeps.values()):
        body["retention"] = {**body.get("retention", {}), **{k: v for k, v in keeps.items() if v is not None}}
    return body


def _when(moment: object) -> str:
    if not isinstance(moment, (int, float)):
        return "-"
    return datetime.datetime.fromtimestamp(moment).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _echo(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


@click.group("policy")
def policy_group() -> None:
    """Backup policies: which VMs, when, how many at once, and how long points are kept."""


@policy_group.command("add")
@click.argument("name")
@_spec_options
@hub_options
def policy_add(name: str, hub: HubClient, **o: Any) -> None:
    """Create a policy. Example: policy add nightly --include /DC0/vm/prod --cron "0 22 * * *" --keep-daily 7."""
    _echo(hub.call("POST", "/policies", {**_patch(o), "name": name}))


@policy_group.command("edit")
@click.argument("name")
@_spec_options
@hub_options
def policy_edit(name: str, hub: HubClient, **o: Any) -> None:
    """Change the fields given; the others stay (a --file is a JSON merge patch: null resets a field)."""
    _echo(hub.call("PATCH", f"/policies/{quote(name, safe='')}", _patch(o)))


@policy_group.command("list")
@hub_options
def policy_list(hub: HubClient) -> None:
    """Every policy, with its next run."""
    for policy in hub.call("GET", "/policies")["policies"]:
        schedule = policy["schedule"]
        when = schedule.get("cron") or f"every {schedule.get('every')} s"
        state = "enabled" if policy.get("enabled", True) else "disabled"
        click.echo(f"{policy['name']}\t{when}\t{state}\tnext run {_when(policy['next_run'])}")


@policy_group.command("show")
@click.argument("name")
@hub_options
def policy_show(name: str, hub: HubClient) -> None:
    """One policy with its schedules' state and its last runs (JSON)."""
    _echo(hub.call("GET", f"/policies/{quote(name, safe='')}"))


@policy_group.command("delete")
@click.argument("name")
@hub_options
def policy_delete(name: str, hub: HubClient) -> None:
    """Delete a policy (its jobs and points stay)."""
    hub.call("DELETE", f"/policies/{quote(name, safe='')}")
    click.echo(f"deleted policy {name}")


@policy_group.command("run-now")
@click.argument("name")
@hub_options
def policy_run_now(name: str, hub: HubClient) -> None:
    """Back the policy's VMs up now, outside its schedule."""
    _echo(hub.call("POST", f"/policies/{quote(name, safe='')}/run"))


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="The hub's answer as JSON.")
@hub_options
def status_command(hub: HubClient, as_json: bool) -> None:
    """The hub at a glance: running jobs with progress, VMs at risk, space, nodes and next runs."""
    status = hub.call("GET", "/status")
    if as_json:
        _echo(status)
        return
    for line in format_status(status):
        click.echo(line)


def format_status(status: dict[str, Any]) -> list[str]:
    """``sendense-nbd status`` as lines of text."""
    space = status["repository"]
    gib = 1 << 30
    lines = [
        f"repository {space['path']}: {space['free'] / gib:.1f} GiB free of {space['total'] / gib:.1f} GiB"
        f" ({space['points']} points)",
        f"ports: {len(status['ports']['used'])} of {status['ports']['pool']['size']} in use",
        f"running jobs: {len(status['running'])}",
    ]
    for job in status["running"]:
        progress = job.get("progress") or {}
        percent = progress.get("percent")
        rate = progress.get("throughput_bps")
        lines.append(
            f"  {job['job_id']}  {job['kind']:<7} {job['vm_path']}  {progress.get('stage') or job['state']}"
            + (f"  {percent:.0f}%" if isinstance(percent, (int, float)) else "")
            + (f"  {rate / (1 << 20):.1f} MiB/s" if isinstance(rate, (int, float)) else "")
        )
    lines.append(f"VMs at risk: {len(status['at_risk'])}")
    lines.extend(
        f"  {vm['vm_path']}  policy {vm['policy']}, last good point {_when(vm['last_good'])}"
        for vm in status["at_risk"]
    )
    lines.append(f"active alerts: {len(status['alerts'])}")
    lines.extend(f"  {alert['kind']}: {alert['message']}" for alert in status["alerts"][:10])
    lines.append("nodes:")
    for node in status["nodes"]:
        health = "up" if node.get("up") else "DOWN"
        lines.append(f"  {node['name']:<16} {health:<5} last contact {_when(node.get('last_contact'))}")
    lines.append("policies:")
    for policy in status["policies"]:
        lines.append(f"  {policy['name']:<16} next run {_when(policy['next_run'])}  {policy.get('note') or ''}")
    return lines
