"""Storage: the block-device contract, its checking adapter, filters and backends.

A device is opened with ``open_image`` or ``memory_device`` (a backend behind
the checking adapter); the backend classes stay in their modules
(``storage.raw``, ``storage.memory``, ``storage.qcow2``, ``storage.rbd``), for
whoever writes or tests one; ``open_rbd`` opens an RBD image (``open_image``
does too, given an ``rbd:`` name). Everything but the contract is imported on
first use, so that an NBD-to-NBD copy never pays for qcow2, the raw backend or
librbd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sendense_nbd.lazy import lazy_getattr
from sendense_nbd.storage.base import (
    Backend,
    BlockDevice,
    Capabilities,
    ImageDevice,
    Placement,
    Support,
    check_range,
    is_zero,
    require_opened,
)
from sendense_nbd.storage.modes import CacheMode, DetectZeroes, Discard, ImageFormat

if TYPE_CHECKING:
    from sendense_nbd.storage.checked import CheckedDevice
    from sendense_nbd.storage.filter import Filter
    from sendense_nbd.storage.images import create_image, open_image
    from sendense_nbd.storage.memory import memory_device
    from sendense_nbd.storage.policy import PolicyDevice
    from sendense_nbd.storage.rbd import open_rbd

_LAZY = {
    "CheckedDevice": "sendense_nbd.storage.checked",
    "Filter": "sendense_nbd.storage.filter",
    "memory_device": "sendense_nbd.storage.memory",
    "create_image": "sendense_nbd.storage.images",
    "open_image": "sendense_nbd.storage.images",
    "PolicyDevice": "sendense_nbd.storage.policy",
    "open_rbd": "sendense_nbd.storage.rbd",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "Backend",
    "BlockDevice",
    "CacheMode",
    "Capabilities",
    "CheckedDevice",
    "DetectZeroes",
    "Discard",
    "Filter",
    "ImageDevice",
    "ImageFormat",
    "Placement",
    "PolicyDevice",
    "Support",
    "check_range",
    "require_opened",
    "create_image",
    "is_zero",
    "memory_device",
    "open_image",
    "open_rbd",
]
