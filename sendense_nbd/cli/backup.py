"""``sendense-backup``: the VMware-side backup client."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from sendense_nbd import __version__
from sendense_nbd.backup.records import Mode
from sendense_nbd.cli.service import ready_then_wait
from sendense_nbd.errors import BackupError, HubApiError, SendenseError, SnapshotNotRemoved, VSphereError
from sendense_nbd.tunnel.cli import tunnel_command
from sendense_nbd.vmware.session import Endpoint, read_password

if TYPE_CHECKING:
    from sendense_nbd.backup import BackupSettings, HubSettings
    from sendense_nbd.node.config import NodeConfig

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

#: The exit status of a failed job by error type, the first match wins (documented in EXIT_CODES above).
#: A BackupError also matches through its ``reason``: the hub or vSphere failing at some stage.
EXIT_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (SnapshotNotRemoved, 5),
    (HubApiError, 4),
    (VSphereError, 3),
    (SendenseError, 1),
    (OSError, 1),
)

NBDKIT_EXAMPLE = """\b
The disk source, one per disk (the password comes from an inherited pipe, never argv or disk):
  nbdkit --exit-with-parent --readonly --foreground --unix SOCK --pidfile PID \\
    vddk server=VCENTER user=USER password=-FD thumbprint=AA:BB:... \\
    vm=moref=vm-42 snapshot=snapshot-7 file='[datastore1] vm/vm.vmdk' \\
    [port=P] [libdir=/opt/vmware-vix-disklib-distrib] [transports=nbdssl:nbd] [compression=zlib]
--nbdkit and --vddk-plugin replace "nbdkit" and "vddk" (e.g. a stand-in plugin in tests).
"""


def _plugin_words(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--vddk-plugin`` must split into shell words, checked as the node checks ``[vddk] plugin``."""
    from sendense_nbd.backup import VddkSettings

    try:
        VddkSettings(plugin=value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


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


def _vddk_options(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` items as pairs."""
    options = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--vddk-option")
        options.append((key, value))
    return tuple(options)


def _hub_settings(url: str | None, *, token_file: str | None, retries: int) -> HubSettings | None:
    """The hub API's settings (None without a URL); the token from ``token_file``, else ``$OMA_API_TOKEN``.

    The token file is read even without a URL, so a bad one is reported all the same (OSError).
    """
    from sendense_nbd.backup import HubSettings

    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token: str | None = f.read().strip()
    else:
        token = os.environ.get("OMA_API_TOKEN") or None
    return HubSettings(url, token=token, retries=retries) if url else None


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
        """A decision or an error: a JSON line, else a line on stderr."""
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
@click.option(
    "--nbd-targets",
    callback=lambda _context, _param, text: _parse_targets(text),
    help="One target per disk: KEY=nbd://host:port/export[,KEY=...] (multi-disk VMs).",
)
@click.option("--job-id", required=True, help="Names the snapshot (sbak-JOB) and the job at the hub.")
@click.option("--mode", type=click.Choice([mode.value for mode in Mode]), default="auto", show_default=True)
@click.option("--quiesce", is_flag=True, help="Quiesce the guest file systems (VMware Tools) for the snapshot.")
@click.option("--connections", type=click.IntRange(1, 16), default=4, show_default=True, help="Per disk and side.")
@click.option("--requests", type=click.IntRange(1, 256), default=16, show_default=True, help="Per connection.")
@click.option(
    "--merge-gap",
    type=click.IntRange(0, 1 << 30),
    default=0,
    show_default=True,
    help="Bytes: CBT areas closer than this are copied as one. 0 sends only changed bytes (WAN); 1048576 suits a LAN.",
)
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
@click.option(
    "--vddk-option",
    "vddk_options",
    multiple=True,
    callback=lambda _context, _param, values: _vddk_options(values),
    help="Another vddk KEY=VALUE (config, cookie, ...).",
)
@click.option("--nbdkit", default="nbdkit", show_default=True, help="The nbdkit command.")
@click.option(
    "--vddk-plugin", default="vddk", show_default=True, callback=_plugin_words, help="The plugin and its leading args."
)
def migrate(
    vmware_endpoint: str,
    vmware_username: str,
    vmware_password_file: str | None,
    vmware_thumbprint: str | None,
    vmware_ca_file: str | None,
    vmware_path: str,
    nbd_host: str,
    nbd_port: int,
    nbd_export_name: str,
    nbd_targets: dict[int | None, str],
    job_id: str,
    mode: str,
    quiesce: bool,
    connections: int,
    requests: int,
    merge_gap: int,
    verify: bool,
    json_lines: bool,
    api_url: str | None,
    api_token_file: str | None,
    api_retries: int,
    state_file: str,
    vddk_libdir: str | None,
    vddk_transports: str | None,
    vddk_compression: str | None,
    vddk_thumbprint: str | None,
    vddk_options: tuple[tuple[str, str], ...],
    nbdkit: str,
    vddk_plugin: str,
) -> None:
    """Back up one VM: snapshot, copy each disk (full or CBT-incremental) into its NBD target, record change IDs."""
    from sendense_nbd.backup import BackupSettings, BackupSpec, VddkSettings

    spec = BackupSpec(
        job_id=job_id,
        vm_path=vmware_path,
        targets=nbd_targets or {None: f"nbd://{_host(nbd_host)}:{nbd_port}/{nbd_export_name}"},
        mode=Mode(mode),
        quiesce=quiesce,
        connections=connections,
        requests=requests,
        merge_gap=merge_gap,
        verify=verify,
    )
    vddk = VddkSettings(
        thumbprint=vddk_thumbprint, libdir=vddk_libdir, transports=vddk_transports or "", compression=vddk_compression,
        nbdkit=nbdkit, plugin=vddk_plugin, options=vddk_options,
    )  # fmt: skip

    def settings() -> BackupSettings:  # called in the job's error handling: reading a secret may fail
        password = read_password(vmware_password_file)
        endpoint = Endpoint.parse(vmware_endpoint, thumbprint=vmware_thumbprint, ca_file=vmware_ca_file)
        hub = _hub_settings(api_url, token_file=api_token_file, retries=api_retries)
        return BackupSettings(spec, endpoint, vmware_username, password, vddk=vddk, hub=hub, state_file=state_file)

    sys.exit(asyncio.run(_migrate(settings, json_lines=json_lines)))


async def _migrate(settings: Callable[[], BackupSettings], *, json_lines: bool) -> int:
    """Run the job ``settings()`` describes; its exit status (see :data:`EXIT_STATUS`).

    ``settings`` is called here, so a secret that cannot be read is reported like any other failure.
    """
    from sendense_nbd.backup import BackupJob, prepare

    out = _Output(json_lines)
    received = _cancel_on_signals()
    job: BackupJob | None = None
    try:
        job = prepare(settings(), listeners=(out,))
        result = await job.run(on_note=out.note)
    except asyncio.CancelledError:
        out.note("interrupted; the snapshot was removed and nothing was recorded")
        return 130 if received and received[0] == signal.SIGINT else 143
    except (SendenseError, OSError) as exc:
        if isinstance(exc, BackupError):
            out.note(f"error: backup failed at stage {exc.stage!r}: {exc}")
        else:
            out.note(f"error: {exc}")
        return exit_status(exc)
    finally:
        if job is not None:
            await job.close()
    for disk in result.disks:
        out.note(
            f"disk {disk.disk_key}: {disk.sync_type.value} backup done, {disk.bytes_transferred} bytes copied, "
            f"change ID {disk.change_id}"
        )
    return 0


def exit_status(error: SendenseError | OSError) -> int:
    """The exit status of a job that failed with ``error``: the first row of :data:`EXIT_STATUS` it matches."""
    reason = error.reason if isinstance(error, BackupError) else None
    return next(status for kind, status in EXIT_STATUS if isinstance(error, kind) or isinstance(reason, kind))


def _cancel_on_signals() -> list[int]:
    """SIGINT and SIGTERM cancel the running task (the job cleans up); the signals received, in order."""
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(number: int) -> None:
        received.append(number)
        task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return received


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


async def _serve_node(config: NodeConfig, host: str, port: int) -> None:
    """Serve the node API until SIGINT or SIGTERM; then cancel the node's jobs and wait for them."""
    from aiohttp import web

    from sendense_nbd.node.api import build_app
    from sendense_nbd.node.service import Node

    service = Node(config)
    runner = web.AppRunner(build_app(service, token=config.token), access_log=None)
    await runner.setup()
    try:
        await service.start()
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1] if runner.addresses else port
        await ready_then_wait({"listening": f"http://{host}:{bound}", "max_jobs": config.max_jobs})
    finally:
        service.close()
        await service.wait_closed()
        await runner.cleanup()


cli.add_command(tunnel_command)


def _host(host: str) -> str:
    """``--nbd-host`` as it goes in the target's URI (:func:`~sendense_nbd.client.uri.uri_host`), read as the
    hub and node read hosts (:func:`~sendense_nbd.client.uri.normal_host`: ``[::1]`` and ``::1`` alike)."""
    from sendense_nbd.client.uri import normal_host, uri_host
    from sendense_nbd.errors import URIError

    try:
        return uri_host(normal_host(host, "--nbd-host"))
    except URIError as exc:
        raise click.BadParameter(str(exc), param_hint="--nbd-host") from None


def main() -> None:
    """The ``sendense-backup`` command."""
    cli(prog_name="sendense-backup")
