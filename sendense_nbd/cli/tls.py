"""``sendense-nbd tls init``: a deployment's TLS certificates in qemu's layout (docs/TLS.md)."""

from __future__ import annotations

import click

from sendense_nbd.errors import SendenseError


@click.group("tls")
def tls_group() -> None:
    """TLS certificates for NBD over TLS (the hub's exports, nodes' direct transport)."""


@tls_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--hub-name",
    "hub_names",
    multiple=True,
    metavar="NAME",
    help="A DNS name clients reach the hub by (repeat). Default, with no --hub-address: localhost.",
)
@click.option(
    "--hub-address",
    "hub_addresses",
    multiple=True,
    metavar="IP",
    help="An IP address clients reach the hub at (repeat). Default, with no --hub-name: 127.0.0.1.",
)
@click.option(
    "--node", "nodes", multiple=True, metavar="NAME", help="Make a client certificate for this node (repeat)."
)
@click.option("--days", type=click.IntRange(min=1), default=825, show_default=True,
              help="Days the hub's and nodes' certificates are valid; the CA 10 years, or this if longer.")  # fmt: skip
def init_command(
    directory: str, hub_names: tuple[str, ...], hub_addresses: tuple[str, ...], nodes: tuple[str, ...], days: int
) -> None:
    """Make a CA, the hub's server certificate and a client certificate per node in DIRECTORY.

    Writes DIRECTORY/ca-cert.pem and ca-key.pem (keep it offline), DIRECTORY/hub/ (give it to
    `serve --tls-creds`) and DIRECTORY/nodes/NAME/ (copy each to its node), in qemu's layout, so
    qemu-nbd, nbdkit and libnbd read them too. Keys are 0600. Never overwrites: refuses when DIRECTORY
    has any of these files.
    """
    from sendense_nbd.tls.pki import init_pki  # late: `cryptography` only for this command

    try:
        layout = init_pki(directory, hub_names=hub_names, hub_addresses=hub_addresses, nodes=nodes, days=days)
    except SendenseError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"CA: {layout.ca_cert} (its key {layout.ca_key} signs new certificates: keep it safe)")
    click.echo(f"hub: {layout.hub}  (sendense-nbd serve --tls require --tls-creds {layout.hub} ...)")
    for name, path in layout.nodes.items():
        click.echo(f"node {name}: {path}  (nbds://HUB/EXPORT?tls-certificates={path})")
