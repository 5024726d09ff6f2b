"""What a copy is in the bucket: its objects, their keys, and the manifest that describes them.

Layout under the target's prefix (one folder per chain, so a chain
downloads into one directory and its overlays find their backing files)::

    PREFIX<vm-folder>/<disk-key>/<chain-id>/<point-id>.qcow2     the point's image
    PREFIX<vm-folder>/<disk-key>/<chain-id>/<point-id>.digests   its chunk digests (copy.digests' sidecar)
    PREFIX<vm-folder>/<disk-key>/<chain-id>/<point-id>.json      the manifest: written last, so a copy
                                                                  without one never finished

The manifest is JSON (:data:`FORMAT`): the VM, disk and point, the chain
(point IDs from its full up to this one), the image (key, version, size,
sha256 of the file, its backing file's name) and the digests object.
Every version ID is recorded: deleting a version is what Object Lock
refuses (a delete without one only adds a delete marker).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import attrs

from sendense_nbd import fields
from sendense_nbd.errors import BadRequest, OffsiteError

FORMAT = "sendense-offsite-copy/1"


def vm_folder(vm_path: str) -> str:
    """A key component for a VM: readable, and unique through a short hash."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", vm_path.strip("/"))[:80] or "vm"
    return f"{readable}-{hashlib.sha256(vm_path.encode()).hexdigest()[:8]}"


def chain_folder(prefix: str, vm_path: str, disk_key: int, chain_id: str) -> str:
    """The key prefix of one chain's objects (ends with ``/``)."""
    return f"{prefix}{vm_folder(vm_path)}/{disk_key}/{chain_id}/"


@attrs.frozen
class StoredObject:
    """One object version in the bucket: its key, version ID, length and the sha256 of its bytes."""

    key: str
    version: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, data: Any, name: str) -> StoredObject:
        """From ``{"key", "version", "size", "sha256"}``."""
        body = fields.json_object(data, name, frozenset({"key", "version", "size", "sha256"}))
        digest = fields.text(body.get("sha256"), f"{name}.sha256", limit=64)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BadRequest(f"{name}.sha256 is not a sha256 hex digest")
        return cls(
            fields.text(body.get("key"), f"{name}.key", limit=1024),
            fields.text(body.get("version"), f"{name}.version", limit=1024),
            fields.integer(body.get("size"), f"{name}.size", 0, 1 << 62),
            digest,
        )

    @property
    def file_name(self) -> str:
        """The object's name in its chain's folder (what a download calls the file)."""
        return self.key.rsplit("/", 1)[-1]


@attrs.frozen
class Manifest:
    """One copy: a point's image in a chain, with what proves it (module docstring)."""

    copy_id: str
    vm_path: str
    disk_key: int
    point_id: str
    #: When the point completed (epoch seconds).
    point_time: float
    #: The disk's virtual size.
    size: int
    chain_id: str
    #: Point IDs from the chain's full up to this one.
    chain: tuple[str, ...]
    image: StoredObject
    #: The backing file's name (the base copy's ``<point-id>.qcow2``), None for the chain's full.
    backing: str | None
    digests: StoredObject | None
    #: When the copy was made (epoch seconds).
    created: float

    @property
    def kind(self) -> str:
        """``full`` or ``incremental``."""
        return "full" if self.backing is None else "incremental"

    @property
    def key(self) -> str:
        """The manifest's own key (next to the image)."""
        return self.image.key.removesuffix(".qcow2") + ".json"

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON."""
        body = attrs.asdict(self)
        return {"format": FORMAT, **body, "chain": list(self.chain), "kind": self.kind}

    def encode(self) -> bytes:
        """The manifest object's bytes."""
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, name: str) -> Manifest:
        """A manifest object read back; :class:`OffsiteError` naming ``name`` when it is not one."""
        try:
            body = fields.json_object(json.loads(data), name)
            if body.get("format") != FORMAT:
                raise BadRequest(f"format is {str(body.get('format'))[:40]!r}, not {FORMAT}")
            chain = tuple(
                fields.text(p, "chain[]", limit=128) for p in fields.json_list(body.get("chain"), "chain", 10_000)
            )
            digests = body.get("digests")
            return cls(
                copy_id=fields.text(body.get("copy_id"), "copy_id", limit=128),
                vm_path=fields.vm_path(body.get("vm_path")),
                disk_key=fields.integer(body.get("disk_key"), "disk_key", 0, fields.MAX_DISK_KEY),
                point_id=fields.text(body.get("point_id"), "point_id", limit=128),
                point_time=_number(body.get("point_time"), "point_time"),
                size=fields.integer(body.get("size"), "size", 0, 1 << 62),
                chain_id=fields.text(body.get("chain_id"), "chain_id", limit=128),
                chain=chain,
                image=StoredObject.from_json(body.get("image"), "image"),
                backing=None if body.get("backing") is None else fields.text(body["backing"], "backing", limit=256),
                digests=None if digests is None else StoredObject.from_json(digests, "digests"),
                created=_number(body.get("created"), "created"),
            )
        except (ValueError, BadRequest) as exc:
            raise OffsiteError(f"{name} is not a copy manifest: {exc}") from exc


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number")
    return float(value)
