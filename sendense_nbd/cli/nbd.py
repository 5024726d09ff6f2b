"""``sendense-nbd``: serve and create images (qemu-nbd / qemu-img style)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import os
import re
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import click

from sendense_nbd import __version__
from sendense_nbd.cli.copies import copies_group
from sendense_nbd.cli.copy import copy_command
from sendense_nbd.cli.db import db_group
from sendense_nbd.cli.hub import hub_command, node_group, points_command, ports_command, restore_command
from sendense_nbd.cli.policy import policy_group, status_command
from sendense_nbd.cli.tls import tls_group
from sendense_nbd.cli.verify import verify_command
from sendense_nbd.errors import SendenseError
from sendense_nbd.protocol.constants import DEFAULT_PORT, TLSMode
from sendense_nbd.storage import BlockDevice, CacheMode, DetectZeroes, Discard, ImageFormat
from sendense_nbd.tunnel.cli import tunnel_server_command

if TYPE_CHECKING:
    import ssl

    from sendense_nbd.server import Export, NBDServer

# Each command imports the parts it uses: `copy` between two NBD servers
# needs neither the server nor the storage backends, and starts faster.

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtTpPeE]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str) -> int:
    """qemu-img sizes: bytes, or a k/M/G/T/P/E suffix (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size such as 10G or 1048576")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _choice(enum_type: type[enum.Enum]) -> click.Choice[str]:
    return click.Choice([member.value for member in enum_type])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
def cli(verbose: int) -> None:
    """Serve and create disk images over NBD."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="sendense-nbd: %(levelname)s: %(message)s")


@cli.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option(
    "-f", "--format", "fmt", type=_choice(ImageFormat), help="Image format; probed (never as qcow2-as-raw) if omitted."
)
@click.option(
    "-b",
    "--bind",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Unlike qemu-nbd (all interfaces), loopback by default.",
)
@click.option(
    "-p",
    "--port",
    type=int,
    default=DEFAULT_PORT,
    show_default=True,
    help="TCP port; 0 picks a free one and prints it.",
)
@click.option("-k", "--socket", "socket_path", help="Listen on this unix socket instead of TCP.")
@click.option(
    "-x",
    "--export-name",
    "names",
    multiple=True,
    help="Export name, once per IMAGE in order (default: '' for the first).",
)
@click.option("-D", "--description", "descriptions", multiple=True, help="Export description, once per IMAGE in order.")
@click.option("-e", "--shared", type=int, default=1, show_default=True, help="Maximum simultaneous clients.")
@click.option("-t", "--persistent", is_flag=True, help="Keep serving after the last client disconnects.")
@click.option(
    "--handshake-limit",
    type=click.FloatRange(min=0),
    default=10,
    show_default=True,
    metavar="SECONDS",
    help="Drop a connection that has not picked an export in this time (0: no limit).",
)
@click.option(
    "--io-timeout",
    type=click.FloatRange(min=0),
    default=60,
    show_default=True,
    metavar="SECONDS",
    help="Drop a client whose WRITE payload, or reading of replies, makes no progress in this time (0: never).",
)
@click.option(
    "--max-handshakes",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Connections still negotiating at once; more are closed at once.",
)
@click.option(
    "--congestion",
    default="bbr",
    show_default=True,
    metavar="NAME|system",
    help="TCP congestion control of accepted connections ('system': the kernel's default).",
)
@click.option(
    "--tls",
    type=click.Choice(["off", "allow", "require"]),
    help="NBD_OPT_STARTTLS: off refuses it, allow serves plaintext and TLS clients, require serves only TLS "
    "clients. Default: require with --tls-creds, else off.",
)
@click.option(
    "--tls-creds",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="x509 credentials: a directory with ca-cert.pem, server-cert.pem and server-key.pem (qemu's layout; "
    "qemu-nbd takes the ID of a --object tls-creds-x509,dir=DIR, we take DIR itself); or, like tls-creds-psk, "
    "one with keys.psk (TLS-PSK needs Python 3.13+). Refused with --tls off.",
)
@click.option(
    "--tls-verify-client",
    is_flag=True,
    help="Mutual TLS: clients must present a certificate signed by DIR/ca-cert.pem (needs --tls require).",
)
@click.option("-r", "--read-only", "readonly", is_flag=True, help="Export read-only.")
@click.option("-A", "--allocation-depth", is_flag=True, help="Also offer the qemu:allocation-depth meta context.")
@click.option("--cache", type=_choice(CacheMode), default="writeback", show_default=True, help="Host page-cache mode.")
@click.option("--discard", type=_choice(Discard), default="ignore", show_default=True, help="Whether TRIM frees space.")
@click.option(
    "--detect-zeroes",
    type=_choice(DetectZeroes),
    default="off",
    show_default=True,
    help="Turn all-zero writes into zero requests.",
)
@click.option(
    "--aio",
    type=click.Choice(["threads", "native", "io_uring"]),
    help="Accepted for qemu-nbd compatibility; I/O always uses threads.",
)
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Write the server's PID here.")
@click.option("--fork", is_flag=True, help="Return once the server is listening; it keeps running in the background.")
def serve(**options: Any) -> None:
    """Serve IMAGE(s) over NBD, as a drop-in for qemu-nbd.

    Systemd socket activation (LISTEN_FDS) takes precedence over --bind,
    --port and --socket. SIGTERM and SIGINT finish the requests in flight,
    flush, and exit 0.
    """
    _serve_images(_ServeOptions(**options))


def _congestion(name: str | None) -> str | None:
    return None if name in (None, "", "system") else name


@attrs.frozen(kw_only=True)
class _ServeOptions:
    """The options of ``serve``, converted to their types."""

    images: tuple[str, ...] = attrs.field(converter=tuple)
    fmt: ImageFormat | None = attrs.field(converter=attrs.converters.optional(ImageFormat))
    bind: str
    port: int
    socket_path: str | None
    names: tuple[str, ...] = attrs.field(converter=tuple)
    descriptions: tuple[str, ...] = attrs.field(converter=tuple)
    shared: int
    persistent: bool
    handshake_limit: float
    io_timeout: float
    max_handshakes: int
    #: None: the system's congestion control.
    congestion: str | None = attrs.field(converter=_congestion)
    tls: str | None
    tls_creds: str | None
    tls_verify_client: bool
    readonly: bool
    allocation_depth: bool
    cache: CacheMode = attrs.field(converter=CacheMode)
    discard: Discard = attrs.field(converter=Discard)
    detect_zeroes: DetectZeroes = attrs.field(converter=DetectZeroes)
    #: Accepted for qemu-nbd compatibility and not used: I/O always uses threads.
    aio: str | None
    pid_file: str | None
    fork: bool


def _serve_images(o: _ServeOptions) -> None:
    """Check the options, (fork,) open the images, listen and serve until stopped; close every image at the end.

    Usage errors and the TLS credentials are checked before ``--fork`` (a usage error exits 2 from the
    command itself), and systemd's sockets are taken then (``LISTEN_PID`` names this process, not the
    child). The images are opened after it, as qemu-nbd does: librados (rbd:) cannot cross a fork.
    """
    from sendense_nbd.server import systemd_sockets

    if len(o.names) > len(o.images) or len(o.descriptions) > len(o.images):
        raise click.UsageError("more --export-name/--description values than images")
    devices: list[BlockDevice] = []
    failure, pid_written = None, False
    try:
        tls, tls_context = _tls_settings(o)
        inherited = systemd_sockets()
        detach = _fork() if o.fork else None
        exports = _open_exports(o, devices)
        sockets = inherited or _listen(o.bind, o.port, o.socket_path)
        if detach is not None:
            _detach(detach, o.pid_file)
        elif o.pid_file:
            _write_pid(o.pid_file)
        pid_written = bool(o.pid_file)
        _run_server(o, exports, sockets, tls, tls_context)
    except SendenseError as exc:
        failure = str(exc)
    finally:
        problems = _close_devices(devices)
        if o.pid_file and pid_written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(o.pid_file)
    messages = [m for m in (failure, *problems) if m]
    if messages:
        raise click.ClickException("; ".join(messages))


def _run_server(
    o: _ServeOptions, exports: list[Export], sockets: list[socket.socket], tls: TLSMode, context: ssl.SSLContext | None
) -> None:
    """Serve ``exports`` on ``sockets`` until SIGTERM or SIGINT (or the last client, without --persistent)."""
    from sendense_nbd.server import NBDServer
    from sendense_nbd.server.buffers import return_large_frees_to_os

    return_large_frees_to_os()
    make_server = functools.partial(
        NBDServer,
        exports,
        sockets=sockets,
        workers=_workers(o.images),
        shared=o.shared,
        persistent=o.persistent,
        handshake_limit=o.handshake_limit,
        io_timeout=o.io_timeout,
        max_handshakes=o.max_handshakes,
        congestion=o.congestion,
        tls=tls,
        tls_context=context,
    )
    asyncio.run(_serve(make_server))


def _close_devices(devices: list[BlockDevice]) -> list[str]:
    """Close every device (a final flush each), even after one fails; what failed, one message each (the
    devices' errors name their image)."""
    problems = []
    for device in devices:
        try:
            device.close()
        except (SendenseError, OSError) as exc:
            problems.append(str(exc))
    return problems


def _tls_settings(o: _ServeOptions) -> tuple[TLSMode, ssl.SSLContext | None]:
    """The TLS mode and the server's context, loaded before listening so that bad credentials fail at once."""
    mode = TLSMode(o.tls or ("require" if o.tls_creds else "off"))
    if mode is TLSMode.OFF:
        if o.tls_creds or o.tls_verify_client:
            raise click.UsageError("--tls-creds and --tls-verify-client need --tls allow or require")
        return mode, None
    if not o.tls_creds:
        raise click.UsageError(f"--tls {mode.value} needs --tls-creds DIR")
    if o.tls_verify_client and mode is not TLSMode.REQUIRE:
        raise click.UsageError(
            f"--tls-verify-client needs --tls require: under --tls {mode.value} a client that skips TLS "
            "would be served without a certificate"
        )
    from sendense_nbd.tls import psk_server_context, server_context

    creds = Path(o.tls_creds)
    if (creds / "keys.psk").exists() and not (creds / "server-cert.pem").exists():  # qemu's tls-creds-psk dir
        if o.tls_verify_client:
            raise click.UsageError("--tls-verify-client is for x509 credentials; a keys.psk client proves its key")
        return mode, psk_server_context(creds / "keys.psk")
    return mode, server_context(o.tls_creds, verify_client=o.tls_verify_client)


def _open_exports(o: _ServeOptions, devices: list[BlockDevice]) -> list[Export]:
    """Open every image (appended to ``devices``, which the caller closes) and name its export."""
    from sendense_nbd.server import Export
    from sendense_nbd.storage import PolicyDevice, open_image

    exports = []
    for i, image in enumerate(o.images):
        device: BlockDevice = open_image(image, o.fmt, readonly=o.readonly, cache=o.cache, trusted=True)
        devices.append(device)
        device = PolicyDevice(device, discard=o.discard, detect_zeroes=o.detect_zeroes)
        name = o.names[i] if i < len(o.names) else ("" if i == 0 else _default_name(image))
        description = o.descriptions[i] if i < len(o.descriptions) else ""
        exports.append(
            Export(name, device, description=description, readonly=o.readonly, allocation_depth=o.allocation_depth)
        )
    return exports


def _default_name(image: str) -> str:
    """The export name of a second or later image: its file name, or an RBD image's name."""
    from sendense_nbd.storage.images import is_rbd

    if is_rbd(image):
        from sendense_nbd.storage.rbd import parse_rbd_filename

        return parse_rbd_filename(image).image
    return os.path.basename(image)


def _listen(bind: str, port: int, socket_path: str | None) -> list[socket.socket]:
    """The listening socket: the unix socket or the TCP port (printed when picked)."""
    from sendense_nbd.server import tcp_socket, unix_socket

    sockets = [unix_socket(socket_path) if socket_path else tcp_socket(bind, port)]
    if port == 0 and not socket_path:
        click.echo(sockets[0].getsockname()[1])
        sys.stdout.flush()
    return sockets


async def _serve(make_server: Callable[[], NBDServer]) -> None:
    """Serve until the server stops (SIGTERM and SIGINT close it); then leave those signals ignored."""
    server = make_server()  # in the event loop, after --fork
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.close)
    async with server:
        await server.wait_closed()
    # Closing the images (a final flush) comes next: a signal must not cut it short. Removing
    # asyncio's handler restores the default action for a moment, so block the signals meanwhile.
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    for sig in signals:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def _write_pid(path: str) -> None:
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def _workers(images: tuple[str, ...]) -> int:
    """I/O threads: 4, or :data:`RBD_WORKERS` when an image is on RBD (each request waits on the network)."""
    from sendense_nbd.storage.images import is_rbd

    return RBD_WORKERS if any(is_rbd(image) for image in images) else 4


def _fork() -> int:
    """Fork; the parent exits once the child is ready (0), with the child's status when it exits first, or
    1 when it is not ready in :data:`FORK_READY_TIMEOUT` (then it is killed). The child's end of the pipe.

    The parent never returns: whatever happens to it (even ^C) ends in ``os._exit``, so no ``finally``
    of the caller runs there (the PID file is the child's)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        code = 1
        try:
            os.close(write_end)
            code = _await_child(read_end, pid)
        finally:
            os._exit(code)
    os.close(read_end)
    return write_end


def _await_child(read_end: int, pid: int) -> int:
    """In the parent: 0 once the child says it is ready; its exit status if it exits first; else 1."""
    ready, _, _ = select.select([read_end], [], [], FORK_READY_TIMEOUT)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        click.echo(
            f"sendense-nbd serve: error: the server (pid {pid}) was not listening after "
            f"{FORK_READY_TIMEOUT:g} s, and was killed",
            err=True,
        )
        return 1
    if os.read(read_end, 1):
        return 0
    deadline = time.monotonic() + FORK_READY_TIMEOUT
    while time.monotonic() < deadline:  # the child closed the pipe: it is exiting (closing what it opened)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1
        time.sleep(0.05)
    return 1


def _detach(write_end: int, pid_file: str | None) -> None:
    """In the forked child: a new session, the PID file, stdio on /dev/null, then tell the parent."""
    os.setsid()
    if pid_file:
        _write_pid(pid_file)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # callers wait for EOF on these
        os.dup2(devnull, fd)
    os.write(write_end, b"1")
    os.close(write_end)


_CREATE_OPTIONS = {"cluster_size", "extended_l2", "compat"}
#: I/O threads of a server with an RBD export: each one holds one librbd request in flight.
RBD_WORKERS = 16
#: Seconds ``serve --fork`` waits for the server to listen (opening an RBD image may wait for the cluster).
FORK_READY_TIMEOUT = 300.0


def _parse_create_options(text: str | None) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in _CREATE_OPTIONS:
            raise click.BadParameter(f"unknown option {key!r} (known: {', '.join(sorted(_CREATE_OPTIONS))})")
        options[key] = value
    return options


@cli.command()
@click.option("-f", "--format", "fmt", type=_choice(ImageFormat), default="raw", show_default=True)
@click.option(
    "-b", "--backing", "backing_file", help="Backing file (qcow2 overlays); relative names are relative to FILE."
)
@click.option("-F", "--backing-format", type=_choice(ImageFormat), help="Format of the backing file.")
@click.option("-o", "options", help="qcow2 options: cluster_size=64k, extended_l2=on, compat=0.10|1.1.")
@click.argument("path", metavar="FILE")
@click.argument("size", required=False)
def create(
    fmt: str,
    backing_file: str | None,
    backing_format: str | None,
    options: str | None,
    path: str,
    size: str | None,
) -> None:
    """Create an empty image FILE of SIZE bytes (suffixes k, M, G, T).

    With -b the SIZE may be left out: it is the backing file's.
    """
    from sendense_nbd.storage import create_image

    opts = _parse_create_options(options)
    try:
        virtual_size = parse_size(size) if size else None
        create_image(
            path,
            virtual_size,
            ImageFormat(fmt),
            backing_file=backing_file,
            backing_format=backing_format,
            cluster_size=parse_size(opts["cluster_size"]) if "cluster_size" in opts else None,
            extended_l2=opts.get("extended_l2", "off") in ("on", "true", "yes"),
            compat=opts.get("compat", "1.1"),
        )
    except SendenseError as exc:
        raise click.ClickException(str(exc)) from exc
    details = f"fmt={fmt}" + (f" size={virtual_size}" if virtual_size else "")
    if backing_file:
        details += f" backing_file={backing_file} backing_fmt={backing_format}"
    click.echo(f"Formatting '{path}', {details}")


@cli.command("map")
@click.option("-f", "--format", "fmt", type=_choice(ImageFormat), help="Image format (probed if omitted).")
@click.option("--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
@click.argument("path", metavar="FILE")
def map_command(fmt: str | None, output: str, path: str) -> None:
    """Show where each guest range of FILE lives, as qemu-img map does."""
    from sendense_nbd.storage import open_image
    from sendense_nbd.storage.imagemap import map_image

    try:
        device = open_image(path, ImageFormat(fmt) if fmt else None, readonly=True, trusted=True)
        try:
            entries = map_image(device)
        finally:
            device.close()
    except SendenseError as exc:
        raise click.ClickException(str(exc)) from exc
    if output == "json":
        lines = [json.dumps(entry.to_json()).replace("{", "{ ", 1) for entry in entries]
        click.echo("[" + ",\n".join(lines) + "]")
        return
    click.echo(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for entry in entries:
        if entry.data and entry.offset is not None:
            click.echo(f"{_hex(entry.start):<16}{_hex(entry.length):<16}{_hex(entry.offset):<16}{entry.filename}")


def _hex(value: int) -> str:
    return f"{value:#x}" if value else "0"


@cli.command()
@click.option("-f", "--format", "fmt", type=_choice(ImageFormat), help="Image format (probed if omitted).")
@click.option("--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
@click.argument("path", metavar="FILE")
def info(fmt: str | None, output: str, path: str) -> None:
    """Describe FILE, as qemu-img info does."""
    from sendense_nbd.storage.qcow2.info import format_info_human, image_info

    try:
        details = image_info(path, fmt)
    except SendenseError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(details, indent=4) if output == "json" else format_info_human(details).rstrip("\n"))


@cli.command()
@click.option("--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
@click.option(
    "-r",
    "--repair",
    type=click.Choice(["leaks", "all"]),
    help="Rebuild the refcounts (fixes leaks and refcount errors).",
)
@click.argument("path", metavar="FILE")
def check(output: str, repair: str | None, path: str) -> None:
    """Check a qcow2 FILE's consistency, as qemu-img check does.

    Exit status: 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check
    itself failed.
    """
    from sendense_nbd.storage.qcow2.check import check_image, exit_code, format_human, repair_refcounts

    try:
        result = repair_refcounts(path) if repair else check_image(path)
    except SendenseError as exc:
        raise click.ClickException(str(exc)) from exc
    if output == "json":
        click.echo(json.dumps(result.to_json(), indent=4))
    else:
        click.echo(format_human(result).rstrip("\n"))
    sys.exit(exit_code(result))


cli.add_command(copy_command)
cli.add_command(verify_command)
cli.add_command(policy_group)
cli.add_command(copies_group)
cli.add_command(status_command)
cli.add_command(tls_group)
cli.add_command(db_group)
for command in (hub_command, node_group, ports_command, points_command, restore_command, tunnel_server_command):
    cli.add_command(command)


def main() -> None:
    """The ``sendense-nbd`` entry point."""
    cli(prog_name="sendense-nbd")
