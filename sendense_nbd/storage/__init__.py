"""Storage: the block-device contract and its implementations.

The implementations are imported on first use, so that an NBD-to-NBD copy
never pays for qcow2 and the raw backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sendense_nbd.lazy import lazy_getattr
from sendense_nbd.storage.base import BlockDevice, Capabilities, Extent, is_zero
from sendense_nbd.storage.modes import CacheMode, DetectZeroes, Discard, ImageFormat

if TYPE_CHECKING:
    from sendense_nbd.storage.images import create_image, open_image
    from sendense_nbd.storage.memory import MemoryDevice
    from sendense_nbd.storage.policy import PolicyDevice
    from sendense_nbd.storage.raw import RawDevice

_LAZY = {
    "create_image": "sendense_nbd.storage.images",
    "open_image": "sendense_nbd.storage.images",
    "MemoryDevice": "sendense_nbd.storage.memory",
    "PolicyDevice": "sendense_nbd.storage.policy",
    "RawDevice": "sendense_nbd.storage.raw",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "BlockDevice",
    "CacheMode",
    "Capabilities",
    "DetectZeroes",
    "Discard",
    "Extent",
    "ImageFormat",
    "MemoryDevice",
    "PolicyDevice",
    "RawDevice",
    "create_image",
    "is_zero",
    "open_image",
]
