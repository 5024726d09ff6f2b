"""Storage: the block-device contract and its implementations."""

from sendense_nbd.storage.base import BlockDevice, Capabilities, Extent, is_zero
from sendense_nbd.storage.images import ImageFormat, create_image, open_image
from sendense_nbd.storage.memory import MemoryDevice
from sendense_nbd.storage.policy import DetectZeroes, Discard, PolicyDevice
from sendense_nbd.storage.raw import CacheMode, RawDevice

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
