"""A point's view written to new files with the copy engine: converts (raw or qcow2) and portable qcow2
files of a point (a standalone full, or an overlay on an older point) for copies elsewhere."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from sendense_nbd.storage.files import link_new, remove_quietly, temporary_name
from sendense_nbd.storage.modes import ImageFormat

#: The clusters of the overlays :func:`write_overlay` makes: every write covers whole clusters.
CLUSTER = 65536


async def convert(source: str, path: str, fmt: ImageFormat) -> None:
    """Write the view ``source`` reads (a point's whole chain) to a new standalone raw or qcow2 file.

    The copy goes to a fresh temporary file next to ``path``, is verified, and
    is then linked to ``path``, which is never replaced (a symlink there is
    not followed); nothing is left behind on failure.
    """
    from sendense_nbd.copy import CopyOptions, copy, open_source, open_target

    temporary = temporary_name(path)
    try:
        source_endpoint = await open_source(source)
        try:
            target = await open_target(temporary, fmt=fmt, size=source_endpoint.size)
            try:
                await copy(source_endpoint, target, CopyOptions(verify=True))
            finally:
                await target.close()
        finally:
            await source_endpoint.close()
        await asyncio.to_thread(link_new, temporary, path)
    finally:
        await asyncio.to_thread(remove_quietly, temporary)


def aligned(changes: Sequence[tuple[int, int]], size: int, cluster: int = CLUSTER) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges widened to whole clusters (and cut at ``size``), sorted and merged."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(changes):
        start, end = offset // cluster * cluster, min(size, -(-(offset + length) // cluster) * cluster)
        if end <= start:
            continue
        if out and start <= out[-1][0] + out[-1][1]:
            last = out.pop()
            start, end = last[0], max(end, last[0] + last[1])
        out.append((start, end - start))
    return out


async def write_overlay(
    source: str, folder: str, name: str, *, base_id: str, size: int, changes: Sequence[tuple[int, int]]
) -> str:
    """A qcow2 overlay ``folder/name`` whose backing is named ``<base_id>.qcow2`` (relative, qcow2) and
    which holds the view ``source`` reads over ``changes``, whole clusters, zeroes as zero clusters.

    The backing is not needed: every cluster written is written whole. A placeholder (an empty
    qcow2 of ``size`` bytes) stands in for it while the copy opens the overlay, and is removed.
    """
    from sendense_nbd.copy import CopyOptions, TargetMode, copy, open_source, open_target
    from sendense_nbd.storage import create_image

    path, placeholder = os.path.join(folder, name), os.path.join(folder, f"{base_id}.qcow2")

    def make() -> None:
        create_image(placeholder, size, ImageFormat.QCOW2)
        create_image(path, size, ImageFormat.QCOW2, backing_file=f"{base_id}.qcow2", backing_format="qcow2")

    await asyncio.to_thread(make)
    try:
        source_endpoint = await open_source(source)
        try:
            target = await open_target(path, fmt=ImageFormat.QCOW2)
            try:
                options = CopyOptions(target_mode=TargetMode.OVERLAY, verify=True)
                await copy(source_endpoint, target, options, changed_areas=aligned(changes, size))
            finally:
                await target.close()
        finally:
            await source_endpoint.close()
    finally:
        await asyncio.to_thread(remove_quietly, placeholder)
    return path
