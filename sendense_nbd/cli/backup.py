"""``sendense-backup``: the VMware-side backup client.

Its commands (``migrate``, ``node``, ``tunnel``) arrive with the VMware
client, node and tunnel work; today it only reports its version.
"""

from __future__ import annotations

import click

from sendense_nbd import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
def cli() -> None:
    """Back up VMware VMs into a sendense hub over NBD."""


def main() -> None:
    cli(prog_name="sendense-backup")
