"""A vcsim VM, a password file and a state file, and helpers to run `sendense-backup migrate` jobs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect, SmartConnect

from tests.conftest import RunningServer, run, start_server
from tests.vmware.vsphere import STANDIN_PLUGIN

MIB = 1 << 20
VM_PATH = "/DC0/vm/DC0_H0_VM0"
KEYS = (2000, 2001)


class Lab:
    """The simulator, a password file, a state file, and helpers to run jobs."""

    def __init__(self, root: Path, info: dict[str, Any], vm_path: str = VM_PATH) -> None:
        self.root = root
        self.info = info
        self.state = info["state"]
        self.vm_path = vm_path
        self.vm = next(v for v in info["vms"] if v["path"] == vm_path)
        self.password_file = root / "password"
        self.password_file.write_text("pass\n")
        self.password_file.chmod(0o600)
        self.state_file = root / "changeids.json"
        self.jobs = 0

    def disk(self, key: int) -> Path:
        return Path(next(d["path"] for d in self.vm["disks"] if d["key"] == key))

    def keep_copy(self, key: int, name: str) -> Path:
        """The disk as it is now (what the next snapshot will hold)."""
        copy = self.root / f"{name}-{key}.raw"
        shutil.copyfile(self.disk(key), copy)
        return copy

    def command(self, targets: dict[int, str], *extra: str, job: str | None = None) -> list[str]:
        self.jobs += 1
        return [
            str(Path(sys.executable).parent / "sendense-backup"), "migrate",
            "--vmware-endpoint", f"127.0.0.1:{self.info['port']}",
            "--vmware-username", "user",
            "--vmware-password-file", str(self.password_file),
            "--vmware-thumbprint", self.info["thumbprintSha256"],
            "--vmware-path", self.vm_path,
            "--nbd-targets", ",".join(f"{k}={u}" for k, u in targets.items()),
            "--job-id", job or f"job{self.jobs}",
            "--state-file", str(self.state_file),
            "--vddk-plugin", f"python {STANDIN_PLUGIN}",
            "--connections", "2",
            "--json",
            *extra,
        ]  # fmt: skip

    def migrate(self, targets: dict[int, str], *extra: str, job: str | None = None, timeout: float = 180) -> Result:
        proc = subprocess.run(
            self.command(targets, *extra, job=job), capture_output=True, text=True, timeout=timeout, env=env()
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def backup(
        self, name: str, backing: dict[int, Path] | None, *extra: str, readonly: bool = False, job: str | None = None
    ) -> tuple[dict[int, Path], Result]:
        """A job into fresh points (overlays on ``backing``) served by our server; the points and the result."""
        images = new_images(self.root, name, backing=backing)
        server = serve_images(*images.values(), readonly=readonly)
        try:
            return images, self.migrate(targets_of(server, images), *extra, job=job)
        finally:
            server.stop()

    def recorded(self) -> dict[str, Any]:
        if not self.state_file.exists():
            return {}
        return json.loads(self.state_file.read_text())["vms"].get(self.vm_path, {})

    def snapshots(self) -> list[str]:
        si = _connect(self.info)
        try:
            vm = si.content.searchIndex.FindByInventoryPath(self.vm_path.lstrip("/"))
            names: list[str] = []

            def walk(trees: Any) -> None:
                for tree in trees or []:
                    names.append(tree.name)
                    walk(tree.childSnapshotList)

            if vm.snapshot is not None:
                walk(vm.snapshot.rootSnapshotList)
            return names
        finally:
            Disconnect(si)


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr
        self.lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]

    @property
    def notes(self) -> list[str]:
        return [line["note"] for line in self.lines if "note" in line]

    @property
    def reports(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "stage" in line]

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


def env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMA_API_URL", None)
    env.pop("VMWARE_PASSWORD", None)
    return env


def _connect(info: dict[str, Any]) -> Any:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return SmartConnect(host=info["host"], port=info["port"], user="user", pwd="pass", sslContext=context)


def serve_images(*images: Path, readonly: bool = False) -> RunningServer:
    args = ["-f", "qcow2", "--shared", "10", "--persistent"]
    for image in images:
        args += ["-x", image.stem]
    if readonly:
        args.append("--read-only")
    return start_server(*args, *map(str, images))


def targets_of(server: RunningServer, images: dict[int, Path]) -> dict[int, str]:
    return {key: server.uri_for(image.stem) for key, image in images.items()}


def compare(image: Path, expected: Path) -> None:
    check = run("qemu-img", "check", str(image), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    compare = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(expected), check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def new_images(root: Path, name: str, backing: dict[int, Path] | None = None) -> dict[int, Path]:
    images = {}
    for key in KEYS:
        image = root / f"{name}-{key}.qcow2"
        if backing:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing[key]), "-F", "qcow2", str(image))
        else:
            run("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(8 * MIB))
        images[key] = image
    return images


@contextlib.contextmanager
def job_in_background(
    lab: Lab, name: str, backing: dict[int, Path] | None, *extra: str
) -> Iterator[subprocess.Popen[str]]:
    """A job writing into fresh points served by our server; the server stops when the block ends."""
    images = new_images(lab.root, name, backing=backing)
    server = serve_images(*images.values())
    try:
        yield subprocess.Popen(
            lab.command(targets_of(server, images), *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        )  # fmt: skip
    finally:
        server.stop()
