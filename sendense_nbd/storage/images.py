"""Opening and creating image files by format name."""

from __future__ import annotations

import enum
import logging

from sendense_nbd.errors import ImageError
from sendense_nbd.storage.base import BlockDevice
from sendense_nbd.storage.raw import CacheMode, RawDevice, create_raw

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"


class ImageFormat(enum.Enum):
    RAW = "raw"
    QCOW2 = "qcow2"


def _check_supported(fmt: ImageFormat) -> None:
    if fmt is ImageFormat.QCOW2:
        raise ImageError("the qcow2 format is not supported yet; convert the image with 'qemu-img convert -O raw'")


def probe_format(path: str) -> ImageFormat:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ImageError(f"cannot open {path}: {exc.strerror}") from exc
    return ImageFormat.QCOW2 if magic == QCOW2_MAGIC else ImageFormat.RAW


def open_image(
    path: str, fmt: ImageFormat | None = None, *, readonly: bool = False, cache: CacheMode = CacheMode.WRITEBACK
) -> BlockDevice:
    """Open ``path`` as a block device.

    Without ``fmt`` the format is probed, as qemu-nbd does; but an image that
    looks like qcow2 is never opened as raw, so a missing ``-f`` cannot make
    writes land in qcow2 metadata.
    """
    if fmt is None:
        probed = probe_format(path)
        if probed is not ImageFormat.RAW:
            raise ImageError(f"{path} looks like {probed.value}; pass the format explicitly (-f {probed.value})")
        log.warning("image format of %s was not specified; serving it as raw", path)
        fmt = probed
    _check_supported(fmt)
    return RawDevice(path, readonly=readonly, cache=cache)


def create_image(path: str, size: int, fmt: ImageFormat = ImageFormat.RAW) -> None:
    _check_supported(fmt)
    create_raw(path, size)
