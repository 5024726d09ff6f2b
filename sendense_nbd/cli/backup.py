"""``sendense-backup``: the VMware-side backup client."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from typing import Any

import click

from sendense_nbd import __version__
from sendense_nbd.cli.service import ready_then_wait
from sendense_nbd.tunnel.cli import tunnel_command

EXIT_CODES = """\b
Exit status:
  0    the backup completed; its change IDs are recorded
  1    the backup failed (source, target or copy); nothing was recorded
  2    bad usage
  3    vSphere failed (login, TLS, inventory, snapshot, CBT); nothing was recorded
  4    the hub API failed; nothing was recorded
  5    the data was copied but the snapshot could not be removed; nothing was recorded
       (the next run removes it)
  130  interrupted (SIGINT), 143 terminated (SIGTERM); the snapshot was removed
"""

NBDKIT_EXAMPLE = """\b
The disk source, one per disk (the password comes from an inherited pipe, never argv or disk):
  nbdkit --exit-with-parent --readonly --foreground --unix SOCK --pidfile PID \\
    vddk server=VCENTER user=USER password=-FD thumbprint=AA:BB:... \\
    vm=moref=vm-42 snapshot=snapshot-7 file='[datastore1] vm/vm.vmdk' \\
    [port=P] [libdir=/opt/vmware-vix-disklib-distrib] [transports=nbdssl:nbd] [compression=zlib]
--nbdkit and --vddk-plugin replace "nbdkit" and "vddk" (e.g. a stand-in plugin in tests).
"""


def _parse_targets(text: str | None) -> dict[int | None, str]:
    """``KEY=URI[,KEY=URI...]`` (``KEY:URI`` as the seed system wrote it is accepted too)."""
    targets: dict[int | None, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, uri = item.partition("=")
        if not sep or not key.strip().isdigit():
            key, sep, uri = item.partition(":")
        if not sep or not key.strip().isdigit() or "://" not in uri:
            raise click.BadParameter(f"{item!r}: expected DISK_KEY=nbd://host:port/export", param_hint="--nbd-targets")
        if int(key) in targets:
            raise click.BadParameter(f"disk key {key} is given twice", param_hint="--nbd-targets")
        targets[int(key)] = uri.strip()
    return targets


def _read_secret(path: str | None, env: str) -> str | None:
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get(env) or None


class _Output:
    """Progress: a bar on a stderr TTY, else JSON lines on stdout (always with --json)."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines or not sys.stderr.isatty()
        self._bar: Any = None
        self._last = ""

    def __call__(self, report: dict[str, object]) -> None:
        if self.json_lines:
            line = json.dumps(report, sort_keys=True)
            if line != self._last:
                self._last = line
                click.echo(line)
            return
        percent = float(report["percent"])  # type: ignore[arg-type]
        if self._bar is None:
            self._bar = click.progressbar(length=1000, file=sys.stderr, label=str(report["stage"]))
            self._bar.__enter__()
        self._bar.label = f"{report['stage']:<16} {int(report['throughput_bps']) / 1e6:7.1f} MB/s"  # type: ignore[call-overload]
        self._bar.update(int(percent * 10) - self._bar.pos)
        if report["status"] != "running":
            self._bar.__exit__(None, None, None)
            self._bar = None

    def note(self, message: str) -> None:
        if self.json_lines:
            click.echo(json.dumps({"note": message}))
        else:
            click.echo(f"sendense-backup: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
def cli(verbose: int) -> None:
    """Back up VMware VMs into a sendense hub over NBD."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@cli.command(epilog=NBDKIT_EXAMPLE + "\n" + EXIT_CODES)
@click.option("--vmware-endpoint", required=True, envvar="VMWARE_ENDPOINT", help="vCenter/ESXi: host[:port].")
@click.option("--vmware-username", required=True, envvar="VMWARE_USERNAME")
@click.option(
    "--vmware-password-file",
    type=click.Path(dir_okay=False),
    help="File holding the password (else $VMWARE_PASSWORD, else a prompt on a TTY).",
)
@click.option("--vmware-thumbprint", help="Pin vCenter's certificate (SHA-1 or SHA-256) instead of verifying it.")
@click.option("--vmware-ca-file", type=click.Path(dir_okay=False), help="CA bundle to verify vCenter against.")
@click.option("--vmware-path", required=True, help="The VM's inventory path: /Datacenter/vm/folder/name.")
@click.option("--nbd-host", default="127.0.0.1", show_default=True)
@click.option("--nbd-port", type=click.IntRange(1, 65535), default=10808, show_default=True)
@click.option("--nbd-export-name", default="", help="Export name on the target server (default '').")
@click.option("--nbd-targets", help="One target per disk: KEY=nbd://host:port/export[,KEY=...] (multi-disk VMs).")
@click.option("--job-id", required=True, help="Names the snapshot (sbak-JOB) and the job at the hub.")
@click.option("--mode", type=click.Choice(["full", "incremental", "auto"]), default="auto", show_default=True)
@click.option("--quiesce", is_flag=True, help="Quiesce the guest file systems (VMware Tools) for the snapshot.")
@click.option("--connections", type=click.IntRange(1, 16), default=4, show_default=True, help="Per disk and side.")
@click.option("--requests", type=click.IntRange(1, 256), default=16, show_default=True, help="Per connection.")
@click.option("--verify", is_flag=True, help="Re-read source and target and compare digests per chunk.")
@click.option("--json", "json_lines", is_flag=True, help="JSON lines on stdout (the default when not on a TTY).")
@click.option("--api-url", envvar="OMA_API_URL", help="Hub API base URL [env OMA_API_URL]; none: standalone.")
@click.option("--api-token-file", type=click.Path(dir_okay=False), help="Bearer token file [else env OMA_API_TOKEN].")
@click.option(
    "--api-retries",
    type=click.IntRange(0, 20),
    default=3,
    show_default=True,
    help="Retries of a failed hub API call (backoff 0.5 s, doubling); the final report gets 2 more.",
)
@click.option(
    "--state-file",
    default=os.path.expanduser("~/.local/state/sendense/changeids.json"),
    show_default=True,
    help="Standalone change-ID store (used without --api-url).",
)
@click.option("--vddk-libdir", help="VDDK install directory (libdir=).")
@click.option("--vddk-transports", help="transports=, e.g. hotadd:nbdssl:nbd.")
@click.option("--vddk-compression", type=click.Choice(["none", "zlib", "fastlz", "skipz"]))
@click.option("--vddk-thumbprint", help="thumbprint= for vddk (default: the SHA-1 of vCenter's certificate).")
@click.option("--vddk-option", "vddk_options", multiple=True, help="Another vddk KEY=VALUE (config, cookie, ...).")
@click.option("--nbdkit", default="nbdkit", show_default=True, help="The nbdkit command.")
@click.option("--vddk-plugin", default="vddk", show_default=True, help="The plugin and its leading args.")
def migrate(**options: Any) -> None:
    """Back up one VM: snapshot, copy each disk (full or CBT-incremental) into its NBD target, record change IDs."""
    sys.exit(asyncio.run(_migrate(options)))


async def _migrate(o: dict[str, Any]) -> int:
    from sendense_nbd.backup import BackupSpec, HubApi, JobProgress, Mode, StateFile, run_backup
    from sendense_nbd.errors import BackupError, HubApiError, SendenseError, VSphereError
    from sendense_nbd.vmware.session import Endpoint, connect, read_password
    from sendense_nbd.vmware.vddk import vddk_config

    out = _Output(o["json_lines"])
    targets = _parse_targets(o["nbd_targets"])
    if not targets:
        targets = {None: f"nbd://{_host(o['nbd_host'])}:{o['nbd_port']}/{o['nbd_export_name']}"}
    extra = []
    for item in o["vddk_options"]:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--vddk-option")
        extra.append((key, value))

    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(number: int) -> None:
        received.append(number)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    store: HubApi | StateFile | None = None
    try:
        password = read_password(o["vmware_password_file"])
        endpoint = Endpoint.parse(o["vmware_endpoint"], thumbprint=o["vmware_thumbprint"], ca_file=o["vmware_ca_file"])
        token = _read_secret(o["api_token_file"], "OMA_API_TOKEN")
        store = (
            HubApi(o["api_url"], token=token, retries=o["api_retries"]) if o["api_url"] else StateFile(o["state_file"])
        )
        vddk = await vddk_config(
            endpoint,
            o["vmware_username"],
            thumbprint=o["vddk_thumbprint"],
            libdir=o["vddk_libdir"],
            transports=o["vddk_transports"] or "",
            compression=o["vddk_compression"],
            nbdkit=o["nbdkit"],
            plugin=o["vddk_plugin"],
            extra=extra,
        )
        spec = BackupSpec(
            job_id=o["job_id"],
            vm_path=o["vmware_path"],
            targets=targets,
            vddk=vddk,
            password=password,
            mode=Mode(o["mode"]),
            quiesce=o["quiesce"],
            connections=o["connections"],
            requests=o["requests"],
            verify=o["verify"],
        )
        progress = JobProgress(
            spec.job_id,
            functools.partial(store.progress, spec.job_id) if isinstance(store, HubApi) else None,
            listeners=(out,),
            final_retries=o["api_retries"] + 2,
        )
        vsphere = await connect(endpoint, o["vmware_username"], password)
        try:
            result = await run_backup(spec, vsphere, store, progress, on_note=out.note)
        finally:
            await asyncio.shield(vsphere.close())
    except asyncio.CancelledError:
        out.note("interrupted; the snapshot was removed and nothing was recorded")
        return 130 if received and received[0] == signal.SIGINT else 143
    except BackupError as exc:
        out.note(f"error: backup failed at stage {exc.stage!r}: {exc}")
        cause = exc.__cause__
        if isinstance(cause, HubApiError):
            return 4
        if exc.stage == "finalizing" and isinstance(cause, VSphereError):
            return 5
        if isinstance(cause, VSphereError):
            return 3
        return 1
    except HubApiError as exc:
        out.note(f"error: {exc}")
        return 4
    except VSphereError as exc:
        out.note(f"error: {exc}")
        return 3
    except (SendenseError, OSError) as exc:
        out.note(f"error: {exc}")
        return 1
    finally:
        if store is not None:
            await store.close()
    for disk in result.disks:
        out.note(
            f"disk {disk.disk_key}: {disk.sync_type.value} backup done, {disk.bytes_transferred} bytes copied, "
            f"change ID {disk.change_id}"
        )
    return 0


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="The node's TOML file.")
@click.option("--listen", help="API address HOST:PORT (default: the config's, else 127.0.0.1:8081).")
def node(config_path: str, listen: str | None) -> None:
    """Run the node API (default port 8081): the hub posts backup jobs, the node runs them in-process.

    vCenter credentials come from the config file (see docs/NODE_API.md), never from the API.
    """
    from sendense_nbd.errors import SendenseError
    from sendense_nbd.http_api import is_loopback
    from sendense_nbd.node.config import load

    try:
        config = load(config_path)
    except SendenseError as exc:
        raise click.ClickException(str(exc)) from exc
    host, _, port = (listen or config.listen).rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{listen or config.listen!r}: expected HOST:PORT", param_hint="--listen")
    if config.token is None and not is_loopback(host):
        raise click.UsageError(f"{host} is not loopback: set [node] token_file in {config_path}")
    asyncio.run(_serve_node(config, host.strip("[]"), int(port)))


async def _serve_node(config: Any, host: str, port: int) -> None:
    from aiohttp import web

    from sendense_nbd.node.api import build_app
    from sendense_nbd.node.service import Node

    service = Node(config)
    runner = web.AppRunner(build_app(service, token=config.token), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1] if runner.addresses else port
        await ready_then_wait({"listening": f"http://{host}:{bound}", "max_jobs": config.max_jobs})
    finally:
        await service.close()
        await runner.cleanup()


cli.add_command(tunnel_command)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def main() -> None:
    cli(prog_name="sendense-backup")
