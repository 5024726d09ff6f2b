"""Click commands of the tunnel, for ``sendense-backup tunnel`` and ``sendense-nbd tunnel-server``.

They are registered by the CLI groups (``cli.add_command(tunnel_command)``);
the hub reuses :func:`ssh_server_options` and :func:`server_config_from_options`
to start the embedded server next to its API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sendense_nbd.errors import TunnelError
from sendense_nbd.tcp import DEFAULT_CONGESTION, DEFAULT_LINK, LinkProfile
from sendense_nbd.tunnel.config import (
    DEFAULT_CONNECTIONS,
    DEFAULT_LOGIN_TIMEOUT,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_STARTUPS,
    DEFAULT_NODE_API,
    MAX_WINDOW,
    Forward,
    LinkTuning,
    parse_host_port,
    parse_ports,
)

if TYPE_CHECKING:
    from sendense_nbd.tunnel.server import TunnelServerConfig

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES = """\b
Exit status:
  0    stopped by SIGINT or SIGTERM
  1    the tunnel failed for good (host key not verifiable, login refused, bad key file)
  2    bad usage
"""


def _parse(parse: Callable[[str], Any], value: str, hint: str) -> Any:
    try:
        return parse(value)
    except TunnelError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from exc


async def _until_signal(stop: Callable[[], None], done: Callable[[], Any]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await done()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def link_options(prefix: str = "") -> Callable[[F], F]:
    """``--{prefix}link-rtt``, ``--{prefix}link-rate``, ``--{prefix}window``, ``--{prefix}congestion``."""
    dest = prefix.replace("-", "_")
    options = [
        click.option(
            f"--{prefix}link-rtt",
            f"{dest}link_rtt",
            type=click.FloatRange(min=0.1, max=10_000),
            default=DEFAULT_LINK.rtt * 1000,
            show_default=True,
            metavar="MS",
            help="Round-trip time the tunnel's windows and socket buffers must fill (milliseconds).",
        ),
        click.option(
            f"--{prefix}link-rate",
            f"{dest}link_rate",
            type=click.FloatRange(min=0.1, max=1_000_000),
            default=DEFAULT_LINK.rate_bps / 1e6,
            show_default=True,
            metavar="MBIT",
            help="Link rate to fill (Mbit/s); window = 2 x rate x RTT per channel (see docs/TUNNEL.md).",
        ),
        click.option(
            f"--{prefix}window",
            f"{dest}window",
            type=click.IntRange(min=32 * 1024, max=MAX_WINDOW),
            metavar="BYTES",
            help=f"Each channel's SSH window, overriding the one from --{prefix}link-rtt/--{prefix}link-rate.",
        ),
        click.option(
            f"--{prefix}congestion",
            f"{dest}congestion",
            default=DEFAULT_CONGESTION,
            show_default=True,
            metavar="NAME|system",
            help="TCP congestion control of the SSH connection ('system': the kernel's default).",
        ),
    ]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def tuning_from_options(o: dict[str, Any], prefix: str = "") -> LinkTuning:
    """The :class:`LinkTuning` of the options of :func:`link_options`."""
    dest = prefix.replace("-", "_")
    rtt = o.get(f"{dest}link_rtt") or DEFAULT_LINK.rtt * 1000
    rate = o.get(f"{dest}link_rate") or DEFAULT_LINK.rate_bps / 1e6
    congestion = o.get(f"{dest}congestion") or DEFAULT_CONGESTION
    try:
        link = LinkProfile.parse(rtt_ms=rtt, rate_mbit=rate)
        return LinkTuning.for_link(link, window=o.get(f"{dest}window"), congestion=congestion)
    except (TunnelError, ValueError) as exc:  # the message names the options without their prefix
        raise click.UsageError(str(exc).replace("--", f"--{prefix}")) from exc


# -- node side -------------------------------------------------------------------


@click.command("tunnel", epilog=EXIT_CODES)
@click.option("--hub", required=True, help="The hub's SSH endpoint, HOST:PORT (embedded server or sshd).")
@click.option(
    "--key", "keys", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False), help="Client key."
)
@click.option(
    "--known-hosts",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="known_hosts file pinning the hub's host key ([HOST]:PORT KEY).",
)
@click.option("--user", default="sendense", show_default=True, help="SSH user name.")
@click.option("--ports", default="10100-10200", show_default=True, help="NBD ports to forward, FIRST-LAST.")
@click.option("--listen-host", default="127.0.0.1", show_default=True, help="Local address of the forwarded ports.")
@click.option("--dest-host", default="127.0.0.1", show_default=True, help="Where the hub connects them.")
@click.option(
    "--connections",
    type=click.IntRange(1, 64),
    default=DEFAULT_CONNECTIONS,
    show_default=True,
    help="SSH connections; every port's connections are spread over those that are up.",
)
@click.option(
    "--remote-forward",
    "remote_forwards",
    multiple=True,
    metavar="HUB_HOST:PORT=NODE_HOST:PORT",
    help="Reverse forward (repeatable); default 127.0.0.1:8081=127.0.0.1:8081 (the node API); 'none' for none.",
)
@click.option(
    "--forward",
    "forwards",
    multiple=True,
    metavar="NODE_HOST:PORT=HUB_HOST:PORT",
    help="Another local forward (repeatable), e.g. the hub API: 127.0.0.1:8082=127.0.0.1:8082.",
)
@click.option("--cipher", "ciphers", multiple=True, help="Preferred cipher, e.g. aes128-gcm@openssh.com (repeatable).")
@click.option("--keepalive", type=click.FloatRange(1), default=15, show_default=True, help="Seconds between probes.")
@click.option("--keepalive-count", type=click.IntRange(1), default=3, show_default=True, help="Missed probes.")
@click.option("--backoff-max", type=click.FloatRange(1), default=30, show_default=True, help="Reconnect delay cap.")
@link_options()
def tunnel_command(**o: Any) -> None:
    """Forward the hub's NBD ports to this node (and the node API back to the hub) over SSH."""
    from sendense_nbd.tunnel.client import Tunnel, TunnelConfig, port_forwards

    host, port = _parse(parse_host_port, o["hub"], "--hub")
    ports = _parse(parse_ports, o["ports"], "--ports")
    if o["remote_forwards"] == ("none",):
        remote: list[Forward] = []
    elif o["remote_forwards"]:
        remote = [_parse(Forward.parse, text, "--remote-forward") for text in o["remote_forwards"]]
    else:
        remote = [Forward(*DEFAULT_NODE_API, *DEFAULT_NODE_API)]
    try:
        config = TunnelConfig(
            host=host,
            port=port,
            client_keys=o["keys"],
            known_hosts=o["known_hosts"],
            username=o["user"],
            local_forwards=[
                *port_forwards(ports, listen_host=o["listen_host"], dest_host=o["dest_host"]),
                *(_parse(Forward.parse, text, "--forward") for text in o["forwards"]),
            ],
            remote_forwards=remote,
            connections=o["connections"],
            ciphers=o["ciphers"],
            keepalive_interval=o["keepalive"],
            keepalive_count_max=o["keepalive_count"],
            backoff_max=o["backoff_max"],
            tuning=tuning_from_options(o),
        )
    except (TunnelError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc

    async def run() -> None:
        tunnel = Tunnel(config)
        await tunnel.start()

        async def report_when_up() -> None:
            await tunnel.wait_connected()
            status = tunnel.status()
            click.echo(json.dumps({"connected": status.connected, "links": len(status.links), "ports": len(ports)}))

        up = asyncio.get_running_loop().create_task(report_when_up())
        try:
            await _until_signal(tunnel.close, tunnel.wait_closed)
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)

    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    try:
        asyncio.run(run())
    except TunnelError as exc:
        raise click.ClickException(str(exc)) from exc


# -- hub side --------------------------------------------------------------------


def ssh_server_options(command: F) -> F:
    """Add ``--ssh-listen``, ``--ssh-host-key``, ``--ssh-authorized-keys`` (...) and :func:`link_options` ``ssh-``."""
    options = [
        click.option(
            "--ssh-listen", metavar="HOST:PORT", help="Run the embedded SSH tunnel endpoint here (default: none)."
        ),
        click.option(
            "--ssh-host-key",
            "ssh_host_keys",
            multiple=True,
            type=click.Path(exists=True, dir_okay=False),
            help="SSH host key (repeatable); nodes pin it in their known_hosts.",
        ),
        click.option(
            "--ssh-authorized-keys",
            type=click.Path(exists=True, dir_okay=False),
            help="authorized_keys of the nodes (re-read at every login).",
        ),
        click.option(
            "--ssh-node-api",
            "ssh_node_api",
            multiple=True,
            metavar="HOST:PORT",
            help="Address nodes may reverse-forward (repeatable) [default 127.0.0.1:8081].",
        ),
        click.option(
            "--ssh-max-startups",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_STARTUPS,
            show_default=True,
            help="Connections that may be logging in at once; more are dropped (OpenSSH's MaxStartups).",
        ),
        click.option(
            "--ssh-login-timeout",
            type=click.FloatRange(min=1),
            default=DEFAULT_LOGIN_TIMEOUT,
            show_default=True,
            help="Seconds a connection may take to log in.",
        ),
        click.option(
            "--ssh-max-channels",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_CHANNELS,
            show_default=True,
            help="Forwarded connections one SSH connection may have open; more are refused (each may hold a window).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return link_options("ssh-")(command)


def server_config_from_options(
    o: dict[str, Any], *, ports: Sequence[int], dest_host: str = "127.0.0.1"
) -> TunnelServerConfig | None:
    """The :class:`TunnelServerConfig` of ``o`` (the options above), or None without ``--ssh-listen``."""
    from sendense_nbd.tunnel.server import TunnelServerConfig

    if not o.get("ssh_listen"):
        return None
    host, port = _parse(lambda v: parse_host_port(v, any_port=True), o["ssh_listen"], "--ssh-listen")
    if not o.get("ssh_host_keys") or not o.get("ssh_authorized_keys"):
        raise click.UsageError("--ssh-listen needs --ssh-host-key and --ssh-authorized-keys")
    node_api = [_parse(parse_host_port, text, "--ssh-node-api") for text in o.get("ssh_node_api") or ()]
    return TunnelServerConfig(
        host_keys=o["ssh_host_keys"],
        authorized_keys=o["ssh_authorized_keys"],
        host=host,
        port=port,
        dest_host=dest_host,
        ports=frozenset(ports),
        remote_listens=frozenset(node_api or [DEFAULT_NODE_API]),
        max_startups=o.get("ssh_max_startups") or DEFAULT_MAX_STARTUPS,
        login_timeout=o.get("ssh_login_timeout") or DEFAULT_LOGIN_TIMEOUT,
        max_channels=o.get("ssh_max_channels") or DEFAULT_MAX_CHANNELS,
        tuning=tuning_from_options(o, "ssh-"),
    )


@click.command("tunnel-server", epilog=EXIT_CODES)
@ssh_server_options
@click.option("--nbd-ports", default="10100-10200", show_default=True, help="NBD ports nodes may reach, FIRST-LAST.")
@click.option("--nbd-host", default="127.0.0.1", show_default=True, help="Host the NBD ports are on.")
def tunnel_server_command(**o: Any) -> None:
    """Run the SSH tunnel endpoint alone (forwards only; prints its port when listening)."""
    from sendense_nbd.tunnel.server import TunnelServer

    if not o["ssh_listen"]:
        raise click.UsageError("give --ssh-listen HOST:PORT")
    ports = _parse(parse_ports, o["nbd_ports"], "--nbd-ports")
    config = server_config_from_options(o, ports=ports, dest_host=o["nbd_host"])
    assert config is not None

    async def run() -> None:
        server = TunnelServer(config)
        await server.start()
        click.echo(server.port)
        sys.stdout.flush()
        stopped = asyncio.Event()
        await _until_signal(stopped.set, stopped.wait)
        server.close()
        await server.wait_closed()

    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    try:
        asyncio.run(run())
    except TunnelError as exc:
        raise click.ClickException(str(exc)) from exc
