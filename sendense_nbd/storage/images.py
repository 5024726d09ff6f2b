"""Opening and creating image files by format name."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sendense_nbd.errors import ImageError
from sendense_nbd.storage.checked import CheckedDevice
from sendense_nbd.storage.modes import CacheMode, ImageFormat
from sendense_nbd.storage.qcow2 import Qcow2Device, create_qcow2
from sendense_nbd.storage.qcow2.format import MAGIC as QCOW2_MAGIC
from sendense_nbd.storage.raw import RawDevice, create_raw

log = logging.getLogger(__name__)


def probe_format(path: str) -> ImageFormat:
    """qcow2 if ``path`` starts with the qcow2 magic, else raw."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ImageError(f"cannot open {path}: {exc.strerror}") from exc
    return ImageFormat.QCOW2 if magic == QCOW2_MAGIC else ImageFormat.RAW


def parse_filename(name: str) -> tuple[str, ImageFormat | None, bool]:
    """``(path, format, open the backing chain)`` of a plain path, or of qemu's
    ``json:{"driver":..., "file":{"driver":"file","filename":...}, "backing":null}``
    (``"backing": null`` means: this image alone, without its backing file)."""
    if not name.startswith("json:"):
        return name, None, True
    try:
        spec = json.loads(name[5:])
        driver = ImageFormat(spec["driver"])
        file = spec["file"]
        if file.get("driver", "file") != "file":
            raise ValueError(f"file driver {file.get('driver')!r}")
        backing = spec.get("backing", "default")
        if backing is not None and backing != "default":
            raise ValueError('only "backing": null is supported')
        return str(file["filename"]), driver, backing == "default"
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageError(f"unsupported json: filename ({exc})") from exc


def open_image(
    path: str,
    fmt: ImageFormat | None = None,
    *,
    readonly: bool = False,
    cache: CacheMode = CacheMode.WRITEBACK,
    trusted: bool = False,
) -> CheckedDevice:
    """Open ``path`` as a block device (its backend behind the checking adapter).

    Without ``fmt`` the format is probed, as qemu-nbd does; but a writable
    image that looks like qcow2 is never guessed, so a missing ``-f`` cannot
    make writes land in the wrong format. An ``rbd:`` name (or its ``json:``
    form) opens an RBD image, which is raw (``storage.rbd``); unless
    ``trusted`` (the operator gave the name) it may carry only a few Ceph
    options (``storage.rbd.as_spec``).
    """
    if is_rbd(path):
        return _open_rbd(path, fmt, readonly=readonly, cache=cache, trusted=trusted)
    path, from_json, with_backing = parse_filename(path)
    if fmt is not None and from_json is not None and fmt is not from_json:
        raise ImageError(f"-f {fmt.value} contradicts the json: driver {from_json.value}")
    fmt = fmt or from_json
    if fmt is None:
        probed = probe_format(path)
        if probed is not ImageFormat.RAW and not readonly:
            raise ImageError(f"{path} looks like {probed.value}; pass the format explicitly (-f {probed.value})")
        if probed is ImageFormat.RAW:  # the risky guess, as qemu warns
            log.warning("image format of %s was not specified; probed raw", path)
        fmt = probed
    if fmt is ImageFormat.QCOW2:
        return CheckedDevice(Qcow2Device(path, readonly=readonly, open_backing=with_backing))
    return CheckedDevice(RawDevice(path, readonly=readonly, cache=cache))


def create_image(
    path: str,
    size: int | None,
    fmt: ImageFormat = ImageFormat.RAW,
    *,
    backing_file: str | None = None,
    backing_format: str | None = None,
    cluster_size: int | None = None,
    extended_l2: bool = False,
    compat: str = "1.1",
) -> None:
    """Create an empty image (qcow2: optionally over a backing file, whose size ``size`` None takes;
    an ``rbd:`` name: an RBD image, raw only)."""
    if is_rbd(path):
        if fmt is not ImageFormat.RAW or backing_file or cluster_size or extended_l2:
            raise ImageError("an RBD image is raw: no qcow2 format, backing file or qcow2 options")
        if size is None:
            raise ImageError("give a size")
        from sendense_nbd.storage.rbd import create_rbd

        create_rbd(path, size)
        return
    if fmt is ImageFormat.QCOW2:
        if backing_file is not None:
            backing_size = _backing_size(path, backing_file, backing_format)
            size = backing_size if size is None else size
        if size is None:
            raise ImageError("give a size (or a backing file to take it from)")
        create_qcow2(
            path,
            size,
            cluster_size=cluster_size or 65536,
            backing_file=backing_file,
            backing_format=backing_format,
            extended_l2=extended_l2,
            compat=compat,
        )
        return
    if backing_file or cluster_size or extended_l2:
        raise ImageError("raw images take no backing file or qcow2 options")
    if size is None:
        raise ImageError("give a size")
    create_raw(path, size)


def is_rbd(name: str) -> bool:
    """``name`` is qemu's ``rbd:`` filename or its ``json:`` form (the RBD module is loaded only then)."""
    if not name.startswith(("rbd:", "json:")):
        return False
    from sendense_nbd.storage.rbd import is_rbd_filename

    return is_rbd_filename(name)


def _open_rbd(name: str, fmt: ImageFormat | None, *, readonly: bool, cache: CacheMode, trusted: bool) -> CheckedDevice:
    if fmt not in (None, ImageFormat.RAW):
        raise ImageError(f"an RBD image is raw (-f raw), not {fmt.value}")
    from sendense_nbd.storage.rbd import as_spec, open_rbd

    return open_rbd(as_spec(name, trusted=trusted), readonly=readonly, cache=cache)


def _backing_size(path: str, backing_file: str, backing_format: str | None) -> int:
    """The size of the backing file named (relative to ``path``) for a new image, read through the adapter."""
    resolved = backing_file if os.path.isabs(backing_file) else str(Path(path).resolve().parent / backing_file)
    if not os.path.exists(resolved):
        raise ImageError(f"backing file {backing_file} not found (looked for {resolved})")
    probed = probe_format(resolved)
    if backing_format is None:
        raise ImageError(f"give the backing file's format (-F {probed.value})")
    if backing_format not in ("qcow2", "raw"):
        raise ImageError(f"backing format {backing_format!r} is not supported (raw or qcow2)")
    if backing_format == "qcow2" and probed is not ImageFormat.QCOW2:
        raise ImageError(f"{backing_file} is not a qcow2 image")
    device = open_image(resolved, ImageFormat(backing_format), readonly=True)
    try:
        return device.size
    finally:
        device.close()
