"""What an export needs besides its socket, as picklable data, so that an export worker process can open it:
the block device (:class:`ImageOpener`: a qcow2 or raw file; :class:`RbdOpener`: an RBD image's head or a
snapshot; :class:`CopyOpener`: an offsite copy read from its bucket) and the client certificate it admits
(:class:`BoundPeer`). Each is a frozen value that is also the callable the export calls (an opener in a
thread, a peer check at each client's export choice), whichever process it runs in.

This module imports only what opening needs, lazily: a worker loads it without the hub's web and
database layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from sendense_nbd.hub.certnames import client_names, names_text
from sendense_nbd.storage.modes import CacheMode, ImageFormat

if TYPE_CHECKING:
    from sendense_nbd.offsite.manifest import Manifest
    from sendense_nbd.policy.offsite import CopyTarget
    from sendense_nbd.storage.base import BlockDevice
    from sendense_nbd.storage.rbd import RbdSpec


@attrs.frozen
class ImageOpener:
    """A local image file (and its backing chain) in format ``fmt``."""

    path: str
    fmt: ImageFormat = ImageFormat.QCOW2
    readonly: bool = False

    def __call__(self) -> BlockDevice:
        """Open it (blocking)."""
        from sendense_nbd.storage import open_image

        return open_image(self.path, self.fmt, readonly=self.readonly)


@attrs.frozen
class RbdOpener:
    """An RBD image or snapshot (``spec``), with librbd's ``cache`` mode."""

    spec: RbdSpec
    readonly: bool = False
    cache: CacheMode = CacheMode.WRITEBACK

    def __call__(self) -> BlockDevice:
        """Open it (blocking: connects to the cluster)."""
        from sendense_nbd.storage.rbd import open_rbd

        return open_rbd(self.spec, readonly=self.readonly, cache=self.cache)


@attrs.frozen
class CopyOpener:
    """An offsite copy read straight from its bucket: ``chain``, its manifests from the full up; the
    target's secret file is read when it opens (in ``secrets``, the hub's secrets directory, when given)."""

    target: CopyTarget
    chain: tuple[Manifest, ...]
    secrets: str | None = None

    def __call__(self) -> BlockDevice:
        """Connect to the bucket and open the copy (blocking)."""
        from sendense_nbd.offsite.remote import open_copy
        from sendense_nbd.offsite.s3 import Bucket

        return open_copy(Bucket.connect(self.target, secrets=self.secrets), list(self.chain))


@attrs.frozen
class BoundPeer:
    """A peer check admitting only client certificates that name ``name``; a refusal says what the export
    ``serves``, whose certificate came, and the ``advice``."""

    name: str
    serves: str
    advice: str

    def __call__(self, export: str, certificate: Mapping[str, Any] | None) -> str | None:
        """Why the client is refused, or None to admit it."""
        names = client_names(certificate)
        if self.name in names:
            return None
        holder = names_text(names)
        return f"export {export!r} {self.serves}, and this client's certificate is for {holder}: {self.advice}"
