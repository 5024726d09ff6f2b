"""The whole pipeline on one machine, for the tests that need it (the pipeline's, the console's): vcsim, the hub
(with its SSH endpoint), the node, and the node's SSH tunnel carrying the hub's NBD ports and API to the node and the
node API back to the hub. A delay relay (tests/pipeline/relay.py) may sit between the tunnel and the hub's SSH
endpoint, as a WAN.

Addresses keep the two sides apart: the hub listens on 127.0.0.1; the node and the tunnel's local
ends on 127.0.0.2 (so the node reaches the hub only through the tunnel); the node API on 127.0.0.3,
reached by the hub only through the reverse forward.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncssh

from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess, free_port_range
from tests.node.test_node import NodeProcess, write_config
from tests.pipeline.relay import DelayRelay

MIB = 1 << 20
VM_PATH = "/DC0/vm/DC0_H0_VM0"
HUB, NODE_SIDE, NODE_API_HOST = "127.0.0.1", "127.0.0.2", "127.0.0.3"


class TunnelProcess:
    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if not line or not json.loads(line).get("connected"):
            self.proc.kill()
            raise AssertionError(f"the tunnel did not come up: {line!r} {self.proc.communicate()[1].decode()}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def delayed_nbdkit(directory: Path) -> Path:
    """An ``nbdkit`` wrapper adding the delay filter while ``directory/read-delay`` names a delay (``3``, ``300ms``):
    every read of the plugin then takes that long. Read at each start, so it changes the node's next disk sources."""
    wrapper = directory / "nbdkit-delayed"
    nbdkit, switch = require("nbdkit"), directory / "read-delay"
    wrapper.write_text(
        f'#!/bin/sh\ndelay=$(cat "{switch}" 2>/dev/null)\n[ -n "$delay" ] || exec {nbdkit} "$@"\n'
        f'exec {nbdkit} --filter=delay "$@" rdelay="$delay"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


class Pipeline:
    """Keys, the node, the hub and the tunnel.

    ``slow_source`` makes every disk read take 3 s (``read_delay`` changes it for later jobs); ``rtt`` (seconds) puts
    a delay relay adding that round trip between the tunnel and the hub's SSH endpoint; ``token`` guards the hub's
    API (``--token-file``), the node then calling it with that token too; ``node_extra``: more of the node's [node]
    settings (``requests = 1``). ``node``: another pipeline's node (this hub's tunnel is then a second one of that
    node, left running by :meth:`close`), and ``side`` the address of this tunnel's ends on the node's side."""

    def __init__(
        self,
        root: Path,
        vcsim: dict[str, Any],
        hub_factory: Callable[..., HubProcess],
        *,
        slow_source: bool = True,
        rtt: float | None = None,
        token: str | None = None,
        node_extra: str = "",
        node: NodeProcess | None = None,
        side: str = NODE_SIDE,
    ) -> None:
        self.root, self.vcsim, self.token, self.side = root, vcsim, token, side
        keys = root / "keys"
        keys.mkdir()
        host_key, client_key = (
            asyncssh.generate_private_key("ssh-ed25519"),
            asyncssh.generate_private_key("ssh-ed25519"),
        )
        host_key.write_private_key(str(keys / "host"))
        client_key.write_private_key(str(keys / "client"))
        (keys / "authorized_keys").write_bytes(client_key.export_public_key())
        self.client_key = keys / "client"
        ports = free_port_range(7)
        self.nbd_ports = ports[:4]
        api_port, ssh_port, node_reverse = ports[4:]
        self.ssh_port, self.api_port, self.node_reverse = ssh_port, api_port, node_reverse
        self.read_delay = "3" if slow_source else None
        self.own_node = node is None
        self.node = node or NodeProcess(self._node_config(keys, node_extra), listen=f"{NODE_API_HOST}:0")
        self.hub = hub_factory(
            f"http://{HUB}:{node_reverse}",
            "--listen", f"{HUB}:{api_port}", "--nbd-advertise", side,
            "--public-url", f"http://{side}:{api_port}",
            "--ssh-listen", f"{HUB}:{ssh_port}", "--ssh-host-key", str(keys / "host"),
            "--ssh-authorized-keys", str(keys / "authorized_keys"), "--ssh-node-api", f"{HUB}:{node_reverse}",
            "--job-timeout", "15",
            *(["--token-file", str(keys / "hub.token")] if token is not None else []),
            ports=self.nbd_ports, repo=root / "repo",
        )  # fmt: skip
        self.api = Api(self.hub.url, token)
        self.relay = DelayRelay((HUB, ssh_port), rtt=rtt).start() if rtt is not None else None
        # The tunnel reaches the SSH endpoint directly, or through the relay (then known by the relay's port).
        self.endpoint_port = self.relay.port if self.relay is not None else ssh_port
        self.known_hosts = keys / "known_hosts"
        self.known_hosts.write_bytes(f"[{HUB}]:{self.endpoint_port} ".encode() + host_key.export_public_key())
        try:
            self.tunnel = self.start_tunnel()
        except BaseException:
            self.close(tunnel=False)
            raise

    def _node_config(self, keys: Path, extra: str) -> Path:
        """The node's config: the delayed nbdkit, the hub's token when it has one (also written for the hub), and
        ``extra`` lines of its [node] section."""
        if self.token is not None:
            token_file = keys / "hub.token"
            token_file.write_text(self.token + "\n")
            token_file.chmod(0o600)
            extra += f'\nhub_token_file = "{token_file}"'
        node_dir = self.root / "node"
        node_dir.mkdir()
        return write_config(node_dir, self.vcsim, nbdkit=str(delayed_nbdkit(self.root)), extra=extra)

    @property
    def read_delay(self) -> str | None:
        """How long each disk read of the jobs started from now on takes (``"3"`` s, ``"300ms"``); None: no delay."""
        switch = self.root / "read-delay"
        return (switch.read_text().strip() or None) if switch.exists() else None

    @read_delay.setter
    def read_delay(self, delay: str | None) -> None:
        (self.root / "read-delay").write_text(delay or "")

    def close(self, *, tunnel: bool = True) -> None:
        """Stop the tunnel, the node (unless another pipeline's) and the relay (the hub fixture stops the hub)."""
        if tunnel:
            self.tunnel.kill()
        if self.own_node:
            self.node.stop()
        if self.relay is not None:
            self.relay.close()

    def start_tunnel(self) -> TunnelProcess:
        node_port = self.node.url.rsplit(":", 1)[1]
        return TunnelProcess([
            str(Path(sys.executable).parent / "sendense-backup"), "tunnel",
            "--hub", f"{HUB}:{self.endpoint_port}", "--key", str(self.client_key),
            "--known-hosts", str(self.known_hosts),
            "--ports", f"{self.nbd_ports.start}-{self.nbd_ports.stop - 1}", "--listen-host", self.side,
            "--dest-host", HUB, "--forward", f"{self.side}:{self.api_port}={HUB}:{self.api_port}",
            "--remote-forward", f"{HUB}:{self.node_reverse}={NODE_API_HOST}:{node_port}",
            "--connections", "2", "--backoff-max", "2",
        ])  # fmt: skip

    def disk_copies(self, name: str, vm_path: str = VM_PATH) -> dict[int, Path]:
        """Copies of the VM's disks now (vcsim's files), by disk key."""
        vm = next(v for v in self.vcsim["vms"] if v["path"] == vm_path)
        copies = {}
        for disk in vm["disks"]:
            copies[disk["key"]] = self.root / f"{name}-{disk['key']}.raw"
            shutil.copyfile(disk["path"], copies[disk["key"]])
        return copies

    def verify(self, job: dict[str, Any], expected: dict[int, Path], vm_path: str = VM_PATH) -> None:
        """The job's restore points are sound and hold exactly ``expected``'s bytes."""
        status, answer = self.api.call("GET", "/points?" + urlencode({"vm_path": vm_path}))
        assert status == 200, answer
        for disk in job["detail"]["disks"]:
            point = next(p for p in answer["points"] if p["id"] == disk["point_id"])
            run(require("qemu-img"), "check", point["path"])
            run(require("qemu-img"), "compare", "-F", "raw", point["path"], str(expected[disk["disk_key"]]))
