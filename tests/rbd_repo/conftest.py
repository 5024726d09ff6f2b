"""An RBD repository on the session's test cluster (tests/conftest.py ``ceph_cluster``): each test gets its
own image prefix in the shared pool, so tests never see each other's images."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.db import Database
from sendense_nbd.hub.repository import RbdStore, Repository, open_store
from tests.conftest import require, run
from tests.hub.conftest import hub_factory, node, vcsim  # noqa: F401  (the hub tests' fixtures)


def rbd_url(cluster: Any, prefix: str) -> str:
    """The ``--repo`` URL of a repository with this image prefix in the cluster's pool."""
    return f"rbd://{cluster.pool}?conf={cluster.conf}&id={cluster.user}&keyring={cluster.keyring}&prefix={prefix}"


@pytest.fixture
def prefix() -> str:
    """A fresh image prefix: this test's images only."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def url(ceph_cluster: Any, prefix: str) -> str:
    return rbd_url(ceph_cluster, prefix)


@pytest.fixture
async def repository(tmp_path: Path, url: str) -> AsyncIterator[Repository]:
    """A repository on the cluster, with its own state directory, no hub."""
    state = tmp_path / "state"
    state.mkdir()
    store = open_store(str(state), url)
    db = Database(str(state / "hub.db"))
    try:
        yield Repository(str(state), db, store=store)
    finally:
        db.close()


def head(repository: Repository, vm_path: str, disk_key: int) -> str:
    """qemu's ``rbd:`` name of a disk's image head (what a job's export writes)."""
    store = repository.store
    assert isinstance(store, RbdStore)
    return store.where.spec(store.image_name(vm_path, disk_key)).filename


def rbd(cluster: Any, *args: str) -> Any:
    """``rbd ... --format json`` against the cluster, parsed."""
    result = run(require("rbd"), *cluster.client_args(), *args, "--format", "json")
    return json.loads(result.stdout or "null")


def ceph(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """``ceph ...`` against the cluster."""
    return run(require("ceph"), *cluster.client_args(), *args)


def snapshot_filename(cluster: Any, point_path: str) -> str:
    """qemu's ``rbd:`` name (with the cluster's conf, user and keyring) of a point's ``rbd:POOL/IMAGE@SNAP`` path."""
    image, _, snapshot = point_path.removeprefix(f"rbd:{cluster.pool}/").partition("@")
    return str(cluster.rbd_filename(image, snapshot))


def snapshot_matches(cluster: Any, point_path: str, expected: Path) -> None:
    """The point's snapshot, read through qemu's rbd driver, holds exactly ``expected``'s bytes."""
    image = snapshot_filename(cluster, point_path)
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "raw", image, str(expected))


def wait_pool_full(cluster: Any, full: bool, timeout: float = 60) -> None:
    """Until a new object's write into the pool fails for its quota (``full``), or succeeds: what the OSD
    enforces, a moment after the mons flag the pool (``ceph osd dump``)."""
    import errno
    import time

    import rados  # Debian's python3-rados (the venv has the system's site-packages)

    deadline = time.monotonic() + timeout
    with rados.Rados(conffile=cluster.conf, rados_id=cluster.user) as client, client.open_ioctx(cluster.pool) as ioctx:
        ioctx.set_osdmap_full_try()  # fail, never wait, when full
        while time.monotonic() < deadline:
            name = f"sendense-full-probe-{uuid.uuid4().hex[:8]}"
            try:
                ioctx.write_full(name, b"x")
            except rados.Error as exc:
                if getattr(exc, "errno", None) not in (errno.EDQUOT, errno.ENOSPC):
                    raise
                if full:
                    return
            else:
                ioctx.remove_object(name)
                if not full:
                    return
            time.sleep(0.5)
    raise AssertionError(f"pool {cluster.pool} never became {'full' if full else 'writable'}")
