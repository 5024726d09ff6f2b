"""RBD images in the session's test cluster (the ``ceph_cluster`` fixture), for the RBD tests.

``rbd_images`` makes images with unique names and removes them (and their snapshots) at the end
of the test; it reads them back with the ``rbd`` tool and qemu's rbd driver, which are the peers
the device is compared against.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import run

MiB = 1 << 20
_names = itertools.count()


@attrs.define
class RbdImages:
    """Images in one pool of the test cluster, removed when the test ends."""

    cluster: Any
    pool: str = "rbd"
    made: list[str] = attrs.field(factory=list)

    def rbd(self, *args: str, check: bool = True) -> str:
        """``rbd ARGS`` as the cluster's admin; its stdout."""
        return run("rbd", *self.cluster.client_args(), *args, check=check).stdout

    def new(self, size: int, *, prefix: str = "t", namespace: str | None = None) -> str:
        """A new empty image of ``size`` bytes (pool defaults: object map, fast-diff); its name."""
        name = f"{prefix}-{os.getpid()}-{next(_names)}"
        self.made.append(f"{namespace}/{name}" if namespace else name)
        self.rbd("create", "--size", f"{size}B", self.spec(name, namespace=namespace))
        return name

    def spec(self, image: str, *, snapshot: str | None = None, namespace: str | None = None) -> str:
        """``pool[/namespace]/image[@snapshot]`` as the rbd tool names it."""
        ns = f"{namespace}/" if namespace else ""
        return f"{self.pool}/{ns}{image}" + (f"@{snapshot}" if snapshot else "")

    def filename(self, image: str, *, snapshot: str | None = None, namespace: str | None = None) -> str:
        """qemu's ``rbd:`` filename of the image (what our server, qemu-img and qemu-io take)."""
        return (
            f"rbd:{self.spec(image, snapshot=snapshot, namespace=namespace)}"
            f":conf={self.cluster.conf}:id={self.cluster.user}:keyring={self.cluster.keyring}"
        )

    def snapshot(self, image: str, snapshot: str) -> None:
        self.rbd("snap", "create", self.spec(image, snapshot=snapshot))

    def fill(self, image: str, source: Path) -> None:
        """Write ``source`` (a raw file no larger than the image) over the image with qemu-img."""
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), self.filename(image))

    def export(self, image: str, target: Path, *, snapshot: str | None = None) -> Path:
        """The image as qemu's rbd driver reads it, into a raw file."""
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", self.filename(image, snapshot=snapshot), str(target))
        return target

    def diff(self, image: str, *, snapshot: str | None = None) -> list[tuple[int, int]]:
        """``rbd diff --whole-object``: the allocated objects as merged ``(offset, length)`` runs."""
        out = json.loads(self.rbd("diff", "--whole-object", "--format", "json", self.spec(image, snapshot=snapshot)))
        entries = sorted(out, key=lambda e: e["offset"])
        return merge_runs((e["offset"], e["length"]) for e in entries if e["exists"] == "true")

    def remove_all(self) -> None:
        for name in reversed(self.made):
            spec = f"{self.pool}/{name}"
            self.rbd("snap", "purge", spec, check=False)
            self.rbd("rm", "--no-progress", spec, check=False)


@contextlib.contextmanager
def quota_pool(cluster: Any, pool: str) -> Iterator[RbdImages]:
    """A new pool (removed at the end, images and all) whose quota the test sets with :func:`set_quota`."""
    ceph = ("ceph", *cluster.client_args())
    run(*ceph, "osd", "pool", "create", pool)
    try:
        run("rbd", *cluster.client_args(), "pool", "init", pool)
        yield RbdImages(cluster, pool=pool)
    finally:
        run(*ceph, "osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it")


def set_quota(images: RbdImages, max_bytes: int) -> None:
    """The pool's quota in bytes (0: none); the OSDs enforce it a few seconds later."""
    run("ceph", *images.cluster.client_args(), "osd", "pool", "set-quota", images.pool, "max_bytes", str(max_bytes))


@pytest.fixture
def rbd_images(ceph_cluster: Any) -> Iterator[RbdImages]:
    """Factory of test images in the session cluster's ``rbd`` pool; all removed at teardown."""
    images = RbdImages(ceph_cluster)
    yield images
    images.remove_all()


def merge_runs(pieces: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, length)`` pieces in order, each merged into the run before it when they touch."""
    runs: list[tuple[int, int]] = []
    for offset, length in pieces:
        if runs and sum(runs[-1]) == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((offset, length))
    return runs


def data_runs(extents: list[Any]) -> list[tuple[int, int]]:
    """The non-hole extents of a map, merged into ``(offset, length)`` runs."""
    return merge_runs((e.offset, e.length) for e in extents if not e.hole)
