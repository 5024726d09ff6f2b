"""``sendense-nbd db upgrade`` and ``db migrate``: the hub's store (docs/DATABASE.md)."""

from __future__ import annotations

import json
import os
import time

import click

from sendense_nbd.errors import SendenseError


@click.group("db")
def db_group() -> None:
    """The hub's store: upgrade its schema, or move it from SQLite to PostgreSQL."""


def _existing(target: str, option: str) -> str:
    """``target`` as :class:`~sendense_nbd.hub.db.Database` takes it; an SQLite file must exist already."""
    from sendense_nbd.hub.db.database import sqlite_path

    if target.startswith(("postgresql://", "postgres://")):
        return target
    try:
        path = sqlite_path(target)
    except SendenseError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
    if not os.path.isfile(path):
        raise click.BadParameter(f"{path}: no such SQLite store (a hub's REPO/hub.db)", param_hint=option)
    return f"sqlite:{path}"


@db_group.command("upgrade")
@click.option("--db", "target", required=True, metavar="URL", help="sqlite:PATH (or a path), or postgresql://...")
def upgrade_command(target: str) -> None:
    """Apply the schema migrations the store lacks (a hub applies them itself when it starts)."""
    from sendense_nbd.hub.db import Database
    from sendense_nbd.hub.db.migrations import MIGRATIONS

    try:
        db = Database(_existing(target, "--db"))
    except SendenseError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        for migration in db.applied:
            click.echo(f"applied {migration.version}: {migration.name}")
        click.echo(f"{db.name}: schema version {MIGRATIONS[-1].version}")
    finally:
        db.close()


@db_group.command("migrate")
@click.option("--from", "source", required=True, metavar="sqlite:PATH", help="The hub's SQLite store (REPO/hub.db).")
@click.option("--to", "target", required=True, metavar="URL", help="An empty PostgreSQL database: postgresql://...")
@click.option("--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
def migrate_command(source: str, target: str, output: str) -> None:
    """Copy every table of a hub's store into an empty PostgreSQL database, in one transaction.

    Stop the hub first. Both stores are brought to this release's schema; the copy refuses a target that
    holds any row, streams each table in bounded batches, and checks every table's row count before it
    commits. Then start the hub with ``--db URL``.
    """
    from sendense_nbd.hub.db import Database
    from sendense_nbd.hub.db.transfer import copy_store

    if not target.startswith(("postgresql://", "postgres://")):
        raise click.BadParameter(
            "db migrate copies into a PostgreSQL database: give postgresql://USER@HOST/DB", param_hint="--to"
        )
    started = time.monotonic()
    try:
        source_db = Database(_existing(source, "--from"))
        try:
            target_db = Database(target)
            try:
                counts = copy_store(source_db, target_db)
            finally:
                target_db.close()
        finally:
            source_db.close()
    except SendenseError as exc:
        raise click.ClickException(str(exc)) from exc
    summary = {"from": source_db.name, "to": target_db.name, "tables": counts, "rows": sum(counts.values())}
    if output == "json":
        click.echo(json.dumps({**summary, "seconds": round(time.monotonic() - started, 3)}))
        return
    width = max(map(len, counts), default=5)
    for table, count in counts.items():
        click.echo(f"{table:<{width}}  {count:>9}")
    click.echo(f"copied {summary['rows']} rows in {len(counts)} tables from {source_db.name} to {target_db.name}")
