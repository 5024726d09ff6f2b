"""The storage layer's user-facing choices: plain enums, cheap to import."""

from __future__ import annotations

import enum


class ImageFormat(enum.Enum):
    """An image file's format, as qemu's ``-f`` names it."""

    RAW = "raw"
    QCOW2 = "qcow2"


class CacheMode(enum.Enum):
    """Host page-cache use, as qemu-nbd's ``--cache``."""

    WRITEBACK = "writeback"
    WRITETHROUGH = "writethrough"
    NONE = "none"


class Discard(enum.Enum):
    """What TRIM does: nothing (``ignore``) or free the space (``unmap``)."""

    IGNORE = "ignore"
    UNMAP = "unmap"


class DetectZeroes(enum.Enum):
    """Whether all-zero writes become zero requests (``unmap``: may also trim)."""

    OFF = "off"
    ON = "on"
    UNMAP = "unmap"
