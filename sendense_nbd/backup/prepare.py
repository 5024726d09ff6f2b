"""The one wiring of a backup job, shared by ``sendense-backup migrate`` and the node.

Both turn what they were given (the command's flags; the node's config and the
hub's request) into :class:`BackupSettings`. :func:`prepare` opens the job's
change-ID store and returns a :class:`BackupJob`; its :meth:`~BackupJob.run`
resolves nbdkit-vddk's settings (reading vCenter's certificate when no vddk
thumbprint is given), starts the job's progress, logs in to vCenter and runs
:func:`~sendense_nbd.backup.job.run_backup`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shlex
import ssl
from collections.abc import Awaitable, Callable

import attrs

from sendense_nbd.backup.hubapi import HubApi
from sendense_nbd.backup.job import BackupResult, BackupSpec, DiskSource, run_backup
from sendense_nbd.backup.progress import JobProgress
from sendense_nbd.backup.statefile import StateFile
from sendense_nbd.vmware.session import Endpoint, VSphere, connect
from sendense_nbd.vmware.vddk import VddkConfig, vddk_config

log = logging.getLogger(__name__)

#: A local consumer of every progress report (the terminal's bar or JSON lines).
Listener = Callable[[dict[str, object]], None]


@attrs.frozen
class VddkSettings:
    """How nbdkit-vddk reads the disks: ``[vddk]`` in the node's config, ``--vddk-*`` for ``migrate``."""

    #: ``thumbprint=`` for vddk; None: the SHA-1 of vCenter's certificate, read when the job runs.
    thumbprint: str | None = None
    #: VDDK's install directory (``libdir=``).
    libdir: str | None = None
    #: ``transports=`` as ``a:b``; empty: the plugin's default.
    transports: str = ""
    #: ``compression=``: none, zlib, fastlz or skipz.
    compression: str | None = None
    nbdkit: str = "nbdkit"
    #: The plugin and its leading arguments, as shell words.
    plugin: str = attrs.field(default="vddk", validator=lambda _, attribute, value: _shell_words(attribute.name, value))
    #: More vddk ``KEY=VALUE`` parameters (config, cookie, ...).
    options: tuple[tuple[str, str], ...] = ()


def _shell_words(name: str, value: str) -> None:
    """Refuse a value that does not split into at least one shell word (checked once, not per job)."""
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"{name} {value!r} is not a list of shell words ({exc})") from None
    if not words:
        raise ValueError(f"{name} is empty")


@attrs.frozen
class HubSettings:
    """The hub API a job reads change IDs from and reports to."""

    url: str
    token: str | None = attrs.field(default=None, repr=False)
    #: Retries of a failed call (backoff 0.5 s, doubling); the final progress report gets 2 more.
    retries: int = 3
    #: An ``https://`` hub's certificate checked with this context (None: the system's CAs).
    tls: ssl.SSLContext | None = attrs.field(default=None, repr=False)
    #: ... or pinned: ``sha256:HEX`` of the hub's certificate (the context is then not used).
    tls_fingerprint: str | None = None


@attrs.frozen
class BackupSettings:
    """Everything one job needs: what to back up, vCenter's login, nbdkit-vddk, and where change IDs live.

    Change IDs go to ``hub`` when it is set, else to the local ``state_file``.
    """

    spec: BackupSpec
    endpoint: Endpoint
    username: str
    password: str = attrs.field(repr=False)
    vddk: VddkSettings = VddkSettings()
    hub: HubSettings | None = None
    state_file: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.hub is None and self.state_file is None:
            raise ValueError("a job records its change IDs at a hub or in a state file: give one")


@attrs.define(eq=False)
class BackupJob:
    """A wired job: :meth:`run` runs it once, :meth:`close` lets its change-ID store go."""

    settings: BackupSettings
    store: HubApi | StateFile
    listeners: tuple[Listener, ...] = ()
    #: The job's progress, from the moment :meth:`run` has resolved nbdkit-vddk's settings.
    progress: JobProgress | None = None

    async def run(self, *, on_note: Callable[[str], None] = log.info) -> BackupResult:
        """Resolve nbdkit-vddk's settings and log in to vCenter, both at once, and run the job
        (see :func:`run_backup`)."""
        settings, vddk = self.settings, self.settings.vddk
        resolved, session = await _both(
            vddk_config(
                settings.endpoint,
                settings.username,
                thumbprint=vddk.thumbprint,
                libdir=vddk.libdir,
                transports=vddk.transports,
                compression=vddk.compression,
                nbdkit=vddk.nbdkit,
                plugin=vddk.plugin,
                extra=vddk.options,
            ),
            connect(settings.endpoint, settings.username, settings.password),
        )
        vsphere, source = session, DiskSource(resolved, settings.password)
        self.progress = self._progress()
        try:
            return await run_backup(
                settings.spec, source=source, vsphere=vsphere, store=self.store, progress=self.progress, on_note=on_note
            )
        finally:
            await asyncio.shield(vsphere.close())

    def _progress(self) -> JobProgress:
        """The job's progress: to the listeners, and to the hub (the final report retried 2 more times)."""
        job_id, hub = self.settings.spec.job_id, self.settings.hub
        if hub is None:
            return JobProgress(job_id, None, listeners=self.listeners)
        sink = functools.partial(self.store.progress, job_id)
        return JobProgress(job_id, sink, listeners=self.listeners, final_retries=hub.retries + 2)

    async def close(self) -> None:
        """Close the change-ID store (the hub API's HTTP session)."""
        await self.store.close()


async def _both(resolving: Awaitable[VddkConfig], logging_in: Awaitable[VSphere]) -> tuple[VddkConfig, VSphere]:
    """nbdkit-vddk's settings and a vCenter session, at once. If either fails, or the caller is cancelled,
    the other is stopped and a session already open is closed, then the error is raised."""
    resolved, session = asyncio.ensure_future(resolving), asyncio.ensure_future(logging_in)
    try:
        return await asyncio.gather(resolved, session)
    except BaseException:
        await asyncio.shield(_abandon(resolved, session))
        raise


async def _abandon(resolved: asyncio.Future[VddkConfig], session: asyncio.Future[VSphere]) -> None:
    for task in (resolved, session):
        task.cancel()  # a no-op once it is done
    await asyncio.wait((resolved, session))
    if not session.cancelled() and session.exception() is None:
        await session.result().close()


def prepare(settings: BackupSettings, *, listeners: tuple[Listener, ...] = ()) -> BackupJob:
    """A job ready to run: its change-ID store opened (the hub API, else the state file)."""
    hub = settings.hub
    if hub is not None:
        store: HubApi | StateFile = HubApi(
            hub.url, token=hub.token, retries=hub.retries, tls=hub.tls, tls_fingerprint=hub.tls_fingerprint
        )
    else:
        assert settings.state_file is not None  # the settings' own check
        store = StateFile(settings.state_file)
    return BackupJob(settings, store, listeners)
