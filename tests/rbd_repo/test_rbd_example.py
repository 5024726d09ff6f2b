"""``./setup.sh run --ceph``'s pipeline (examples/pipeline.py ``--ceph-dir``) on the session's cluster: the hub's
repository is an RBD pool, every point of the full and the incremental is compared through qemu's ``rbd:`` driver
with the VM's disks, the policy's scheduled points are verified against their digests, and their copies on S3
(RGW, Object Lock) are served back over NBD matching their snapshots, and refused a delete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parents[2]


def test_the_pipeline_example_runs_on_rbd(ceph_cluster: Any, tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "examples" / "pipeline.py"), "--size-mb", "16", "--workdir", str(tmp_path),
               "--ceph-dir", ceph_cluster.directory]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("qemu-img compare (through rbd:): both restore points match the snapshot: OK") == 2
    assert "4 verified, 0 damaged" in result.stdout, result.stdout
    assert result.stdout.count(": served from the bucket, matches") == 4, result.stdout
    assert ": 409 locked: " in result.stdout, result.stdout
    assert "by API and by policy: verified: OK" in result.stdout
