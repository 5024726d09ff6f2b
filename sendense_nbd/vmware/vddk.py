"""The disk source: one read-only nbdkit (vddk plugin) per disk on a private unix socket.

The command line is built from :class:`VddkConfig` and a disk; the
password reaches nbdkit as ``password=-FD``: nbdkit reads it from a pipe it
inherits, so it is never in argv nor on disk, and a SIGKILL leaves nothing
behind. (``password=-`` needs a terminal on nbdkit 1.32.) The socket and pid
file sit in a private 0700 directory, removed with the process. ``nbdkit``
and the plugin are configurable so tests can run a stand-in plugin with the
same parameter contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence

import attrs

from sendense_nbd.errors import DiskSourceError
from sendense_nbd.vmware.session import Endpoint, certificate_thumbprint

log = logging.getLogger(__name__)

#: vddk parameters that the caller may add through ``extra`` (the rest are set from the job).
VDDK_OPTIONAL = frozenset(
    {"config", "cookie", "nfchostport", "port", "single-link", "unbuffered", "vimapiver", "create", "compression"}
)


@attrs.frozen
class VddkConfig:
    """How to start nbdkit for a VMware disk (everything but the disk and the snapshot)."""

    server: str
    user: str
    thumbprint: str
    #: VDDK's install directory (``libdir=``); None: the plugin's default.
    libdir: str | None = None
    #: ``transports=``, e.g. ``("hotadd", "nbdssl", "nbd")``; empty: the plugin's default.
    transports: tuple[str, ...] = ()
    #: ``compression=`` for nbd/nbdssl transports: none, zlib, fastlz, skipz.
    compression: str | None = None
    #: The vCenter port, when not 443 (``port=``).
    port: int | None = None
    nbdkit: str = "nbdkit"
    #: The plugin and anything before its parameters, e.g. ``("python", "/path/vddk_standin.py")``.
    plugin: tuple[str, ...] = ("vddk",)
    #: Filters, each passed as ``--filter=NAME``.
    filters: tuple[str, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()
    #: Extra environment for nbdkit (e.g. ``PYTHONPATH`` for a python plugin).
    env: tuple[tuple[str, str], ...] = ()
    #: Seconds to wait for nbdkit to listen.
    start_timeout: float = 120.0


async def vddk_config(
    endpoint: Endpoint,
    user: str,
    *,
    thumbprint: str | None = None,
    libdir: str | None = None,
    transports: str = "",
    compression: str | None = None,
    nbdkit: str = "nbdkit",
    plugin: str = "vddk",
    extra: Sequence[tuple[str, str]] = (),
) -> VddkConfig:
    """The nbdkit-vddk settings for a vCenter: ``transports`` as ``a:b``, ``plugin`` as a shell word list;
    without ``thumbprint``, the SHA-1 of the server's certificate."""
    if thumbprint is None:
        thumbprint = await asyncio.to_thread(certificate_thumbprint, endpoint.host, endpoint.port)
    return VddkConfig(
        server=endpoint.host,
        user=user,
        thumbprint=thumbprint,
        libdir=libdir,
        transports=tuple(t for t in transports.split(":") if t),
        compression=compression,
        port=endpoint.port if endpoint.port != 443 else None,
        nbdkit=nbdkit,
        plugin=tuple(shlex.split(plugin)),
        extra=tuple(extra),
    )


def build_command(
    config: VddkConfig,
    *,
    vm_moref: str,
    disk_file: str,
    snapshot_moref: str | None,
    socket_path: str,
    password_fd: int,
    pid_file: str,
) -> list[str]:
    """The nbdkit argv for one disk (the password is read from ``password_fd``, never given in argv)."""
    if password_fd < 3:
        raise DiskSourceError("nbdkit reads password=-FD only from a descriptor above 2")
    command = [
        config.nbdkit,
        "--exit-with-parent",
        "--readonly",
        "--foreground",
        "--unix",
        socket_path,
        "--pidfile",
        pid_file,
    ]
    command += [f"--filter={name}" for name in config.filters]
    command += list(config.plugin)
    params: list[tuple[str, str]] = [
        ("server", config.server),
        ("user", config.user),
        ("password", f"-{password_fd}"),
        ("thumbprint", config.thumbprint),
        ("vm", f"moref={vm_moref}"),
    ]
    if snapshot_moref:
        params.append(("snapshot", snapshot_moref))
    params.append(("file", disk_file))
    if config.port is not None:
        params.append(("port", str(config.port)))
    if config.libdir:
        params.append(("libdir", config.libdir))
    if config.transports:
        params.append(("transports", ":".join(config.transports)))
    if config.compression:
        params.append(("compression", config.compression))
    for key, value in config.extra:
        if key not in VDDK_OPTIONAL:
            raise DiskSourceError(f"vddk parameter {key!r} cannot be given as an extra (it is set by the job)")
        params.append((key, value))
    return command + [f"{key}={value}" for key, value in params]


class VddkSource:
    """A running nbdkit serving one VMware disk read-only; ``uri`` is its NBD URI.

    Use as ``async with VddkSource(...) as source:``; leaving stops nbdkit
    and removes its private directory.
    """

    def __init__(
        self, config: VddkConfig, password: str, *, vm_moref: str, disk_file: str, snapshot_moref: str | None
    ) -> None:
        self.config = config
        self._password = password
        self.vm_moref = vm_moref
        self.disk_file = disk_file
        self.snapshot_moref = snapshot_moref
        self.directory: str | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.command: list[str] = []
        #: The last 4 KiB nbdkit wrote to stderr (while it serves).
        self.stderr_tail = b""
        self._drain: asyncio.Future[None] | None = None

    @property
    def socket_path(self) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, "disk.sock")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket_path}"

    async def start(self) -> VddkSource:
        sweep_stale_directories()
        self.directory = tempfile.mkdtemp(prefix=_DIRECTORY_PREFIX)  # mode 0700
        pid_file = os.path.join(self.directory, "nbdkit.pid")
        password_fd = _password_pipe(self._password)
        try:
            self.command = build_command(
                self.config,
                vm_moref=self.vm_moref,
                disk_file=self.disk_file,
                snapshot_moref=self.snapshot_moref,
                socket_path=self.socket_path,
                password_fd=password_fd,
                pid_file=pid_file,
            )
            env = {**os.environ, **dict(self.config.env)}
            log.info("disk source: %s", describe_command(self.command))
            self.process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                pass_fds=(password_fd,),
            )
        except OSError as exc:
            await self.stop()
            raise DiskSourceError(f"cannot run {self.config.nbdkit}: {exc.strerror or exc}") from exc
        except BaseException:
            await self.stop()
            raise
        finally:
            os.close(password_fd)
        try:
            await self._wait_listening(pid_file)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _wait_listening(self, pid_file: str) -> None:
        """nbdkit writes its pid file once it listens; fail with its stderr if it exits first."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout
        while not await asyncio.to_thread(os.path.exists, pid_file):
            if self.process.returncode is not None or loop.time() > deadline:
                if self.process.returncode is None:
                    self.process.kill()
                stderr = b""
                if self.process.stderr is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        stderr = await asyncio.wait_for(self.process.stderr.read(), 5)
                reason = " ".join(stderr.decode(errors="replace").split()) or "no message"
                what = "did not start in time" if self.process.returncode is None else "exited"
                raise DiskSourceError(f"nbdkit for {self.disk_file} {what}: {reason}")
            await asyncio.sleep(0.02)
        # Drain stderr from now on so nbdkit never blocks on a full pipe.
        if self.process.stderr is not None:
            self._drain = asyncio.ensure_future(self._collect(self.process.stderr))

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.stderr_tail = (self.stderr_tail + chunk)[-4096:]

    async def stop(self) -> None:
        """Stop nbdkit and remove its directory; a stop cut short by a cancellation can be called again."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.process = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    async def __aenter__(self) -> VddkSource:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


_DIRECTORY_PREFIX = "sendense-vddk-"
#: A stale directory is at least this old: older releases wrote the password into it.
_STALE_AGE = 600.0


def _password_pipe(password: str) -> int:
    """The read end of a pipe that holds ``password`` and then EOF."""
    data = password.encode()
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(write_fd, False)
        written = os.write(write_fd, data) if data else 0
    except BlockingIOError:
        written = 0
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    if written != len(data):
        os.close(read_fd)
        raise DiskSourceError("the vCenter password is too long to hand to nbdkit through a pipe")
    return read_fd


def sweep_stale_directories(root: str | None = None) -> list[str]:
    """Remove our private directories left by killed jobs of older releases, which held the password
    in a file; those of running jobs (a live pid in ``nbdkit.pid``, or younger than 10 minutes) stay.
    Returns the directories removed."""
    root = root or tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(_DIRECTORY_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or info.st_uid != os.getuid():
                continue
            if time.time() - info.st_mtime < _STALE_AGE or _nbdkit_alive(entry.path):
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        log.warning("removed %s, left by a job that was killed", entry.path)
        removed.append(entry.path)
    return removed


def _nbdkit_alive(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "nbdkit.pid"), encoding="ascii") as f:
            pid = int(f.read().strip() or "0")
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_command(command: Sequence[str]) -> str:
    """The command as a shell would show it (for logs and --help docs)."""
    return " ".join(shlex.quote(part) for part in command)
