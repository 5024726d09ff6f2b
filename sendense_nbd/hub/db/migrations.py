"""The store's schema as an ordered list of migrations, and applying the ones a store lacks.

A store records the migrations it has in ``schema_version``. Opening a store applies the missing ones in
order, inside one writer transaction (so two hubs opening one store at once apply each migration once).
A store made before migrations existed (an SQLite ``hub.db`` with today's tables and some of their later
columns) is first brought to the first migration's schema (:meth:`Backend.adopt`), then marked as having
it. **Schema changes are made only by appending a** :class:`Migration`: never edit a released one.

Each migration has its text for SQLite and for PostgreSQL (:func:`postgresql` derives the second from the
first where only the types differ: ``REAL`` is ``double precision``, ``INTEGER`` is ``bigint``; booleans
are integers in both).
"""

from __future__ import annotations

import re
import time

import attrs

from sendense_nbd.errors import StoreError
from sendense_nbd.hub.db.core import Backend, Connection


@attrs.frozen
class Migration:
    """One schema change: its number (1, 2, ...), a short name, and its statements per dialect."""

    version: int
    name: str
    sqlite: str
    postgresql: str

    def text(self, dialect: str) -> str:
        """The statements for ``dialect``."""
        return self.sqlite if dialect == "sqlite" else self.postgresql


def postgresql(text: str) -> str:
    """SQLite DDL in PostgreSQL's types: ``REAL`` -> ``double precision``, ``INTEGER`` -> ``bigint``."""
    return re.sub(r"\bINTEGER\b", "bigint", re.sub(r"\bREAL\b", "double precision", text))


#: The schema of the last release before migrations: every table with its later columns, every index.
BASELINE = """
CREATE TABLE IF NOT EXISTS leases (
    port INTEGER PRIMARY KEY, holder TEXT NOT NULL, job_id TEXT NOT NULL, disk_key INTEGER,
    purpose TEXT NOT NULL, since REAL NOT NULL, expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, vm_path TEXT NOT NULL, mode TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, deadline REAL NOT NULL, detail TEXT NOT NULL, progress TEXT,
    error TEXT, node TEXT, policy TEXT, full_reason TEXT, stages TEXT, bytes_changed INTEGER, bytes_sent INTEGER,
    expected_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_vm ON jobs (vm_path, created);
CREATE TABLE IF NOT EXISTS points (
    id TEXT PRIMARY KEY, vm_path TEXT NOT NULL, disk_key INTEGER NOT NULL, job_id TEXT NOT NULL, kind TEXT NOT NULL,
    path TEXT NOT NULL, backing TEXT, size INTEGER NOT NULL, change_id TEXT, disk_uuid TEXT, status TEXT NOT NULL,
    created REAL NOT NULL, completed REAL, bytes_changed INTEGER, bytes_transferred INTEGER, verify_state TEXT,
    verified_at REAL, bad_offset INTEGER, verify_error TEXT, digests TEXT
);
CREATE INDEX IF NOT EXISTS points_disk ON points (vm_path, disk_key, created);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, url TEXT NOT NULL, token TEXT, tunnel_identity TEXT, configured TEXT NOT NULL,
    added REAL NOT NULL, last_contact REAL, last_check REAL, up INTEGER, version TEXT, running_jobs INTEGER,
    queued_jobs INTEGER, max_jobs INTEGER, last_error TEXT, transport TEXT NOT NULL DEFAULT 'tunnel',
    nbd_host TEXT, hub_url TEXT, tls_pinned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, key TEXT, subject TEXT NOT NULL, message TEXT NOT NULL,
    detail TEXT NOT NULL, fired REAL NOT NULL, cleared REAL, delivered TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_condition ON alerts (kind, key, cleared);
CREATE TABLE IF NOT EXISTS policies (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS schedule_state (
    policy TEXT NOT NULL, purpose TEXT NOT NULL, last_slot REAL NOT NULL, next_run REAL, last_run REAL, note TEXT,
    PRIMARY KEY (policy, purpose)
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, policy TEXT NOT NULL, purpose TEXT NOT NULL, slot REAL, started REAL NOT NULL,
    window_end REAL, ended REAL, state TEXT NOT NULL, note TEXT
);
CREATE INDEX IF NOT EXISTS runs_policy ON runs (policy, started);
CREATE TABLE IF NOT EXISTS run_items (
    run_id TEXT NOT NULL, vm_path TEXT NOT NULL, state TEXT NOT NULL, job_id TEXT, note TEXT,
    PRIMARY KEY (run_id, vm_path)
);
CREATE TABLE IF NOT EXISTS job_samples (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, t REAL NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS space_samples (
    t REAL NOT NULL, total INTEGER NOT NULL, used INTEGER NOT NULL, free INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS space_samples_time ON space_samples (t);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_kind ON jobs (kind, created);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created);
CREATE INDEX IF NOT EXISTS jobs_policy ON jobs (policy, created);
CREATE INDEX IF NOT EXISTS jobs_node ON jobs (node, created);
CREATE TABLE IF NOT EXISTS offsite_copies (
    id TEXT PRIMARY KEY, policy TEXT NOT NULL, point_id TEXT NOT NULL, vm_path TEXT NOT NULL,
    disk_key INTEGER NOT NULL, chain_id TEXT, state TEXT NOT NULL, error TEXT, created REAL NOT NULL,
    completed REAL, manifest TEXT, manifest_version TEXT, sealed INTEGER NOT NULL DEFAULT 0, target TEXT
);
CREATE INDEX IF NOT EXISTS offsite_copies_disk ON offsite_copies (policy, vm_path, disk_key, created);
CREATE TABLE IF NOT EXISTS offsite_uploads (
    bucket TEXT NOT NULL, key TEXT NOT NULL, upload TEXT NOT NULL, part_size INTEGER NOT NULL,
    parts TEXT NOT NULL, copy_id TEXT, PRIMARY KEY (bucket, key)
);
CREATE TABLE IF NOT EXISTS offsite_objects (
    copy_id TEXT NOT NULL, key TEXT NOT NULL, version TEXT NOT NULL, until REAL NOT NULL,
    PRIMARY KEY (copy_id, key, version)
);
"""

#: The tables ordered by insertion (ties of their time column, "the newest"), and the indexes that order uses.
_ORDERED = ("jobs", "points", "alerts", "space_samples", "offsite_copies", "offsite_objects")
_REINDEXED = """
DROP INDEX jobs_vm;
CREATE INDEX jobs_vm ON jobs (vm_path, created, seq);
DROP INDEX jobs_created;
CREATE INDEX jobs_created ON jobs (created, seq);
DROP INDEX jobs_kind;
CREATE INDEX jobs_kind ON jobs (kind, created, seq);
DROP INDEX jobs_state;
CREATE INDEX jobs_state ON jobs (state, created, seq);
DROP INDEX jobs_policy;
CREATE INDEX jobs_policy ON jobs (policy, created, seq);
DROP INDEX jobs_node;
CREATE INDEX jobs_node ON jobs (node, created, seq);
DROP INDEX points_disk;
CREATE INDEX points_disk ON points (vm_path, disk_key, created, seq);
CREATE INDEX alerts_seq ON alerts (seq);
CREATE INDEX alerts_fired ON alerts (fired, seq);
DROP INDEX space_samples_time;
CREATE INDEX space_samples_time ON space_samples (t, seq);
CREATE INDEX offsite_copies_seq ON offsite_copies (created, seq);
"""


def _sqlite_sequence(table: str) -> str:
    """SQLite: ``seq`` is the row's rowid (as the order was before), set by a trigger on insert."""
    return (
        f"ALTER TABLE {table} ADD COLUMN seq INTEGER;\n"
        f"UPDATE {table} SET seq = rowid;\n"
        f"CREATE TRIGGER {table}_seq AFTER INSERT ON {table} WHEN NEW.seq IS NULL BEGIN\n"
        f"    UPDATE {table} SET seq = NEW.rowid WHERE rowid = NEW.rowid;\n"
        "END;\n"
    )


#: Several hubs on one store (hub/cluster.py): the hubs, each job's hub, each run's owner and each of its VMs'
#: hub, and leases keyed by hub and port (each hub's pool is on its own address). Leases live only while their
#: hub runs (a starting hub releases its predecessor's), so the old table is dropped, not converted.
CLUSTER = """
CREATE TABLE hubs (
    id TEXT PRIMARY KEY, api_url TEXT NOT NULL, nbd_host TEXT NOT NULL, port_first INTEGER NOT NULL,
    port_last INTEGER NOT NULL, store TEXT NOT NULL, repository TEXT, started REAL NOT NULL, heartbeat REAL NOT NULL,
    state TEXT NOT NULL, taken_by TEXT, taken_at REAL
);
ALTER TABLE jobs ADD COLUMN hub TEXT;
CREATE INDEX jobs_hub ON jobs (hub, state);
ALTER TABLE runs ADD COLUMN owner TEXT;
ALTER TABLE run_items ADD COLUMN hub TEXT;
DROP TABLE leases;
CREATE TABLE leases (
    hub TEXT NOT NULL, port INTEGER NOT NULL, holder TEXT NOT NULL, job_id TEXT NOT NULL, disk_key INTEGER,
    purpose TEXT NOT NULL, since REAL NOT NULL, expires REAL NOT NULL, PRIMARY KEY (hub, port)
);
"""

#: Cluster-wide locks (hub/cluster.py ``Cluster.lock``): the hub holding each, since when.
LOCKS = """
CREATE TABLE locks (name TEXT PRIMARY KEY, hub TEXT NOT NULL, since REAL NOT NULL);
"""

#: The hub uploading each offsite copy now (hub/copies.py): a delete through any hub of the cluster refuses a copy
#: that a live hub uploads; the mark of a hub that is not live counts for nothing (it lapses as its locks do).
UPLOADER = """
ALTER TABLE offsite_copies ADD COLUMN uploader TEXT;
"""

#: Each hub row's process token (a hub ID two processes use is refused, or stops the one it was taken from) and
#: its clock's skew from the PostgreSQL server's as its last heartbeat measured it (NULL on SQLite).
HUB_TOKEN = """
ALTER TABLE hubs ADD COLUMN token TEXT;
ALTER TABLE hubs ADD COLUMN clock_skew REAL;
"""

#: Every schema change, in order. Append only.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "baseline", BASELINE, postgresql(BASELINE)),
    Migration(
        2,
        "ordering column seq (for the order of insertion SQLite's rowid gave)",
        "".join(_sqlite_sequence(table) for table in _ORDERED) + _REINDEXED,
        "".join(f"ALTER TABLE {t} ADD COLUMN seq bigint GENERATED BY DEFAULT AS IDENTITY;\n" for t in _ORDERED)
        + _REINDEXED,
    ),
    Migration(
        3,
        "several hubs: hubs, jobs.hub, runs.owner, run_items.hub, leases by hub and port",
        CLUSTER,
        postgresql(CLUSTER),
    ),
    Migration(
        4,
        "ordering column seq on runs (a policy's runs started at one moment)",
        _sqlite_sequence("runs")
        + "DROP INDEX runs_policy;\nCREATE INDEX runs_policy ON runs (policy, started, seq);\n",
        "ALTER TABLE runs ADD COLUMN seq bigint GENERATED BY DEFAULT AS IDENTITY;\n"
        "DROP INDEX runs_policy;\nCREATE INDEX runs_policy ON runs (policy, started, seq);\n",
    ),
    Migration(5, "cluster-wide locks: backup admission, a disk's chain", LOCKS, postgresql(LOCKS)),
    Migration(6, "offsite_copies.uploader: the hub uploading a copy now", UPLOADER, UPLOADER),
    Migration(7, "hubs.token (the process of a hub ID), hubs.clock_skew", HUB_TOKEN, postgresql(HUB_TOKEN)),
)

SCHEMA_VERSION = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL
)"""


def current(connection: Connection) -> int:
    """The newest migration the store has (0: none)."""
    found = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    return 0 if found is None else int(found)


def upgrade(connection: Connection, backend: Backend) -> list[Migration]:
    """Apply the migrations the store lacks (in the caller's writer transaction); those applied."""
    tables = backend.tables(connection)
    if "schema_version" not in tables:
        if tables and backend.dialect != "sqlite":
            raise StoreError(f"{backend.name} holds tables but no schema_version: not a sendense-nbd hub store")
        if tables:
            backend.adopt(connection)
        connection.execute(SCHEMA_VERSION if backend.dialect == "sqlite" else postgresql(SCHEMA_VERSION))
    have = {int(row[0]) for row in connection.execute("SELECT version FROM schema_version")}
    newest = MIGRATIONS[-1].version
    if have and max(have) > newest:
        raise StoreError(
            f"{backend.name} is at schema version {max(have)}, newer than this sendense-nbd knows ({newest}): "
            "run the newer release"
        )
    applied = []
    for migration in MIGRATIONS:
        if migration.version in have:
            continue
        backend.script(connection, migration.text(backend.dialect))
        connection.execute(
            "INSERT INTO schema_version (version, name, applied) VALUES (?, ?, ?)",
            (migration.version, migration.name, time.time()),
        )
        applied.append(migration)
    return applied
