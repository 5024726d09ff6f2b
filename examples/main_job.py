"""The main job, end to end, on an embedded default disk.

1. Make a 256 MiB source disk: sparse, with pseudo-random data in 10% of it.
2. Create an empty qcow2 backup point and serve it with our NBD server
   (in-process, through the library API), 4 clients allowed.
3. Copy the source into it with a real client, ``nbdcopy --flush``, over 4
   connections.
4. Verify: ``qemu-img compare`` against the export, the allocation map over
   NBD (holes stayed holes), and, after the server flushed and stopped,
   ``qemu-img check`` and ``qemu-img compare`` of the qcow2 file itself.
5. Run the whole pipeline against a simulated VMware VM: the hub, the node
   and the node's SSH tunnel back it up, full and then incremental, and
   both restore points are verified; then a policy for a second VM is created with the CLI, the hub's
   scheduler runs it twice (full, then incremental), its points are verified against their digests,
   and ``sendense-nbd status`` is printed (``examples/pipeline.py``).

With ``--ceph`` (``./setup.sh run --ceph``), step 5 runs with the hub's repository on Ceph RBD: a
loopback-only test cluster (``simulator/ceph_cluster.py``) is started in the work directory, each
disk becomes an RBD image and each restore point a snapshot, and every point is verified with
``qemu-img compare`` against the source, reading the snapshot through qemu's ``rbd:`` driver; the
policy's points are copied to an S3 bucket with Object Lock on the cluster's RGW, and each copy, served
over NBD from the bucket, is compared with its snapshot; the cluster is stopped at the end.

Run it with ``./setup.sh run [--keep] [--ceph]``, or ``.venv/bin/python examples/main_job.py
[--size 256] [--workdir DIR] [--keep] [--ceph]``. It prints the hub's web console URL; with ``--keep``
the hub, node, tunnel and simulator stay up (the console shows the run) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sendense_nbd import Export, NBDServer, create_image, open_image
from sendense_nbd.storage import DetectZeroes, Discard, ImageFormat, PolicyDevice

MiB = 1 << 20


def make_source(path: Path, size: int) -> list[tuple[int, int]]:
    """A sparse disk with 1 MiB runs of data covering 10% of it."""
    rng = random.Random(2026)
    data = [(offset, MiB) for offset in range(0, size, 10 * MiB)]
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return data


async def copy_and_verify(source: Path, target: Path, size: int, data: list[tuple[int, int]]) -> None:
    device = PolicyDevice(
        open_image(str(target), ImageFormat.QCOW2), discard=Discard.UNMAP, detect_zeroes=DetectZeroes.OFF
    )
    try:
        async with NBDServer([Export("disk0", device)], port=0, shared=4, persistent=True) as server:
            uri = f"nbd://127.0.0.1:{server.port}/disk0"
            print(f"serving {target} at {uri}")
            started = time.monotonic()
            await run("nbdcopy", "--flush", "--connections=4", str(source), uri)
            elapsed = time.monotonic() - started
            print(f"nbdcopy: {size / MiB:.0f} MiB in {elapsed:.2f} s")
            await run(
                "qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), f"nbd://127.0.0.1:{server.port}/disk0"
            )
            extents = json.loads(await run("nbdinfo", "--map", "--json", uri))
            allocated = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
            if merge(allocated) != merge(data):
                raise SystemExit(f"allocation map differs from the source: {allocated[:4]}...")
            print(f"allocation map: {len(data)} data runs, the rest holes, as in the source")
    finally:
        device.close()
    await run("qemu-img", "check", "-f", "qcow2", str(target))
    await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), str(target))
    print("qemu-img check: no errors; qemu-img compare: the backup point is identical to the source: OK")


def merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


async def run(*cmd: str) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode().strip()}")
    return out.decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="disk size in MiB")
    parser.add_argument("--workdir", type=Path, help="where to put the images (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="leave the hub and its web console running until Ctrl-C")
    parser.add_argument("--ceph", action="store_true", help="the hub's repository on a test Ceph cluster (RBD)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sendense-main-job-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        source, target = workdir / "source.raw", workdir / "full.qcow2"
        for path in (source, target):
            path.unlink(missing_ok=True)
        data = make_source(source, args.size * MiB)
        create_image(str(target), args.size * MiB, ImageFormat.QCOW2)
        asyncio.run(copy_and_verify(source, target, args.size * MiB, data))
    print()
    keep = ["--keep"] if args.keep else []
    if not args.ceph:
        code = run_pipeline("--size-mb", str(min(args.size, 64)), *keep)
    else:
        with tempfile.TemporaryDirectory(prefix="sendense-ceph-", dir=args.workdir) as ceph_dir:
            code = with_ceph(Path(ceph_dir), "--size-mb", str(min(args.size, 64)), *keep)
    if code:
        raise SystemExit(code)


def run_pipeline(*args: str) -> int:
    """examples/pipeline.py with ``args``; its exit status."""
    pipeline = Path(__file__).with_name("pipeline.py")
    proc = subprocess.Popen([sys.executable, str(pipeline), *args])
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # --keep ends with Ctrl-C: the pipeline got it too and stops what it started
            continue


def with_ceph(directory: Path, *args: str) -> int:
    """The pipeline with its repository on a test Ceph cluster started in ``directory`` (and stopped after)."""
    cluster = Path(__file__).resolve().parent.parent / "simulator" / "ceph_cluster.py"
    print(f"$ {cluster.name} start {directory}", flush=True)
    subprocess.run([sys.executable, str(cluster), "start", str(directory)], check=True, stdout=subprocess.DEVNULL)
    try:
        return run_pipeline(*args, "--ceph-dir", str(directory))
    finally:
        subprocess.run([sys.executable, str(cluster), "stop", str(directory)], check=True)


if __name__ == "__main__":
    sys.exit(main())
