"""A simulated VMware VM backed up with `sendense-backup migrate`: full, then incremental.

1. Start the vSphere simulator (``simulator/``: vcsim with CBT, built from Debian's govmomi) with a
   2-disk VM, and write data into its disks.
2. Serve two empty qcow2 points with our NBD server and run ``sendense-backup migrate``: it enables
   CBT, snapshots the VM, reads each disk through real nbdkit (the vddk stand-in plugin, which takes
   vddk's parameters), copies both disks in parallel, flushes, removes the snapshot, and records the
   change IDs (standalone: in a state file).
3. Change blocks in both disks (one area overwritten with zeroes), serve qcow2 overlays backed by the
   full points, and run it again: an incremental of only the changed areas.
4. Verify every point with ``qemu-img check`` and ``qemu-img compare`` against the disk as it was when
   its snapshot was taken.

Run it with ``.venv/bin/python examples/vmware_backup.py [--size-mb 64] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sendense_nbd import Export, NBDServer, create_image, open_image
from sendense_nbd.storage import ImageFormat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "simulator"))
import vmdisk  # noqa: E402  (simulator/vmdisk.py: change a simulated disk and record it for CBT)

MiB = 1 << 20
VM_PATH = "/DC0/vm/DC0_H0_VM0"
KEYS = (2000, 2001)


def start_vcsim(state: Path, size_mb: int) -> tuple[subprocess.Popen[bytes], dict]:
    binary = subprocess.run(
        [str(ROOT / "simulator" / "build-vcsim.sh")], check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    proc = subprocess.Popen(
        [binary, "-listen", "127.0.0.1:0", "-state", str(state), "-username", "backup", "-password", "s3cret"]
        + ["-vm-disks", "2", "-disk-size-mb", str(size_mb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


async def backup(workdir: Path, info: dict, name: str, backing: dict[int, Path] | None, size: int) -> dict:
    """One `sendense-backup migrate` run into fresh qcow2 points served by our server."""
    images = {}
    for key in KEYS:
        image = workdir / f"{name}-{key}.qcow2"
        create_image(
            str(image),
            None if backing else size,
            ImageFormat.QCOW2,
            backing_file=str(backing[key]) if backing else None,
            backing_format="qcow2" if backing else None,
        )
        images[key] = image
    devices = [open_image(str(images[key]), ImageFormat.QCOW2) for key in KEYS]
    try:
        exports = [Export(f"disk-{key}", device) for key, device in zip(KEYS, devices, strict=True)]
        async with NBDServer(exports, port=0, shared=10, persistent=True) as server:
            targets = ",".join(f"{key}=nbd://127.0.0.1:{server.port}/disk-{key}" for key in KEYS)
            command = [
                str(Path(sys.executable).parent / "sendense-backup"), "migrate",
                "--vmware-endpoint", f"127.0.0.1:{info['port']}", "--vmware-username", "backup",
                "--vmware-password-file", str(workdir / "password"),
                "--vmware-thumbprint", info["thumbprintSha256"],
                "--vmware-path", VM_PATH, "--nbd-targets", targets, "--job-id", name,
                "--state-file", str(workdir / "changeids.json"),
                "--vddk-plugin", f"python {ROOT / 'simulator' / 'vddk_standin.py'}", "--json",
            ]  # fmt: skip
            print("$ sendense-backup migrate ... --job-id", name)
            proc = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await proc.communicate()
    finally:
        for device in devices:
            device.close()
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    for line in lines:
        if "note" in line:
            print("  " + line["note"])
    if proc.returncode:
        raise SystemExit(f"sendense-backup failed ({proc.returncode}): {err.decode()[-2000:]}")
    final = [line for line in lines if "stage" in line][-1]
    for disk in final["disks"]:
        print(
            f"  disk {disk['disk_key']}: {disk['sync_type']}, {disk['bytes_transferred'] / MiB:.1f} MiB sent, "
            f"{disk['bytes_skipped'] / MiB:.1f} MiB skipped"
        )
    return images


def verify(images: dict[int, Path], expected: dict[int, Path]) -> None:
    for key in KEYS:
        subprocess.run(["qemu-img", "check", "-q", str(images[key])], check=True)
        subprocess.run(
            ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(images[key]), str(expected[key])], check=True
        )
    print(f"  qemu-img check and compare: {', '.join(p.name for p in images.values())} match the snapshot: OK")


def snapshot_of_disks(state: Path, vm: dict, workdir: Path, name: str) -> dict[int, Path]:
    """The disks as they are now, which is what the next snapshot holds."""
    copies = {}
    for disk in vm["disks"]:
        copies[disk["key"]] = workdir / f"{name}-{disk['key']}.raw"
        shutil.copyfile(disk["path"], copies[disk["key"]])
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64, help="size of each virtual disk")
    parser.add_argument("--workdir", type=Path, help="where to put everything (default: a temporary directory)")
    args = parser.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="sendense-vmware-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        state = workdir / "vcsim"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir()
        (workdir / "password").write_text("s3cret\n")
        os.chmod(workdir / "password", 0o600)
        (workdir / "changeids.json").unlink(missing_ok=True)
        proc, info = start_vcsim(state, args.size_mb)
        try:
            vm = next(v for v in info["vms"] if v["path"] == VM_PATH)
            size = args.size_mb * MiB
            print(f"simulated VM {VM_PATH}: disks {list(KEYS)} of {args.size_mb} MiB, at {info['url']}")
            for key in KEYS:
                for offset in range(0, size, 8 * MiB):
                    vmdisk.write(state, vm["moref"], key, offset, rng.randbytes(MiB))
            expected = snapshot_of_disks(state, vm, workdir, "at-full")
            full = asyncio.run(backup(workdir, info, "full", None, size))
            verify(full, expected)

            vmdisk.write(state, vm["moref"], 2000, 3 * MiB, rng.randbytes(256 * 1024))
            vmdisk.zero(state, vm["moref"], 2000, 8 * MiB, MiB)  # was data: must read zeroes now
            vmdisk.write(state, vm["moref"], 2001, size - MiB, rng.randbytes(4096))
            expected = snapshot_of_disks(state, vm, workdir, "at-incremental")
            incremental = asyncio.run(backup(workdir, info, "incremental", full, size))
            verify(incremental, expected)
        finally:
            proc.terminate()
            proc.wait()
    print("VMware backup, full then incremental: verified: OK")


if __name__ == "__main__":
    sys.exit(main())
