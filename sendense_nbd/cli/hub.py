"""``sendense-nbd hub``, ``ports``, ``points``, ``restore`` and ``node``: the backup side."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

from sendense_nbd.cli.hubclient import HubClient, hub_options, read_token
from sendense_nbd.cli.service import ready_then_wait
from sendense_nbd.tunnel.cli import server_config_from_options, ssh_server_options

if TYPE_CHECKING:
    import ssl

    from sendense_nbd.hub.alerts import AlertConfig
    from sendense_nbd.hub.db import Database
    from sendense_nbd.hub.repository import Repository
    from sendense_nbd.hub.service import Hub, HubConfig


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


def _tls_contexts(o: dict[str, Any]) -> None:
    """``o["nbd_tls_credentials"]`` (checked by loading them), ``o["nbd_tls_names"]`` (its certificate's names)
    and ``o["api_tls_context"]`` from the TLS options, loaded now (before the hub opens anything) so that
    unusable credentials stop it with the file and the reason."""
    import os

    from sendense_nbd.errors import TLSError
    from sendense_nbd.hub.certnames import CertificateNames
    from sendense_nbd.tls import ServerCredentials, server_context

    creds, mode = o["nbd_tls_creds"], o["nbd_tls"]
    if mode == "require" and creds is None:
        raise click.UsageError("--nbd-tls require needs --nbd-tls-creds DIR (sendense-nbd tls init makes one)")
    if o["nbd_tls_verify_client"] and creds is None:
        raise click.UsageError("--nbd-tls-verify-client needs --nbd-tls-creds DIR (its ca-cert.pem signs the nodes')")
    try:
        o["nbd_tls_credentials"] = (
            None if creds is None else ServerCredentials(os.path.abspath(creds), o["nbd_tls_verify_client"])
        )
        if o["nbd_tls_credentials"] is not None:
            o["nbd_tls_credentials"].context()
        cert = None if creds is None else os.path.join(creds, "server-cert.pem")
        o["nbd_tls_names"] = None if cert is None else CertificateNames.from_pem(cert)
    except TLSError as exc:
        raise click.BadParameter(str(exc), param_hint="--nbd-tls-creds") from exc
    try:
        o["api_tls_context"] = None if o["api_tls_creds"] is None else server_context(o["api_tls_creds"])
    except TLSError as exc:
        raise click.BadParameter(str(exc), param_hint="--api-tls-creds") from exc


def _default_node_options(command: Any) -> Any:
    """The default node's options, as ``node add`` takes them (--node-url and --node-token-file besides)."""
    options = [
        click.option("--node-tunnel-identity", metavar="SHA256:...",
                     help="The default node's tunnel identity (as node add --tunnel-identity)."),
        click.option("--node-transport", type=click.Choice(["tunnel", "tls"]),
                     help="How the default node reaches the NBD exports (as node add --transport; default tunnel)."),
        click.option("--node-nbd-host", metavar="HOST",
                     help="The hub's address as the default node dials the exports (as node add --nbd-host)."),
        click.option("--node-hub-url", metavar="URL",
                     help="The hub API as the default node reaches it (as node add --hub-url; default --public-url)."),
        click.option("--node-tls-pinned", is_flag=True,
                     help="The default node pins the hub's certificate by fingerprint (as node add --tls-pinned)."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _tls_options(command: Any) -> Any:
    """The hub's TLS options: NBD over TLS for its exports, HTTPS for its API."""
    options = [
        click.option("--nbd-tls-creds", type=click.Path(file_okay=False), metavar="DIR",
                     help="The exports' TLS credentials in qemu's layout (ca-cert.pem, server-cert.pem, "
                     "server-key.pem: tls init's DIR/hub). Nodes with transport tls get nbds:// exports."),
        click.option("--nbd-tls", type=click.Choice(["off", "require"]), default="off", show_default=True,
                     help="require: every export (every node's backups, restores) only over TLS; off: only "
                     "the exports of nodes with transport tls."),
        click.option("--nbd-tls-verify-client", is_flag=True,
                     help="Mutual TLS: a TLS client must present a certificate signed by DIR/ca-cert.pem "
                     "(tls init's nodes/NAME)."),
        click.option("--api-tls-creds", type=click.Path(file_okay=False), metavar="DIR",
                     help="Serve the API and console over HTTPS with DIR/server-cert.pem and server-key.pem."),
        click.option("--allow-plain-nbd", is_flag=True,
                     help="Serve plain NBD exports (tunnel nodes', restores') on a non-loopback --nbd-bind, "
                     "where anyone who reaches the ports can read and write them (refused without it)."),
        click.option("--allow-any-tls-client", is_flag=True,
                     help="Serve TLS exports on a non-loopback --nbd-bind without --nbd-tls-verify-client, where "
                     "any TLS client that reaches the ports can read and write them (refused without it)."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


#: The hub's store, for the hub and the commands that read its repository offline.
_DB_OPTION = click.option(
    "--db",
    metavar="URL",
    help="The hub's store: postgresql://USER@HOST/DB (several hubs), or sqlite:PATH (default: REPO/hub.db).",
)


@click.command("hub")
@click.option(
    "--repo",
    required=True,
    help="Repository: a directory (qcow2 files), or rbd://POOL[/NAMESPACE]?conf=CEPH.CONF&id=USER[&keyring=FILE] "
    "(an RBD image per disk, a snapshot per point; docs/STORAGE.md) with --state-dir.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    help="With an rbd:// --repo: the hub's own directory (its database, lock, restores, digests).",
)
@_DB_OPTION
@click.option("--listen", default="127.0.0.1:8082", show_default=True, help="API address HOST:PORT.")
@click.option("--nbd-ports", default="10100-10200", show_default=True, help="NBD port pool.")
@click.option(
    "--nbd-bind",
    default="127.0.0.1",
    show_default=True,
    help="Address the NBD exports listen on (off loopback: --nbd-tls require, or --allow-plain-nbd).",
)
@click.option(
    "--nbd-advertise",
    help="Host name nodes use for the exports (default: --nbd-bind); with --nbd-tls-creds, a name in the certificate.",
)
@click.option("--token-file", type=click.Path(dir_okay=False), help="Bearer token (required off loopback).")
@click.option("--node-url", help="The node API, e.g. http://127.0.0.1:8081.")
@click.option("--node-token-file", type=click.Path(dir_okay=False), help="Bearer token for the node API.")
@click.option(
    "--restore-dir",
    type=click.Path(file_okay=False),
    help="Where POST /restores convert writes files (default REPO/restores; callers give only a file name).",
)
@click.option(
    "--secrets-dir",
    type=click.Path(file_okay=False),
    help="The only folder offsite copy targets' secret files may be in (default: anywhere; recommended).",
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
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    default=None,
    help="Export worker processes serving the NBD exports (default: one per core; 0: the hub's own event loop).",
)
@click.option("--hub-id", help="This hub's ID in a cluster (default: made at the first start, kept in its directory).")
@click.option(
    "--api-advertise",
    metavar="URL",
    help="This API as the other hubs of a cluster and API clients reach it: http(s), a host, no credentials, "
    "query or fragment (default: --public-url).",
)
@click.option(
    "--heartbeat", type=click.FloatRange(0.1, 3600), default=5, show_default=True, help="Seconds between heartbeats."
)
@click.option(
    "--hub-lost",
    type=click.FloatRange(0.5, 86400),
    default=30,
    show_default=True,
    help="Seconds without a heartbeat before another hub takes this one over (fails its jobs, takes its runs).",
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
@_default_node_options
@_tls_options
@ssh_server_options
def hub_command(**o: Any) -> None:
    """Run the hub: port pool, NBD exports, qcow2 repository and the backup REST API.

    With --ssh-listen it also runs the SSH tunnel endpoint: nodes may forward the NBD ports and this
    API's port, and reverse-forward their node API (--ssh-node-api). With --nbd-tls-creds, nodes
    registered with transport tls reach the exports directly over NBD with TLS (docs/TLS.md).
    """
    from sendense_nbd.errors import PortError
    from sendense_nbd.http_api import is_loopback
    from sendense_nbd.hub.ports import parse_range

    host, port = _listen(o["listen"])
    token = read_token(o["token_file"])
    o["node_token"] = read_token(o["node_token_file"], "--node-token-file")
    o["alerts"] = _alert_config(o)
    _tls_contexts(o)
    if token is None and not is_loopback(host):
        raise click.UsageError(f"--listen {o['listen']} is not loopback: give --token-file")
    try:
        pool = parse_range(o["nbd_ports"])
    except PortError as exc:
        raise click.BadParameter(str(exc), param_hint="--nbd-ports") from exc
    from sendense_nbd.errors import SendenseError

    try:  # the configuration's checks (exports, the default node), before anything opens
        _hub_config(o, pool, o["public_url"] or f"http://{o['listen']}")
    except SendenseError as exc:
        raise click.UsageError(str(exc)) from None

    try:
        sys.exit(asyncio.run(_run_hub(o, host, port, pool, token)))
    except (SendenseError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def _workers(o: dict[str, Any]) -> int:
    """``--workers``, else one per core the hub may use."""
    if o["workers"] is not None:
        return int(o["workers"])
    return len(os.sched_getaffinity(0))


def _repository(o: dict[str, Any]) -> tuple[str, str | None]:
    """The hub's directory and its store: ``--repo DIR``, or ``--state-dir DIR`` with an ``rbd://`` ``--repo``."""
    from sendense_nbd.errors import RepositoryError
    from sendense_nbd.hub.repository.rbd import is_rbd_location, parse_location

    if not is_rbd_location(o["repo"]):
        if "://" in o["repo"]:
            raise click.BadParameter(f"{o['repo']!r}: a directory, or rbd://POOL?conf=...&id=...", param_hint="--repo")
        if o["state_dir"] is not None:
            raise click.UsageError("--state-dir goes with an rbd:// --repo (a directory --repo holds the hub's state)")
        if os.path.exists(os.path.join(o["repo"], "store.json")):
            raise click.UsageError(
                f"{o['repo']} is the state directory of an RBD repository (its store.json): start the hub with "
                f"--repo rbd://... --state-dir {o['repo']}"
            )
        return o["repo"], None
    try:
        parse_location(o["repo"])
    except RepositoryError as exc:
        raise click.BadParameter(str(exc), param_hint="--repo") from exc
    if o["state_dir"] is None:
        raise click.UsageError("an rbd:// --repo needs --state-dir DIR: the hub's database and lock stay local")
    return o["state_dir"], o["repo"]


def _hub_config(o: dict[str, Any], pool: range, public_url: str) -> HubConfig:
    """The hub's configuration from its options."""
    from sendense_nbd.hub.service import HubConfig
    from sendense_nbd.protocol.constants import TLSMode

    repo, store = _repository(o)
    return HubConfig(
        repo=repo,
        store=store,
        db=o["db"],
        nbd_ports=pool,
        nbd_bind=o["nbd_bind"],
        nbd_advertise=o["nbd_advertise"],
        node_url=o["node_url"],
        node_token=o["node_token"],
        node_tunnel_identity=o["node_tunnel_identity"],
        node_transport=o["node_transport"] or "tunnel",
        node_nbd_host=o["node_nbd_host"],
        node_hub_url=o["node_hub_url"],
        node_tls_pinned=o["node_tls_pinned"],
        public_url=public_url,
        job_timeout=o["job_timeout"],
        keep_points=o["keep"],
        min_free=o["min_free"],
        node_lost=o["node_lost"],
        restore_dir=o["restore_dir"],
        secrets_dir=o["secrets_dir"],
        alerts=o["alerts"],
        nbd_tls_creds=o["nbd_tls_credentials"],
        nbd_tls=TLSMode(o["nbd_tls"]),
        nbd_tls_names=o["nbd_tls_names"],
        allow_plain_nbd=o["allow_plain_nbd"],
        allow_any_tls_client=o["allow_any_tls_client"],
        workers=_workers(o),
        hub_id=o["hub_id"],
        api_advertise=o["api_advertise"],
        heartbeat=o["heartbeat"],
        hub_lost=o["hub_lost"],
    )


async def _run_hub(o: dict[str, Any], host: str, port: int, pool: range, token: str | None) -> int:
    import socket

    from aiohttp import web

    from sendense_nbd.hub.api import build_app
    from sendense_nbd.hub.service import Hub

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, reuse_port=False)
    bound = listener.getsockname()[1]
    scheme = "http" if o["api_tls_context"] is None else "https"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{bound}"
    config = _hub_config(o, pool, o["public_url"] or url)
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
        api_tls: ssl.SSLContext | None = o["api_tls_context"]
        await web.SockSite(runner, listener, ssl_context=api_tls).start()
        dest = "127.0.0.1" if o["nbd_bind"] in ("0.0.0.0", "::") else o["nbd_bind"]
        ssh = server_config_from_options(o, ports=[*pool, bound], dest_host=dest)
        if ssh is not None:
            from sendense_nbd.tunnel.server import TunnelServer

            tunnel_server = TunnelServer(ssh)
            await tunnel_server.start()
        started: dict[str, object] = {"listening": url, "repo": config.repo, "hub": hub.id, **recovered.to_json()}
        if config.store is not None:
            started["store"] = config.store
        if tunnel_server is not None:
            started["ssh_port"] = tunnel_server.port
        await _serve_until_ended(hub, started)
    finally:
        if tunnel_server is not None:
            tunnel_server.close()
            await tunnel_server.wait_closed()
        await runner.cleanup()
        hub.close()
        await hub.wait_closed()
    return 0


async def _serve_until_ended(hub: Hub, started: dict[str, object]) -> None:
    """Announce ``started`` and serve until a signal, or until the hub's background work ends by itself (its
    error raised: another process took this hub's ID over)."""
    waiting = asyncio.ensure_future(ready_then_wait(started))
    ended = asyncio.ensure_future(hub.ended())
    try:
        await asyncio.wait([waiting, ended], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, ended):
            task.cancel()
        await asyncio.gather(waiting, ended, return_exceptions=True)
    failure = ended.exception() if ended.done() and not ended.cancelled() else None
    if failure is not None:
        raise failure


def _open_repository(repo: str, target: str | None) -> tuple[Database, Repository]:
    """The store (``--db``, default REPO/hub.db) and repository of an existing hub repository (the hub itself
    need not run)."""
    import os

    from sendense_nbd.errors import SendenseError
    from sendense_nbd.hub.db import Database
    from sendense_nbd.hub.repository import Repository

    if target is None and not os.path.exists(os.path.join(repo, "hub.db")):
        raise click.ClickException(f"{repo} is not a hub repository (no hub.db)")
    from sendense_nbd.hub.repository import open_store

    try:
        db = Database(target or "sqlite:" + os.path.join(repo, "hub.db"))
    except SendenseError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        return db, Repository(repo, db, store=open_store(repo, None))
    except BaseException:
        db.close()
        raise


@click.command("ports")
@click.option("--repo", required=True, type=click.Path(file_okay=False))
@click.option("--nbd-ports", default="10100-10200", show_default=True)
@_DB_OPTION
def ports_command(repo: str, nbd_ports: str, db: str | None) -> None:
    """List the leased NBD ports (by whom, since when) and how many are free."""
    from sendense_nbd.hub.cluster import hub_id
    from sendense_nbd.hub.ports import PortAllocator, parse_range

    store, _ = _open_repository(repo, db)
    try:
        allocator = PortAllocator(store, parse_range(nbd_ports), hub=hub_id(repo, None))
        status = asyncio.run(allocator.status())
    finally:
        store.close()
    click.echo(json.dumps(status.to_json(), indent=2))


@click.command("points")
@click.argument("vm_path")
@click.option("--repo", required=True, type=click.Path(file_okay=False))
@_DB_OPTION
def points_command(vm_path: str, repo: str, db: str | None) -> None:
    """List a VM's completed restore points."""
    store, repository = _open_repository(repo, db)
    try:
        points = asyncio.run(repository.points(vm_path))
    finally:
        store.close()
    click.echo(json.dumps([p.to_json() for p in points], indent=2))


@click.command("restore")
@click.argument("point_id")
@click.option("--repo", required=True, type=click.Path(file_okay=False), help="The hub's directory.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="A new standalone image file.")
@click.option("-f", "--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True)
@click.option("--clone", metavar="IMAGE", help="Instead: a new RBD image in the repository's pool (RBD repository).")
@_DB_OPTION
def restore_command(point_id: str, repo: str, output: str | None, fmt: str, clone: str | None, db: str | None) -> None:
    """Write a restore point (its whole chain) to a standalone raw or qcow2 file, verified; or, with
    --clone, make a new RBD image of it (a flattened clone of its snapshot).

    To serve a point over NBD instead, POST /api/v1/restores to the running hub.
    """
    import os

    from sendense_nbd.errors import SendenseError
    from sendense_nbd.hub.repository import PointStatus
    from sendense_nbd.storage import ImageFormat

    if (output is None) == (clone is None):
        raise click.UsageError("give -o FILE or --clone IMAGE (one of them)")
    if output is not None and os.path.lexists(output):
        raise click.ClickException(f"{output} exists")
    store, repository = _open_repository(repo, db)

    async def run() -> str:
        point = await repository.point(point_id)
        if point.status is not PointStatus.COMPLETED:
            raise click.ClickException(f"point {point_id} is not completed")
        if clone is not None:
            target = repository.store.clone_target(clone)
            await repository.clone(point, clone)
            return target
        assert output is not None
        await repository.convert(point, output, ImageFormat(fmt))
        return f"{output} ({fmt}), verified"

    try:
        made = asyncio.run(run())
    except (SendenseError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()
    click.echo(f"restored {point_id} to {made}")


@click.group("node")
def node_group() -> None:
    """The nodes a hub sends jobs to: register, list (with health), change, forget."""


def _node_body(o: dict[str, Any]) -> dict[str, Any]:
    """The node's fields given among the options ``o`` of ``node add``/``node edit``, as the hub API takes them."""
    body: dict[str, Any] = {}
    for option, field in (
        ("url", "url"), ("tunnel_identity", "tunnel_identity"), ("transport", "transport"), ("nbd_host", "nbd_host"),
        ("node_hub_url", "hub_url"), ("tls_pinned", "tls_pinned"),
    ):  # fmt: skip
        if o.get(option) is not None:
            body[field] = o[option]
    if o["node_token_file"] is not None:
        body["token"] = read_token(o["node_token_file"], "--node-token-file")
    return body


_node_token_option = click.option(
    "--node-token-file", type=click.Path(dir_okay=False), help="The node API's bearer token (kept by the hub)."
)
_identity_option = click.option(
    "--tunnel-identity", metavar="SHA256:...", help="The SSH key fingerprint the node's tunnel uses (ssh-keygen -l)."
)
_transport_option = click.option(
    "--transport",
    type=click.Choice(["tunnel", "tls"]),
    help="How the node reaches the NBD exports: tunnel (plaintext through its SSH tunnel; the default) or tls "
    "(nbds:// straight to the hub: the hub needs --nbd-tls-creds, the node its [tls] creds).",
)
_nbd_host_option = click.option(
    "--nbd-host", metavar="HOST", help="The hub's address as this node dials the exports (default: --nbd-advertise)."
)
_tls_pinned_option = click.option(
    "--tls-pinned/--no-tls-pinned",
    default=None,
    help="The node pins the hub's certificate by its fingerprint ([tls] fingerprint), which checks no host name: "
    "the hub then does not check its NBD host against the certificate's names (default: it does).",
)
_hub_url_option = click.option(
    "--hub-url",
    "node_hub_url",  # hub_url is --hub's
    metavar="URL",
    help="The hub API as this node reaches it, sent with its jobs: its [node] hub_url (default: the hub's "
    "--public-url). E.g. http://127.0.0.1:8082 through a tunnel, https://hub.example:8443 for a TLS node.",
)


@node_group.command("add")
@click.argument("name")
@click.option("--url", required=True, help="The node API, e.g. http://10.0.0.5:8081.")
@_node_token_option
@_identity_option
@_transport_option
@_nbd_host_option
@_hub_url_option
@_tls_pinned_option
@hub_options
def node_add(name: str, hub: HubClient, **o: Any) -> None:
    """Register a node under NAME (a policy or backup names it; 'default' takes jobs that name none)."""
    node = hub.call("POST", "/nodes", {"name": name, **_node_body(o)})
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
        where = f"{node['url']}\t{node.get('transport', 'tunnel')}"
        line = f"{node['name']}\t{state}\t{where}\tcontact {contact}\t{node['version'] or '-'}\t{jobs}"
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
@_transport_option
@_nbd_host_option
@click.option("--no-nbd-host", is_flag=True, help="Forget the NBD host (the hub's --nbd-advertise again).")
@_hub_url_option
@click.option("--no-hub-url", is_flag=True, help="Forget the hub URL (the hub's --public-url again).")
@_tls_pinned_option
@hub_options
def node_edit(name: str, hub: HubClient, **o: Any) -> None:
    """Change a node's URL, token, tunnel identity, transport, NBD host, hub URL or certificate pinning (its
    health is kept, unless the URL changes: a new URL may be another node)."""
    body = _node_body(o)
    for flag, field in (
        ("no_node_token", "token"), ("no_tunnel_identity", "tunnel_identity"), ("no_nbd_host", "nbd_host"),
        ("no_hub_url", "hub_url"),
    ):  # fmt: skip
        if o[flag]:
            if field in body:
                raise click.UsageError(f"--{flag.replace('_', '-')} and a new {field} contradict each other")
            body[field] = None
    if not body:
        raise click.UsageError(
            "give what to change: --url, --node-token-file, --tunnel-identity, --transport, --nbd-host, --hub-url, "
            "--tls-pinned, or a --no- option"
        )
    click.echo(json.dumps(hub.call("PATCH", f"/nodes/{quote(name, safe='')}", body), indent=2))


@node_group.command("delete")
@click.argument("name")
@hub_options
def node_delete(name: str, hub: HubClient) -> None:
    """Forget a node (refused while a policy names it)."""
    hub.call("DELETE", f"/nodes/{quote(name, safe='')}")
    click.echo(f"deleted node {name}")
