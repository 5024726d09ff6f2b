"""The whole pipeline on one machine: a simulated VMware VM backed up by the hub through the node's SSH tunnel.

What runs (each a real process, as deployed; see examples/deploy/):

- the vSphere simulator (``simulator/``) with a 2-disk VM;
- the hub, ``sendense-nbd hub`` on 127.0.0.1 with its SSH endpoint (``--ssh-listen``);
- the node, ``sendense-backup node`` on 127.0.0.3, with the vCenter credentials in its config file;
- the node's tunnel, ``sendense-backup tunnel``: the hub's NBD ports and API appear on 127.0.0.2,
  and the hub reaches the node API through a reverse forward.

Then: ``POST /api/v1/backups`` to the hub (full), change blocks in both disks (one area to zeroes),
``POST`` again (incremental), and verify every restore point with ``qemu-img check`` and
``qemu-img compare`` against the disk as it was at its snapshot.

Then as a service: ``sendense-nbd policy add`` makes a policy for a second VM on a 15 s interval; the
hub's scheduler runs it twice (full, then incremental after the VM changed), ``sendense-nbd verify``
re-reads every point against its digests, and ``sendense-nbd status`` shows the hub at a glance.

With ``--ceph-dir DIR`` (a running test cluster, ``simulator/ceph_cluster.py``; ``./setup.sh run --ceph``
starts one) the hub's repository is an RBD pool in it (``--repo rbd://...``): every point is a snapshot,
checked with ``qemu-img compare`` reading it through qemu's ``rbd:`` driver. The policy also copies
each point to an S3 bucket with Object Lock on the cluster's RGW: the copies are locked (a delete is
refused), and each one, served back over NBD straight from the bucket, matches its RBD snapshot.

Run it with ``.venv/bin/python examples/pipeline.py [--size-mb 64] [--workdir DIR] [--ceph-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncssh

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "simulator"))
import ceph_cluster  # noqa: E402  (simulator/ceph_cluster.py: a test Ceph cluster, for --ceph-dir)
import vmdisk  # noqa: E402  (simulator/vmdisk.py: change a simulated disk and record it for CBT)

MiB = 1 << 20
VM_PATH = "/DC0/vm/DC0_H0_VM0"
POLICY_VM = "/DC0/vm/DC0_H0_VM1"
HUB, NODE_SIDE, NODE_API = "127.0.0.1", "127.0.0.2", "127.0.0.3"


def free_ports(count: int) -> list[int]:
    """``count`` consecutive ports that are free on every address used here."""
    first = 24000 + os.getpid() % 2000 * 8
    while True:
        try:
            for port in range(first, first + count):
                for host in (HUB, NODE_SIDE, NODE_API):
                    with socket.socket() as sock:
                        sock.bind((host, port))
        except OSError:
            first += count
            continue
        return list(range(first, first + count))


def start(command: list[str], name: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a process that prints one JSON line when it is ready."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else b""
    if not line:
        proc.kill()
        raise SystemExit(f"{name} did not start: {proc.communicate()[1].decode()[-2000:]}")
    return proc, json.loads(line)


def call(method: str, url: str, body: object = None) -> Any:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def backup(api: str, mode: str) -> dict[str, Any]:
    job = call("POST", f"{api}/backups", {"vm_path": VM_PATH, "mode": mode})
    print(f"$ POST /api/v1/backups {mode}: job {job['job_id']}, ports {[d['port'] for d in job['detail']['disks']]}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = call("GET", f"{api}/backups/{job['job_id']}")
        if job["state"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if job["state"] != "completed":
        raise SystemExit(f"the backup did not complete: {json.dumps(job, indent=2)}")
    for disk in job["detail"]["disks"]:
        print(f"  disk {disk['disk_key']}: {disk['sync_type']} point {disk['point_id']}")
    return job


#: ``:conf=..:id=..:keyring=..`` of the test cluster (--ceph-dir): qemu reads a point's rbd:POOL/IMAGE@SNAP with it.
RBD_KEYS = ""


def verify(api: str, job: dict[str, Any], expected: dict[int, Path]) -> None:
    points = {p["id"]: p for p in call("GET", f"{api}/points?vm_path={VM_PATH}")["points"]}
    for disk in job["detail"]["disks"]:
        path = points[disk["point_id"]]["path"]
        if path.startswith("rbd:"):  # an RBD snapshot: raw, read through qemu's rbd driver
            print(f"  {path}")
            compare = ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", path + RBD_KEYS]
            subprocess.run([*compare, str(expected[disk["disk_key"]])], check=True)
            continue
        subprocess.run(["qemu-img", "check", "-q", path], check=True)
        subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", path, str(expected[disk["disk_key"]])], check=True)
    what = "check and compare" if not RBD_KEYS else "compare (through rbd:)"
    print(f"  qemu-img {what}: both restore points match the snapshot: OK")


def cli(*args: str, api: str) -> str:
    """Run ``sendense-nbd ARGS --hub URL`` as an operator would, echoing it; its output."""
    command = [str(BIN / "sendense-nbd"), *args, "--hub", api.removesuffix("/api/v1")]
    print("$ sendense-nbd " + " ".join(args))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"sendense-nbd {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def policy_runs(api: str, count: int) -> list[dict[str, Any]]:
    """Wait until the policy has ``count`` runs that are done; its runs, oldest first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = call("GET", f"{api}/policies/nightly")["runs"]
        if len([run for run in runs if run["state"] != "open"]) >= count:
            return list(reversed(runs))
        time.sleep(0.5)
    raise SystemExit(f"the scheduler did not run the policy {count} times: {json.dumps(runs, indent=2)}")


def operate(api: str, vc: dict[str, Any], rng: random.Random) -> None:
    """A policy run twice by the hub's scheduler (full, then incremental), its points verified, the status."""
    vm = next(v for v in vc["vms"] if v["path"] == POLICY_VM)
    for disk in vm["disks"]:
        vmdisk.write(vc["stateDir"], vm["moref"], disk["key"], 0, rng.randbytes(2 * MiB))
    added = json.loads(cli("policy", "add", "nightly", "--include", POLICY_VM, "--every", "15s", "--keep-last", "7",
                           "--keep-daily", "14", "--full-every", "6", api=api))  # fmt: skip
    print(f"  policy {added['name']}: {added['vms']['include']}, every {added['schedule']['every']:.0f} s,"
          f" retention {added['retention']}")  # fmt: skip
    if COPY_TARGET is not None:
        call("PATCH", f"{api}/policies/nightly", {"copy": COPY_TARGET})
        print(f"$ PATCH /api/v1/policies/nightly: copy each point to s3://{COPY_TARGET['bucket']}")
    print(cli("policy", "list", api=api).rstrip())
    first = policy_runs(api, 1)[0]
    for disk in vm["disks"]:
        vmdisk.write(vc["stateDir"], vm["moref"], disk["key"], 5 * MiB, rng.randbytes(512 * 1024))
    second = policy_runs(api, 2)[1]
    for run in (first, second):
        (item,) = run["items"]
        job = call("GET", f"{api}/backups/{item['job_id']}")
        if job["state"] != "completed":
            raise SystemExit(f"the policy's job did not complete: {json.dumps(job, indent=2)}")
        kinds = sorted({d["sync_type"] for d in job["detail"]["disks"]})
        print(f"  scheduled run {run['id']}: job {job['job_id']} {'/'.join(kinds)}"
              f" (full because: {job['full_reason'] or '-'}), {job['bytes_sent']} bytes sent")  # fmt: skip
    print(cli("verify", POLICY_VM, "--wait", api=api).rstrip())
    print(cli("status", api=api).rstrip())


def offsite(api: str) -> None:
    """The policy's points copied to S3: each copy, served over NBD from the bucket, matches its RBD snapshot;
    Object Lock refuses a delete."""
    deadline = time.monotonic() + 180
    while True:
        copies = call("GET", f"{api}/copies?vm_path={POLICY_VM}")["copies"][:4]  # the two runs' (the policy goes on)
        if sum(c["state"] == "completed" for c in copies) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(copies) < 4 or any(c["state"] != "completed" for c in copies):
        raise SystemExit(f"the policy's points were not all copied to S3: {json.dumps(copies, indent=2)}")
    points = {p["id"]: p for p in call("GET", f"{api}/points?vm_path={POLICY_VM}")["points"]}
    for copy in copies:
        served = call("POST", f"{api}/copies/{copy['id']}/export", {})
        try:
            snapshot = points[copy["point_id"]]["path"] + RBD_KEYS
            subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", served["uri"], snapshot], check=True)
        finally:
            call("DELETE", f"{api}/copies/{copy['id']}/export")
        print(
            f"  copy {copy['id']} ({copy['kind']}, point {copy['point_id']}) locked until"
            f" {time.strftime('%H:%M:%S', time.localtime(copy['locked_until']))}: served from the bucket, matches"
        )
    try:
        call("DELETE", f"{api}/copies/{copies[0]['id']}")
    except urllib.error.HTTPError as refused:
        answer = json.loads(refused.read())["error"]
        if refused.code != 409 or answer["code"] != "locked":
            raise
        print(f"$ DELETE /api/v1/copies/{copies[0]['id']}: {refused.code} {answer['code']}: {answer['message']}")
    else:
        raise SystemExit("S3 deleted a copy under Object Lock")


def repository(work: Path, ceph_dir: Path | None) -> list[str]:
    """The hub's repository options: ``--repo DIR``, or an RBD pool of the test cluster in ``ceph_dir``."""
    global RBD_KEYS
    if ceph_dir is None:
        return ["--repo", str(work / "repo")]
    cluster = ceph_cluster.load(ceph_dir)
    RBD_KEYS = f":conf={cluster.conf}:id={cluster.user}:keyring={cluster.keyring}"
    prefix = f"pipeline-{os.urandom(4).hex()}"  # this run's repository: a new state directory claims a new prefix
    url = f"rbd://{cluster.pool}?conf={cluster.conf}&id={cluster.user}&keyring={cluster.keyring}&prefix={prefix}"
    print(f"repository: {url} (state in {work / 'state'})")
    secrets = work / "secrets"
    offsite_target(cluster, secrets)
    return ["--repo", url, "--state-dir", str(work / "state"), "--secrets-dir", str(secrets)]


#: The nightly policy's offsite copy target (--ceph-dir): a bucket with Object Lock on the cluster's RGW.
COPY_TARGET: dict[str, Any] | None = None


def offsite_target(cluster: ceph_cluster.Cluster, secrets: Path) -> None:
    """Make a bucket with Object Lock on the cluster's RGW and the secret key's file (0600) in ``secrets``."""
    global COPY_TARGET
    import boto3  # the hub's S3 client too (docs/STORAGE.md)

    bucket = f"sendense-offsite-{os.urandom(4).hex()}"  # its own, also on a cluster that other runs share
    s3 = boto3.session.Session().client(
        "s3", endpoint_url=cluster.rgw_endpoint, region_name="us-east-1",
        aws_access_key_id=cluster.s3_access_key, aws_secret_access_key=cluster.s3_secret_key,
    )  # fmt: skip
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    secrets.mkdir(mode=0o700)
    secret = secrets / "rgw.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(f"{cluster.s3_secret_key}\n")
    COPY_TARGET = {"endpoint": cluster.rgw_endpoint, "bucket": bucket, "access_key": cluster.s3_access_key,
                   "secret_file": str(secret), "retain": 3600, "margin": 600, "lock_mode": "GOVERNANCE"}  # fmt: skip
    print(f"offsite copies: s3 bucket {bucket} at {cluster.rgw_endpoint} (Object Lock, GOVERNANCE, 1 h + 10 min)")


def start_stack(
    work: Path, size_mb: int, processes: list[subprocess.Popen[bytes]], repo: list[str]
) -> tuple[dict[str, Any], str]:
    """vcsim, the hub (with its SSH endpoint, on ``repo``), the node and its tunnel, as deployed; (vcsim's line,
    the hub API)."""
    vcsim_bin = subprocess.run(
        [str(ROOT / "simulator" / "build-vcsim.sh")], check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    proc, vc = start(
        [vcsim_bin, "-listen", f"{HUB}:0", "-state", str(work / "vcsim"), "-username", "backup",
         "-password", "s3cret", "-vm-disks", "2", "-disk-size-mb", str(size_mb)],
        "vcsim",
    )  # fmt: skip
    processes.append(proc)

    # Keys: the hub's host key (pinned by the node) and the node's client key.
    host_key, node_key = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    host_key.write_private_key(str(work / "hub_host_key"))
    node_key.write_private_key(str(work / "node_key"))
    (work / "authorized_keys").write_bytes(node_key.export_public_key())
    nbd_first, *_, api_port, ssh_port, node_reverse, node_port = free_ports(8)
    nbd_ports = f"{nbd_first}-{nbd_first + 3}"
    (work / "known_hosts").write_bytes(f"[{HUB}]:{ssh_port} ".encode() + host_key.export_public_key())
    (work / "vcenter.password").write_text("s3cret\n")
    os.chmod(work / "vcenter.password", 0o600)
    (work / "node.toml").write_text(
        f'[vcenter]\nendpoint = "{HUB}:{vc["port"]}"\nusername = "backup"\n'
        f'password_file = "{work / "vcenter.password"}"\nthumbprint = "{vc["thumbprintSha256"]}"\n'
        f'[vddk]\nplugin = "python {ROOT / "simulator" / "vddk_standin.py"}"\ntransports = "nbdssl:nbd"\n'
        f'[node]\nhub_url = "http://{NODE_SIDE}:{api_port}"\n'  # jobs report and write only to this hub
    )

    proc, hub = start(
        [str(BIN / "sendense-nbd"), "hub", *repo, "--listen", f"{HUB}:{api_port}",
         "--nbd-ports", nbd_ports, "--nbd-advertise", NODE_SIDE, "--public-url", f"http://{NODE_SIDE}:{api_port}",
         "--node-url", f"http://{HUB}:{node_reverse}", "--ssh-listen", f"{HUB}:{ssh_port}",
         "--ssh-host-key", str(work / "hub_host_key"), "--ssh-authorized-keys", str(work / "authorized_keys"),
         "--ssh-node-api", f"{HUB}:{node_reverse}"],
        "the hub",
    )  # fmt: skip
    processes.append(proc)
    print(f"hub: API {hub['listening']}, NBD ports {nbd_ports}, SSH {HUB}:{hub['ssh_port']}")
    proc, node = start(
        [str(BIN / "sendense-backup"), "node", "--config", str(work / "node.toml"),
         "--listen", f"{NODE_API}:{node_port}"],
        "the node",
    )  # fmt: skip
    processes.append(proc)
    proc, tunnel = start(
        [str(BIN / "sendense-backup"), "tunnel", "--hub", f"{HUB}:{ssh_port}", "--key", str(work / "node_key"),
         "--known-hosts", str(work / "known_hosts"), "--ports", nbd_ports, "--listen-host", NODE_SIDE,
         "--forward", f"{NODE_SIDE}:{api_port}={HUB}:{api_port}",
         "--remote-forward", f"{HUB}:{node_reverse}={NODE_API}:{node_port}"],
        "the tunnel",
    )  # fmt: skip
    processes.append(proc)
    print(f"node: API {node['listening']}; tunnel up: hub ports on {NODE_SIDE}, node API on the hub's side")

    return vc, f"http://{HUB}:{api_port}/api/v1"


def by_api(api: str, vc: dict[str, Any], vm: dict[str, Any], size: int, rng: random.Random, work: Path) -> None:
    """A full and an incremental backup asked for by ``POST /backups``, each point checked against its snapshot."""
    for key in (2000, 2001):
        for offset in range(0, size, 8 * MiB):
            vmdisk.write(vc["stateDir"], vm["moref"], key, offset, rng.randbytes(MiB))
    expected = {d["key"]: shutil.copyfile(d["path"], work / f"full-{d['key']}.raw") for d in vm["disks"]}
    verify(api, backup(api, "auto"), expected)

    vmdisk.write(vc["stateDir"], vm["moref"], 2000, 3 * MiB, rng.randbytes(256 * 1024))
    vmdisk.zero(vc["stateDir"], vm["moref"], 2000, 8 * MiB, MiB)
    vmdisk.write(vc["stateDir"], vm["moref"], 2001, size - MiB, rng.randbytes(4096))
    expected = {d["key"]: shutil.copyfile(d["path"], work / f"inc-{d['key']}.raw") for d in vm["disks"]}
    verify(api, backup(api, "auto"), expected)


def keep_running(console: str) -> None:
    """Leave every process up until Ctrl-C (``--keep``): the console shows what the run made."""
    host_port = console.removeprefix("http://").rstrip("/")
    print(
        f"--keep: the hub, node, tunnel and vcsim stay up; open {console} (from another machine:"
        f" ssh -L 8080:{host_port} this-host, then http://127.0.0.1:8080/). Ctrl-C stops them.",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64, help="size of each virtual disk")
    parser.add_argument("--workdir", type=Path, help="where to put everything (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="leave the hub and its console running until interrupted")
    parser.add_argument("--ceph-dir", type=Path, help="a running test Ceph cluster: the repository is an RBD pool")
    args = parser.parse_args()
    rng = random.Random(11)
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="sendense-pipeline-") as tmp:
        work = args.workdir or Path(tmp)
        shutil.rmtree(work / "run", ignore_errors=True)
        work = work / "run"
        (work / "vcsim").mkdir(parents=True)
        try:
            vc, api = start_stack(work, args.size_mb, processes, repository(work, args.ceph_dir))
            vm = next(v for v in vc["vms"] if v["path"] == VM_PATH)
            by_api(api, vc, vm, args.size_mb * MiB, rng, work)
            operate(api, vc, rng)
            if COPY_TARGET is not None:
                offsite(api)
            console = api.removesuffix("/api/v1") + "/"
            print(f"web console: {console} (no login: this hub listens on loopback without a token)")
            if args.keep:
                keep_running(console)
        finally:
            for proc in reversed(processes):
                proc.terminate()
                proc.wait(30)
    print("Pipeline (hub, node, SSH tunnel, simulated VM), full then incremental, by API and by policy: verified: OK")


if __name__ == "__main__":
    sys.exit(main())
