"""The hub's records of offsite copies (table ``offsite_copies``), their uploads (``offsite_uploads``) and
the object versions they made (``offsite_objects``).

A copy's row holds where it was written (``target``: the policy's copy target
when its upload started, as JSON, the secret file's path and never the
secret), so a copy stays readable and deletable in its bucket whatever
becomes of its policy later (edited to another bucket, its target removed,
the policy deleted). Copies recorded before that column have it empty:
such copies follow their policy's target. The tables are made by the store's
migrations (:mod:`sendense_nbd.hub.db.migrations`).

Every object version a copy makes is recorded as soon as S3 made it, until
the copy completes (its manifest names them then): what is left of a copy
that failed (or was deleted while it uploaded) is known, and deleted once
its lock is over.

While a hub uploads a copy, the copy's row names that hub (``uploader``), so
that every hub of a cluster refuses to delete it; the mark of a hub that is
not live counts for nothing (hub/copies.py ``Copies.delete``).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from sendense_nbd.errors import UploadTakenOver
from sendense_nbd.hub.db import Connection, Database, rows
from sendense_nbd.offsite.manifest import Manifest
from sendense_nbd.offsite.upload import Recorded
from sendense_nbd.policy.offsite import CopyTarget

PENDING, COMPLETED, FAILED, DELETED = "pending", "completed", "failed", "deleted"


@attrs.frozen
class CopyRecord:
    """One copy of a point to one policy's target, as the hub records it."""

    id: str
    policy: str
    point_id: str
    vm_path: str
    disk_key: int
    chain_id: str | None
    state: str
    error: str | None
    created: float
    completed: float | None
    manifest: Manifest | None
    manifest_version: str | None
    #: Set on a chain's newest copy when no copy will join its chain any more.
    sealed: bool
    #: Where the copy is (being) written: set when its upload starts (None: not started, or an older row).
    target: CopyTarget | None = None
    #: Until when Object Lock holds the copy's objects (its chain's newest copy's date + retain + margin);
    #: computed for listings, not stored.
    locked_until: float | None = None
    #: The hub uploading it, as its row says (a hub no longer live may have left its mark: it counts for
    #: nothing then); shown in listings, written only by the upload (hub/copies.py).
    uploader: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CopyRecord:
        """From its row (the manifest and the target as their JSON)."""
        text, target = row.pop("manifest"), row.pop("target", None)
        row.pop("seq", None)  # the order of insertion, not part of the record
        manifest = None if text is None else Manifest.decode(text.encode(), f"copy {row['id']}")
        placed = None if target is None else CopyTarget.from_json(json.loads(target), f"copy {row['id']} target")
        return cls(**{**row, "manifest": manifest, "sealed": bool(row["sealed"]), "target": placed})

    def row(self) -> dict[str, object]:
        """Its row's values by column."""
        found = {**attrs.asdict(self, recurse=False), "sealed": int(self.sealed)}
        found.pop("locked_until")
        found.pop("uploader")
        found["manifest"] = None if self.manifest is None else self.manifest.encode().decode()
        found["target"] = None if self.target is None else json.dumps(self.target.to_json())
        return found

    def to_json(self) -> dict[str, object]:
        """The copy as ``GET /copies`` shows it."""
        found = self.manifest
        return {
            **attrs.asdict(self, recurse=False),
            "manifest": None if found is None else found.to_json(),
            "kind": None if found is None else found.kind,
            "target": None if self.target is None else self.target.to_json(),
        }


@attrs.frozen
class LeftObject:
    """An object version a copy made that no manifest names (yet): its copy, key, version, lock's end."""

    copy_id: str
    key: str
    version: str
    until: float


class UploadJournal:
    """One copy's uploads to one bucket of one endpoint recorded in the hub's store (blocking calls, from
    upload threads); the ``bucket`` column holds ``<endpoint> <bucket>``.

    Uploaded by hub ``uploader``: a new upload or a part is recorded only while the copy's row marks that hub
    (or none), else :class:`UploadTakenOver`; a version S3 made is recorded whoever marks the row."""

    def __init__(self, db: Database, target: CopyTarget, copy_id: str, uploader: str) -> None:
        self.db = db
        self.bucket = f"{target.endpoint} {target.bucket}"
        self.copy_id = copy_id
        self.uploader = uploader

    def _still_mine(self, connection: Connection) -> None:
        found = connection.execute("SELECT uploader FROM offsite_copies WHERE id = ?", (self.copy_id,)).fetchone()
        if found is not None and found[0] not in (None, self.uploader):
            raise UploadTakenOver(
                f"offsite copy {self.copy_id}: hub {found[0]} took its upload over (this hub, {self.uploader}, was "
                "lost meanwhile): this hub stops uploading it"
            )

    def recorded(self, key: str) -> Recorded | None:
        """The upload of ``key`` recorded so far."""
        found = self.db.call(
            lambda c: rows(c.execute("SELECT * FROM offsite_uploads WHERE bucket = ? AND key = ?", (self.bucket, key)))
        )
        if not found:
            return None
        parts = {int(n): (size, md5) for n, (size, md5) in json.loads(found[0]["parts"]).items()}
        return Recorded(found[0]["upload"], found[0]["part_size"], parts)

    def begun(self, key: str, upload: str, part_size: int) -> None:
        """A new upload of ``key``."""

        def add(connection: Connection) -> None:
            self._still_mine(connection)
            connection.execute(
                "INSERT INTO offsite_uploads (bucket, key, upload, part_size, parts, copy_id) "
                "VALUES (?, ?, ?, ?, '{}', ?) ON CONFLICT (bucket, key) DO UPDATE SET upload = excluded.upload, "
                "part_size = excluded.part_size, parts = excluded.parts, copy_id = excluded.copy_id",
                (self.bucket, key, upload, part_size, self.copy_id),
            )

        self.db.call(add)

    def part(self, key: str, number: int, size: int, md5: str) -> None:
        """S3 has part ``number``."""

        def add(connection: Connection) -> None:
            self._still_mine(connection)
            where = (self.bucket, key)
            found = connection.execute("SELECT parts FROM offsite_uploads WHERE bucket = ? AND key = ?", where)
            parts = json.loads(found.fetchone()[0])
            parts[str(number)] = [size, md5]
            connection.execute(
                "UPDATE offsite_uploads SET parts = ? WHERE bucket = ? AND key = ?", (json.dumps(parts), *where)
            )

        self.db.call(add)

    def finished(self, key: str) -> None:
        """Forget the upload of ``key``."""
        self.db.call(
            lambda c: c.execute("DELETE FROM offsite_uploads WHERE bucket = ? AND key = ?", (self.bucket, key))
        )

    def made(self, key: str, version: str, until: float) -> None:
        """S3 made a version of ``key`` for this copy."""
        self.db.call(
            lambda c: c.execute(
                "INSERT INTO offsite_objects (copy_id, key, version, until) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (copy_id, key, version) DO UPDATE SET until = excluded.until",
                (self.copy_id, key, version, until),
            )
        )

    def version(self, key: str) -> str | None:
        """The newest version of ``key`` this copy made."""
        found = self.db.call(
            lambda c: c.execute(
                "SELECT version FROM offsite_objects WHERE copy_id = ? AND key = ? ORDER BY seq DESC LIMIT 1",
                (self.copy_id, key),
            ).fetchone()
        )
        return None if found is None else str(found[0])


def uploads_of(connection: Connection, copy_id: str) -> list[tuple[str, str]]:
    """The uploads a copy left open: ``(key, upload ID)``."""
    found = connection.execute("SELECT key, upload FROM offsite_uploads WHERE copy_id = ?", (copy_id,))
    return [(key, upload) for key, upload in found]


def left_objects(connection: Connection, policy: str, vm_path: str, disk_key: int) -> list[LeftObject]:
    """The object versions made by a disk's copies in a policy that ended without completing."""
    found = connection.execute(
        "SELECT o.copy_id, o.key, o.version, o.until FROM offsite_objects o JOIN offsite_copies c ON c.id = o.copy_id "
        "WHERE c.policy = ? AND c.vm_path = ? AND c.disk_key = ? AND c.state IN (?, ?) ORDER BY o.until",
        (policy, vm_path, disk_key, FAILED, DELETED),
    )
    return [LeftObject(*row) for row in found]
