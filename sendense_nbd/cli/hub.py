"""``sendense-nbd hub``, ``ports``, ``points``, ``restore`` and ``node``: the backup side."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

from sendense_nbd.cli.hubclient import HubClient, hub_options, read_token
from sendense_nbd.cli.service import ready_then_wait
from sendense_nbd.tunnel.cli import server_config_from_options, ssh_server_options

if TYPE_CHECKING:
    from sendense_nbd.hub.alerts import AlertConfig
    from sendense_nbd.hub.db import Database
    from sendense_nbd.hub.repository import Repository


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"{text!r}: expected HOST:PORT", param_hint="--listen")
    return host.strip("[]"), int(port)


def _alert_config(o: dict[str, Any]) -> AlertConfig:
    """The alert options, checked: an http(s) webhook URL, a relay with recipients, a readable password."""
    from urllib.parse import urlsplit

    from sendense_nbd.hub.alerts import AlertConfig

    webhook = o["alert_webhook"]
    if webhook is not None and (urlsplit(webhook).scheme not in ("http", "https") or not urlsplit(webhook).hostname):
        raise click.BadParameter(f"{webhook!r}: expected an http:// or https:// URL", param_hint="--alert-webhook")
    host, port = (None, 25) if o["smtp"] is None else _relay(o["smtp"])
    if (host is None) != (not o["mail_to"]):
        raise click.UsageError("--smtp and --mail-to go together: a relay and who gets the mails")
    if host is None and (o["smtp_starttls"] or o["smtp_user"]):
        raise click.UsageError("--smtp-starttls and --smtp-user need --smtp")
    if (o["smtp_user"] is None) != (o["smtp_password_file"] is None):
        raise click.UsageError("--smtp-user and --smtp-password-file go together")
    if o["smtp_password_file"] is not None:
        try:
            with open(o["smtp_password_file"], encoding="utf-8") as f:
                f.read(1)
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read it: {exc}", param_hint="--smtp-password-file") from exc
    return AlertConfig(
        webhook_url=webhook, smtp_host=host, smtp_port=port, smtp_starttls=o["smtp_starttls"],
        smtp_user=o["smtp_user"], smtp_password_file=o["smtp_password_file"], mail_from=o["mail_from"],
        mail_to=tuple(o["mail_to"]), low_space=o["low_space"],
    )  # fmt: skip


def _relay(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` of the SMTP relay (port 25 by default)."""
    host, port = text, "25"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") if rest else port
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{text!r}: expected HOST or HOST:PORT", param_hint="--smtp")
    return host, int(port)


@click.command("hub")
@click.option("--repo", required=True, type=click.Path(file_okay=False), help="Repository directory.")
@click.option("--listen", default="127.0.0.1:8082", show_default=True, help="API address HOST:PORT.")
@click.option("--nbd-ports", default="10100-10200", show_default=True, help="NBD port pool.")
@click.option("--nbd-bind", default="127.0.0.1", show_default=True, help="Address the NBD exports listen on.")
@click.option("--nbd-advertise", help="Host name nodes use for the exports (default: --nbd-bind).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Bearer token (required off loopback).")
@click.option("--node-url", help="The node API, e.g. http://127.0.0.1:8081.")
@click.option("--node-token-file", type=click.Path(dir_okay=False), help="Bearer token for the node API.")
@click.option(
    "--restore-dir",
    type=click.Path(file_okay=False),
    help="Where POST /restores convert writes files (default REPO/restores; callers give only a file name).",
)
@click.option("--public-url", help="This API as the node reaches it (default: http://LISTEN).")
@click.option("--keep", type=click.IntRange(1, 10000), default=7, show_default=True, help="Restore points per disk.")
@click.option("--job-timeout", type=click.FloatRange(1), default=86400, show_default=True, help="Seconds.")
@click.option(
    "--min-free",
    type=click.IntRange(0),
    default=1 << 30,
    show_default=True,
    help="Bytes a backup must leave free in the repository; a job expected to need more is refused (507).",
)
@click.option(
    "--node-lost",
    type=click.FloatRange(30, 86400),
    default=120,
    show_default=True,
    help="Seconds a node may go unheard before its running backup jobs fail node_unavailable.",
)
@click.option("--alert-webhook", metavar="URL", help="POST each alert to this URL as JSON.")
@click.option("--smtp", metavar="HOST[:PORT]", help="Mail alerts through this SMTP relay (port 25 by default).")
@click.option("--smtp-starttls", is_flag=True, help="Use STARTTLS with the relay (its certificate is verified).")
@click.option("--smtp-user", help="Log in to the relay as this user (with --smtp-password-file).")
@click.option("--smtp-password-file", type=click.Path(dir_okay=False), help="The relay password (read per mail).")
@click.option("--mail-from", default="sendense@localhost", show_default=True, help="Sender of alert mails.")
@click.option("--mail-to", multiple=True, help="Recipient of alert mails (repeatable).")
@click.option(
    "--low-space",
    type=click.FloatRange(0, 1),
    default=0.10,
    show_default=True,
    help="Alert when the repository's free fraction falls below this (0: never).",
)
@ssh_server_options
def hub_command(**o: Any) -> None:
    """Run the hub: port pool, NBD exports, qcow2 repository and the backup REST API.

    With --ssh-listen it also runs the SSH tunnel endpoint: nodes may forward the NBD ports and this
    API's port, and reverse-forward their node API (--ssh-node-api).
    """
    from sendense_nbd.errors import PortError
    from sendense_nbd.http_api import is_loopback
    from sendense_nbd.hub.ports import parse_range

    host, port = _listen(o["listen"])
    token = read_token(o["token_file"])
    o["node_token"] = read_token(o["node_token_file"], "--node-token-file")
    o["alerts"] = _alert_config(o)
    if token is None and not is_loopback(host):
        raise click.UsageError(f"--listen {o['listen']} is not loopback: give --token-file")
    try:
        pool = parse_range(o["nbd_ports"])
    except PortError as exc:
        raise click.BadParameter(str(exc), param_hint="--nbd-ports") from exc
    from sendense_nbd.errors import SendenseError

    try:
        sys.exit(asyncio.run(_run_hub(o, host, port, pool, token)))
    except (SendenseError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


async def _run_hub(o: dict[str, Any], host: str, port: int, pool: range, token: str | None) -> int:
    import socket

    from aiohttp import web

    from sendense_nbd.hub.api import build_app
    from sendense_nbd.hub.service import Hub, HubConfig

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, reuse_port=False)
    bound = listener.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    config = HubConfig(
        repo=o["repo"],
        nbd_ports=pool,
        nbd_bind=o["nbd_bind"],
        nbd_advertise=o["nbd_advertise"],
        node_url=o["node_url"],
        node_token=o["node_token"],
        public_url=o["public_url"] or url,
        job_timeout=o["job_timeout"],
        keep_points=o["keep"],
        min_free=o["min_free"],
        node_lost=o["node_lost"],
        restore_dir=o["restore_dir"],
        alerts=o["alerts"],
    )
    try:
        hub = Hub(config)
    except BaseException:
        listener.close()
        raise
    recovered = await hub.start()
    runner = web.AppRunner(build_app(hub, token=token), access_log=None)
    await runner.setup()
    tunnel_server = None
    try:
        await web.SockSite(runner, listener).start()
        dest = "127.0.0.1" if o["nbd_bind"] in ("0.0.0.0", "::") else o["nbd_bind"]
        ssh = server_config_from_options(o, ports=[*pool, bound], dest_host=dest)
        if ssh is not None:
            from sendense_nbd.tunnel.server import TunnelServer

            tunnel_server = TunnelServer(ssh)
            await tunnel_server.start()
        started: dict[str, object] = {"listening": url, "repo": config.repo, **recovered.to_json()}
        if tunnel_server is not None:
            started["ssh_port"] = tunnel_server.port
        await ready_then_wait(started)
    finally:
        if tunnel_server is not None:
            tunnel_server.close()
            await tunnel_server.wait_closed()
        await runner.cleanup()
        hub.close()
        await hub.wait_closed()
    return 0


def _open_repository(repo: str) -> tuple[Database, Repository]:
    """The store and repository of an existing hub repository (the hub itself need not run)."""
    import os

    from sendense_nbd.hub.db import Database
    from sendense_nbd.hub.repository import Repository

    if not os.path.exists(os.path.join(repo, "hub.db")):
        raise click.ClickException(f"{repo} is not a hub repository (no hub.db)")
    db = Database(os.path.join(repo, "hub.db"))
    return db, Repository(repo, db)


@click.command("ports")
@click.option("--repo", required=True, type=click.Path(file_okay=False))
@click.option("--nbd-ports", default="10100-10200", show_default=True)
def ports_command(repo: str, nbd_ports: str) -> None:
    """List the leased NBD ports (by whom, since when) and how many are free."""
    from sendense_nbd.hub.ports import PortAllocator, parse_range

    db, _ = _open_repository(repo)
    try:
        status = asyncio.run(PortAllocator(db, parse_range(nbd_ports)).status())
    finally:
        db.close()
    click.echo(json.dumps(status.to_json(), indent=2))


@click.command("points")
@click.argument("vm_path")
@click.option("--repo", required=True, type=click.Path(file_okay=False))
def points_command(vm_path: str, repo: str) -> None:
    """List a VM's completed restore points."""
    db, repository = _open_repository(repo)
    try:
        points = asyncio.run(repository.points(vm_path))
    finally:
        db.close()
    click.echo(json.dumps([p.to_json() for p in points], indent=2))


@click.command("restore")
@click.argument("point_id")
@click.option("--repo", required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="A new standalone image.")
@click.option("-f", "--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True)
def restore_command(point_id: str, repo: str, output: str, fmt: str) -> None:
    """Write a restore point (its whole chain) to a standalone raw or qcow2 file, verified.

    To serve a point over NBD instead, POST /api/v1/restores to the running hub.
    """
    import os

    from sendense_nbd.errors import SendenseError
    from sendense_nbd.hub.repository import PointStatus
    from sendense_nbd.hub.service import convert_point
    from sendense_nbd.storage import ImageFormat

    if os.path.lexists(output):
        raise click.ClickException(f"{output} exists")
    db, repository = _open_repository(repo)

    async def run() -> None:
        point = await repository.point(point_id)
        if point.status is not PointStatus.COMPLETED:
            raise click.ClickException(f"point {point_id} is not completed")
        await convert_point(point, output, ImageFormat(fmt))

    try:
        asyncio.run(run())
    except (SendenseError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        db.close()
    click.echo(f"restored {point_id} to {output} ({fmt}), verified")


@click.group("node")
def node_group() -> None:
    """The nodes a hub sends jobs to: register, list (with health), change, forget."""


def _node_body(url: str | None, token_file: str | None, identity: str | None) -> dict[str, Any]:
    """The fields given, as the hub API takes them."""
    body: dict[str, Any] = {}
    if url is not None:
        body["url"] = url
    if token_file is not None:
        body["token"] = read_token(token_file, "--node-token-file")
    if identity is not None:
        body["tunnel_identity"] = identity
    return body


_node_token_option = click.option(
    "--node-token-file", type=click.Path(dir_okay=False), help="The node API's bearer token (kept by the hub)."
)
_identity_option = click.option(
    "--tunnel-identity", metavar="SHA256:...", help="The SSH key fingerprint the node's tunnel uses (ssh-keygen -l)."
)


@node_group.command("add")
@click.argument("name")
@click.option("--url", required=True, help="The node API, e.g. http://10.0.0.5:8081.")
@_node_token_option
@_identity_option
@hub_options
def node_add(name: str, url: str, node_token_file: str | None, tunnel_identity: str | None, hub: HubClient) -> None:
    """Register a node under NAME (a policy or backup names it; 'default' takes jobs that name none)."""
    node = hub.call("POST", "/nodes", {"name": name, **_node_body(url, node_token_file, tunnel_identity)})
    click.echo(json.dumps(node, indent=2))


@node_group.command("list")
@click.option("--check", is_flag=True, help="Ask every node for its health now (else: as last seen).")
@hub_options
def node_list(check: bool, hub: HubClient) -> None:
    """Every node: name, state, URL, last contact, version, running jobs, last error."""
    for node in hub.call("GET", "/nodes" + ("?check=1" if check else ""))["nodes"]:
        state = {True: "up", False: "DOWN", None: "unknown"}[node["up"]]
        jobs = "-" if node["running_jobs"] is None else f"{node['running_jobs']} running"
        contact = "never" if node["last_contact"] is None else _ago(node["last_contact"])
        line = f"{node['name']}\t{state}\t{node['url']}\tcontact {contact}\t{node['version'] or '-'}\t{jobs}"
        click.echo(line + (f"\t{node['last_error']}" if node["last_error"] and not node["up"] else ""))


def _ago(moment: float) -> str:
    import time

    seconds = max(0, int(time.time() - moment))
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"


@node_group.command("show")
@click.argument("name")
@click.option("--check", is_flag=True, help="Ask the node for its health now.")
@hub_options
def node_show(name: str, check: bool, hub: HubClient) -> None:
    """One node with its health (JSON; the token shows only as true or false)."""
    click.echo(json.dumps(hub.call("GET", f"/nodes/{quote(name, safe='')}" + ("?check=1" if check else "")), indent=2))


@node_group.command("edit")
@click.argument("name")
@click.option("--url", help="A new node API URL.")
@_node_token_option
@click.option("--no-node-token", is_flag=True, help="Forget the node's token.")
@_identity_option
@click.option("--no-tunnel-identity", is_flag=True, help="Forget the tunnel identity.")
@hub_options
def node_edit(name: str, hub: HubClient, **o: Any) -> None:
    """Change a node's URL, token or tunnel identity (its health is kept)."""
    body = _node_body(o["url"], o["node_token_file"], o["tunnel_identity"])
    for flag, field in (("no_node_token", "token"), ("no_tunnel_identity", "tunnel_identity")):
        if o[flag]:
            if field in body:
                raise click.UsageError(f"--{flag.replace('_', '-')} and a new {field} contradict each other")
            body[field] = None
    if not body:
        raise click.UsageError("give what to change: --url, --node-token-file, --tunnel-identity or a --no- option")
    click.echo(json.dumps(hub.call("PATCH", f"/nodes/{quote(name, safe='')}", body), indent=2))


@node_group.command("delete")
@click.argument("name")
@hub_options
def node_delete(name: str, hub: HubClient) -> None:
    """Forget a node (refused while a policy names it)."""
    hub.call("DELETE", f"/nodes/{quote(name, safe='')}")
    click.echo(f"deleted node {name}")
