"""The hub: ports, exports, repository and jobs wired together (the REST API is a thin layer on this).

A backup job: lease one port per disk, create the disk's new point (a full
qcow2, or an overlay on the latest completed point), serve it on the
leased socket, and ask the node to push the disk there. The node reports
progress and completion through the hub API (docs/HUB_API.md). On
completion the exports are stopped (which flushes), the points are marked
completed with their change IDs, the ports are released and retention runs.
A failed, cancelled or timed-out job discards its points. A restarted hub
fails the jobs its predecessor left running, frees their ports, and removes
the images no point knows of.

Requests arrive parsed (:mod:`~sendense_nbd.hub.requests`), and each call
checks what it can before changing any state, so a refused request leaves
no job running, no port leased and no image behind. Calls take and return
typed values and raise domain errors (:mod:`sendense_nbd.errors`); the API
maps each error type to its HTTP answer. Converted restores go only into
the restore directory, under a plain file name.

Background work (lease renewal, job timeouts) runs in one task group that
:meth:`Hub.close` cancels and :meth:`Hub.wait_closed` awaits. The only
in-memory state besides the exports is one lock per job a request is
working on; a lock is dropped as soon as nobody holds or awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import sqlite3
import ssl
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from sendense_nbd.backup.records import FullReason, Mode
from sendense_nbd.errors import (
    BadRequest,
    CompletionMismatch,
    ConfigError,
    Conflict,
    ExportWorkerError,
    HubIdInUse,
    InvalidBackup,
    JobStateError,
    NodeError,
    NodeUnavailable,
    OtherHub,
    RepositoryClaimed,
    RepositoryError,
    SendenseError,
    UnknownJob,
    first_error,
)
from sendense_nbd.hub import capacity
from sendense_nbd.hub import requests as req
from sendense_nbd.hub.alerts import AlertConfig, AlertKind, AlertQuery, Alerts, repeated_full
from sendense_nbd.hub.certnames import CertificateNames
from sendense_nbd.hub.clock import Clock, SystemClock
from sendense_nbd.hub.cluster import (
    HEARTBEAT,
    HUB_LOST,
    RECOVERY_WAIT,
    Cluster,
    HubState,
    Identity,
    Member,
    api_url_fault,
    check_api_url,
    check_membership,
    hub_id,
)
from sendense_nbd.hub.copies import Copies
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.exports import ExportManager
from sendense_nbd.hub.jobs import (
    BackupDetail,
    ConvertDetail,
    DiskExport,
    ExportDetail,
    Job,
    JobKind,
    JobQuery,
    JobState,
    JobStore,
    Outcome,
    PointVerdict,
)
from sendense_nbd.hub.metrics import HubMetrics
from sendense_nbd.hub.node_client import NodeClient
from sendense_nbd.hub.nodes import (
    DEFAULT,
    DEFAULT_OPTIONS,
    HEALTH_CONCURRENCY,
    JOB_GRACE,
    NODE_LOST,
    NodeRecord,
    NodeRegistry,
    default_node,
    nbd_host,
)
from sendense_nbd.hub.policies import PolicyStore
from sendense_nbd.hub.ports import DEFAULT_POOL, PoolStatus, PortAllocator, release_hub
from sendense_nbd.hub.repository import Point, PointStatus, RbdStore, Repository, open_store
from sendense_nbd.hub.repository.rbd import CLAIM_FRESH
from sendense_nbd.hub.retention_preview import PreviewVM, preview_vm, retention_rules
from sendense_nbd.hub.samples import Sample
from sendense_nbd.hub.scheduler import Scheduler
from sendense_nbd.hub.serving import ExportSpec, ExportStats
from sendense_nbd.hub.space_history import SpaceHistory, SpaceSample
from sendense_nbd.hub.transport import TRANSPORT_TUNNEL, ExportTLS, Route, check_exposure
from sendense_nbd.hub.verify import Verifier, VerifyRequest
from sendense_nbd.hub.workers import WorkerView
from sendense_nbd.policy.model import Policy, Retention
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.storage.files import is_temporary, remove_quietly
from sendense_nbd.storage.modes import ImageFormat
from sendense_nbd.tls import ServerCredentials

log = logging.getLogger(__name__)


def _check_nbd_tls(config: HubConfig, _: object, mode: TLSMode) -> None:
    """``--nbd-tls`` is off or require, and require has credentials."""
    if mode is TLSMode.ALLOW:
        raise ConfigError("--nbd-tls is off or require (an export either requires TLS or does not offer it)")
    if mode is TLSMode.REQUIRE and config.nbd_tls_context is None:
        raise ConfigError("--nbd-tls require needs the hub's NBD TLS credentials: give --nbd-tls-creds DIR")


@attrs.frozen(kw_only=True)
class HubConfig:
    """How a hub runs: its repository, NBD port pool and addresses, node, timeouts and retention."""

    #: The hub's directory (its store, lock and restores) and, unless ``store`` says otherwise, the repository.
    repo: str
    #: The repository when it is not ``repo``: ``rbd://POOL[/NS]?conf=..&id=..`` (an RBD store, recorded in ``repo``).
    store: str | None = None
    #: The hub's store: a path, ``sqlite:PATH`` or ``postgresql://...`` (None: ``REPO/hub.db``).
    db: str | None = None
    nbd_ports: range = DEFAULT_POOL
    #: Address the NBD exports listen on.
    nbd_bind: str = "127.0.0.1"
    #: Host name the node uses to reach the exports (default: nbd_bind).
    nbd_advertise: str | None = None
    #: The default node's API (None: jobs wait for a node that is told some other way), and the rest of
    #: it as ``node add`` takes it (``--node-token-file``, ``--node-tunnel-identity``, ``--node-transport``,
    #: ``--node-nbd-host``, ``--node-hub-url``, ``--node-tls-pinned``): see :meth:`default_node`.
    node_url: str | None = None
    node_token: str | None = None
    node_tunnel_identity: str | None = None
    node_transport: str = TRANSPORT_TUNNEL
    node_nbd_host: str | None = None
    node_hub_url: str | None = None
    node_tls_pinned: bool = False
    #: The hub API URL as the nodes reach it (passed to a node with each job, unless its ``hub_url`` says
    #: otherwise).
    public_url: str = "http://127.0.0.1:8082"
    job_timeout: float = 24 * 3600.0
    keep_points: int = 7
    shared: int = 10
    lease_ttl: float = 600.0
    #: Where converted restores go (default REPO/restores); callers name only a file in it.
    restore_dir: str | None = None
    #: The only folder offsite copy targets' secret files may be in (None: anywhere on the hub).
    secrets_dir: str | None = None
    #: Where schedules, health checks and alerts read the time (tests move a ManualClock by hand).
    clock: Clock = attrs.field(factory=SystemClock)
    #: Where alerts go (webhook, mail) and when space is low.
    alerts: AlertConfig = attrs.field(factory=AlertConfig)
    #: Free bytes a backup must leave in the repository (its expected size is checked before it starts).
    min_free: int = capacity.DEFAULT_MIN_FREE
    #: Seconds a node may go without answering before its running backup jobs fail ``node_unavailable``.
    node_lost: float = NODE_LOST
    #: The hub's NBD server credentials (``--nbd-tls-creds``, ``--nbd-tls-verify-client``): exports of nodes
    #: with transport ``tls`` and, under ``nbd_tls`` REQUIRE, every export use them (export workers load them).
    nbd_tls_creds: ServerCredentials | None = None
    #: The context of ``nbd_tls_creds``, loaded when the config is made (unusable credentials stop it there).
    nbd_tls_context: ssl.SSLContext | None = attrs.field(init=False, eq=False)
    #: REQUIRE: every export (backups of every node, restores) only over TLS; OFF: only the exports of
    #: nodes registered with transport ``tls``.
    nbd_tls: TLSMode = attrs.field(default=TLSMode.OFF, validator=_check_nbd_tls)
    #: The names in the certificate of ``nbd_tls_context`` (``--nbd-tls-creds``'s ``server-cert.pem``): the
    #: hosts nodes dial TLS exports at must be among them (None: not checked).
    nbd_tls_names: CertificateNames | None = None
    #: Serve plain NBD exports on a network ``nbd_bind`` (``--allow-plain-nbd``); refused otherwise.
    allow_plain_nbd: bool = False
    #: Serve TLS exports on a network ``nbd_bind`` without client certificates (``--allow-any-tls-client``);
    #: refused otherwise.
    allow_any_tls_client: bool = False
    #: Export worker processes (``--workers``; 0: every export in the hub's own event loop).
    workers: int = attrs.field(factory=lambda: len(os.sched_getaffinity(0)), validator=attrs.validators.ge(0))
    #: This hub's ID in the cluster (``--hub-id``; None: the one kept in ``repo``, made at the first start).
    hub_id: str | None = None
    #: The API URL the other hubs and API clients use for this hub (``--api-advertise``; None: ``public_url``,
    #: which nodes use: with a tunnel per hub, each hub's ``public_url`` is its tunnel's end on the node).
    api_advertise: str | None = None
    #: Seconds of ``clock`` between heartbeats (``--heartbeat``), and without one before another hub takes this
    #: one over (``--hub-lost``).
    heartbeat: float = HEARTBEAT
    hub_lost: float = HUB_LOST

    @nbd_tls_context.default
    def _load_nbd_tls(self) -> ssl.SSLContext | None:
        return None if self.nbd_tls_creds is None else self.nbd_tls_creds.context()

    def __attrs_post_init__(self) -> None:
        """Refuse (:class:`ConfigError`, naming the option) what cannot work before a hub opens anything: a bad
        default node, an ``--nbd-advertise`` or ``--nbd-bind`` that is no host, exposed plain exports, TLS
        exports at a host the certificate does not name (:func:`check_exposure`), a ``--hub-id`` that is no name,
        a ``--hub-lost`` not longer than ``--heartbeat``, an API URL to register that is no http(s) URL to send
        clients to (:func:`check_api_url`)."""
        try:
            default = self.default_node()
            tls = self.export_tls()
        except BadRequest as exc:
            raise ConfigError(str(exc)) from None
        check_exposure(self.nbd_bind, tls, allow_plain=self.allow_plain_nbd, allow_any_client=self.allow_any_tls_client)
        check_membership(self.hub_id, heartbeat=self.heartbeat, lapse=self.hub_lost)
        check_api_url(self.api_advertise, self.public_url)
        if default is not None:
            try:
                tls.check_node(DEFAULT, default["transport"], default["nbd_host"], pinned=default["tls_pinned"])
            except BadRequest as exc:
                raise ConfigError(f"the default node (--node-url): {exc}") from None

    def default_node(self) -> dict[str, Any] | None:
        """The node :data:`~sendense_nbd.hub.nodes.DEFAULT` as the ``--node-*`` options give it, every
        column (None without ``--node-url``); :class:`BadRequest` names the option at fault."""
        values = {
            "url": self.node_url, "token": self.node_token, "tunnel_identity": self.node_tunnel_identity,
            "transport": self.node_transport, "nbd_host": self.node_nbd_host, "hub_url": self.node_hub_url,
            "tls_pinned": self.node_tls_pinned,
        }  # fmt: skip
        if self.node_url is None:
            given = [DEFAULT_OPTIONS[k] for k, v in values.items() if v not in (None, False, TRANSPORT_TUNNEL)]
            if given:
                verb = "describes" if len(given) == 1 else "describe"
                raise BadRequest(f"{', '.join(given)} {verb} the default node: give --node-url too")
            return None
        return default_node(values)

    def export_tls(self) -> ExportTLS:
        """What the hub's NBD TLS allows, and the host nodes dial by default: ``--nbd-advertise``, else
        ``--nbd-bind``, in the normal form nodes compare it in (:func:`~sendense_nbd.hub.nodes.nbd_host`;
        :class:`BadRequest` naming the option when it is no host)."""
        option = "--nbd-advertise" if self.nbd_advertise is not None else "--nbd-bind"
        host = nbd_host(self.nbd_advertise if self.nbd_advertise is not None else self.nbd_bind, option)
        assert host is not None
        return ExportTLS(
            context=self.nbd_tls_context,
            required=self.nbd_tls is TLSMode.REQUIRE,
            names=self.nbd_tls_names,
            default_host=host,
            default_option=option,
        )


@attrs.frozen
class Recovery:
    """What :meth:`Hub.start` cleaned up after a predecessor that did not stop cleanly."""

    failed_jobs: list[str]
    released_ports: list[int]
    discarded_points: list[str]
    removed_orphans: list[str]
    unexpected_files: list[str]

    def to_json(self) -> dict[str, list[str] | list[int]]:
        """For the hub's start-up line."""
        return attrs.asdict(self)


@attrs.frozen
class PortsView:
    """The port pool, the exports on it and the export worker processes serving them (``GET /ports``)."""

    pool: PoolStatus
    exports: tuple[ExportStats, ...]
    workers: tuple[WorkerView, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The pool's JSON with the exports and workers added."""
        exports = [export.to_json() for export in self.exports]
        return {**self.pool.to_json(), "exports": exports, "workers": [w.to_json() for w in self.workers]}


class Hub:
    """The backup side: jobs, restore points, ports and exports of one repository (one hub per repository)."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.clock = config.clock
        os.makedirs(config.repo, mode=0o700, exist_ok=True)  # a new repository is the hub user's alone
        lock = os.path.join(config.repo, "hub.lock")
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise Conflict(f"another hub is running on {config.repo}", "busy") from None
        try:
            self.restore_dir = _open_restore_dir(config.restore_dir or os.path.join(config.repo, "restores"))
            store = open_store(config.repo, config.store)
            self.id = hub_id(config.repo, config.hub_id)
            self._db = Database(config.db or "sqlite:" + os.path.join(config.repo, "hub.db"))
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.holder = f"hub-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._tls = config.export_tls()
        self.cluster = Cluster(self._db, self.clock, self._identity(store), heartbeat=config.heartbeat,
                               lapse=config.hub_lost)  # fmt: skip
        self._ports = PortAllocator(self._db, config.nbd_ports, bind_address=config.nbd_bind, ttl=config.lease_ttl,
                                    hub=self.id)  # fmt: skip
        self._exports = ExportManager(
            shared=config.shared, tls=config.nbd_tls_creds, workers=config.workers, on_lost=self._exports_lost
        )
        self._repository = Repository(config.repo, self._db, clock=self.clock, store=store)
        if isinstance(store, RbdStore):  # other hubs may share it: a disk's chain is locked cluster-wide
            self._repository.shared_lock = self.cluster.lock
        self._jobs = JobStore(self._db, self.clock, hub=self.id)
        self.nodes = NodeRegistry(self._db, clock=self.clock, default=config.default_node(), tls=self._tls)
        label, space = config.repo if config.store is None else store.location, self._repository.space
        self.alerts = Alerts(
            self._db, config.alerts, clock=self.clock, hub=config.public_url, space_path=label, space=space
        )
        self.metrics = HubMetrics(self._db, repo=config.repo, pool_size=len(config.nbd_ports), clock=self.clock,
                                  space=space, hub=self.id, lapse=config.hub_lost)  # fmt: skip
        self._verifier = Verifier(
            self._repository, self._jobs, clock=self.clock, job_timeout=config.job_timeout,
            on_damaged=self._alert_damaged, on_failed=self._alert_failed,
        )  # fmt: skip
        self.scheduler = Scheduler(self, PolicyStore(self._db), self.clock, self.alerts, member=self.id,
                                   live=self._live_hubs)  # fmt: skip
        self.copies = Copies(
            self._db, self._repository, clock=self.clock, cluster=self.cluster, policies=self._policies,
            restore_dir=self.restore_dir, serve=self._serve_copy, release=self._release_copy_port, tls=self._tls,
            secrets=config.secrets_dir, alerts=self.alerts, retain=self._retain_disk,
        )  # fmt: skip
        self._space = SpaceHistory(self._db, self.clock, self.repository_usage)
        self._background: asyncio.Task[None] | None = None
        #: Backups are checked for space and created one at a time (:meth:`create_backup`), in the cluster too.
        self._admission = asyncio.Lock()
        #: Retention after each completed job and takeovers, running in the background; the hubs being taken over.
        self._after: set[asyncio.Task[None]] = set()
        self._taking: set[str] = set()
        self._closed = False
        #: Held weakly: a job's lock lives while a request holds or awaits it, so finished jobs keep none.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> Recovery:
        """Join the cluster, clean up after a crashed predecessor (this hub's own jobs, ports, points; where
        other hubs are live, only the store's locks of those jobs' disks, and no sweep of the shared store),
        then start the lease and timeout watchers."""
        await self._join()
        # One hub's start-up recovery at a time: a hub starting alone sweeps the shared store, and one starting
        # meanwhile must find it live (and touch only its own jobs' disks) once that sweep is over.
        async with self._repository.cluster_lock("start-up recovery", wait=RECOVERY_WAIT):
            others = await self.cluster.others_live()
            failed = await self._fail_own_jobs()
            released = [lease.port for lease in await self._ports.release_stale(self.holder)]
            disks = {(job.vm_path, disk.disk_key) for job in failed for disk in job.disks} if others else None
            discarded, merged = await self._repository.recover(disks)
            removed, unexpected = await self._repository.sweep_orphans(store=not others)
        await self._verifier.resume()  # the digests of completed points a stop interrupted
        await self.copies.forget_uploads()  # this hub uploads none yet: its last run's marks go
        await self.copies.resume()  # offsite copies a stop interrupted (their uploads resume)
        await self._log_unusable_nodes()
        removed += await asyncio.to_thread(_sweep_temporaries, self.restore_dir)
        if failed or released or discarded or merged:
            log.warning(
                "recovered after a restart: jobs failed %s, ports released %s, points discarded %s, merges finished %s",
                [job.id for job in failed], released, discarded, merged,
            )  # fmt: skip
        self._background = asyncio.create_task(self._watch(), name="hub-background")
        return Recovery([job.id for job in failed], released, discarded, removed, unexpected)

    async def _fail_own_jobs(self) -> list[Job]:
        """Fail this hub's jobs a crash or stop left pending or running (one another hub took over meanwhile is
        already failed); the jobs failed here."""
        failed: list[Job] = []
        restarted = req.Failure("hub", "the hub restarted", "restarted")
        for state in (JobState.RUNNING, JobState.PENDING):
            for job in await self._jobs.list(state=state, hub=self.id):
                with contextlib.suppress(JobStateError):
                    failed.append(await self._jobs.transition(job.id, JobState.FAILED, error=restarted))
                    await self._alert_failed(failed[-1])
        return failed

    def _identity(self, store: object) -> Identity:
        """What this hub registers in the cluster: its ID, API URL, NBD host and pool, and its store."""
        if isinstance(store, RbdStore):
            where = store.where
            name = f"rbd://{where.pool}{'/' + where.namespace if where.namespace else ''}?prefix={where.prefix}"
        else:
            name = f"local:{os.path.abspath(self.config.repo)}"
        return Identity(id=self.id, api_url=self.config.api_advertise or self.config.public_url,
                        nbd_host=self._tls.default_host, ports=self.config.nbd_ports, store=name,
                        local=not isinstance(store, RbdStore))  # fmt: skip

    async def _join(self) -> None:
        """Register in the cluster: an RBD store whose state directory records no repository yet takes the one
        the cluster's hubs share (no ``adopt=yes``), else claims the pool's prefix now, so that the hubs joining
        later find its UUID here."""
        store = self._repository.store
        if isinstance(store, RbdStore) and store.identity is None:
            store.identity = await self.cluster.repository()
            if store.identity is None:
                store.identity = await self._claim_or_take(store)
        await self.cluster.join(store.identity if isinstance(store, RbdStore) else None)

    async def _claim_or_take(self, store: RbdStore) -> str | None:
        """Claim the new repository (takes no image's lock); where another new hub of the cluster claimed it
        just before (:class:`RepositoryClaimed`), its UUID once that hub registered it. The claim is tried
        again meanwhile: after ``CLAIM_FRESH`` seconds a repository nobody registered is refused as any
        other one this state directory does not know."""
        deadline = time.monotonic() + CLAIM_FRESH
        while True:
            try:
                await asyncio.to_thread(store.reclaim, ())
                return store.identity
            except RepositoryClaimed:
                if time.monotonic() > deadline:
                    raise
            found = await self.cluster.repository()
            if found is not None:
                return found
            await asyncio.sleep(0.5)

    async def _live_hubs(self) -> int:
        """How many hubs of the cluster are live (this one counts)."""
        return 1 + len(await self.cluster.others_live())

    async def _log_unusable_nodes(self) -> None:
        """Log each stored node whose backups this hub's NBD TLS refuses (a host its certificate no longer
        names: ``409 tls_host``; transport tls without credentials: ``409 tls_unavailable``), so the operator
        hears of it at start rather than at the node's next backup."""
        for node in await self.nodes.records():
            try:
                self._tls.check_node(node.name, node.transport, node.nbd_host, pinned=node.tls_pinned)
            except BadRequest as exc:
                log.warning("node %s cannot back up with this hub's NBD TLS: %s", node.name, exc)

    def close(self) -> None:
        """Stop the background work (cancelled); :meth:`wait_closed` finishes the shutdown."""
        if self._background is not None:
            self._background.cancel()

    async def ended(self) -> None:
        """Return once the background work ended by itself, raising what ended it (:class:`HubIdInUse`: another
        process took this hub's ID over); the caller then stops serving and closes the hub."""
        if self._background is None:
            return
        try:
            await asyncio.shield(self._background)
        except BaseExceptionGroup as group:  # the task group's: the error it stands for
            raise first_error(group) from None

    async def wait_closed(self) -> None:
        """Close (if not yet), await the background work, stop every export (flushed), release the store."""
        self.close()
        if self._closed:
            return
        self._closed = True
        if self._background is not None:
            await asyncio.wait([self._background])
            if not self._background.cancelled() and self._background.exception() is not None:
                log.error("the hub's background work failed: %r", self._background.exception())
        for task in self._after:  # a merge cut short is finished by the next start's recover()
            task.cancel()
        await asyncio.gather(*self._after, return_exceptions=True)
        await self._verifier.close()
        await self.copies.close()
        await self._exports.stop_all()
        await self.nodes.close()
        await asyncio.to_thread(self._repository.store.close)
        with contextlib.suppress(Exception):  # a database gone: the others see the heartbeat lapse instead
            await self.cluster.leave()
        self._db.close()
        os.close(self._lock_fd)

    async def _watch(self) -> None:
        """The background loops, in one task group: cancelling this task cancels and awaits them all."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.alerts.run(), name="hub-alerts")
            group.create_task(self.nodes.watch(then=self._fail_lost_jobs), name="hub-node-health")
            group.create_task(self.scheduler.run(), name="hub-scheduler")
            group.create_task(self._space.run(), name="hub-space-history")
            renew = self.config.lease_ttl / 3
            group.create_task(self._every(renew, lambda: self._ports.renew(self.holder), "renewing port leases"))
            group.create_task(self._every(min(30.0, self.config.job_timeout / 4), self._expire, "expiring jobs"))
            group.create_task(self._every(3600.0, self._jobs.prune, "pruning finished jobs"))
            group.create_task(self._heartbeats(), name="hub-heartbeat")

    @staticmethod
    async def _every(interval: float, work: Callable[[], Awaitable[object]], what: str) -> None:
        """Run ``work`` every ``interval`` seconds until cancelled; a failed round is logged, the next runs."""
        while True:
            await asyncio.sleep(interval)
            try:
                await work()
            except Exception as exc:  # noqa: BLE001 - keep going
                log.error("%s failed: %s", what, exc)

    async def _heartbeats(self) -> None:
        """Every ``heartbeat`` seconds of the hub's clock: beat, and take over each hub whose heartbeat
        lapsed (or that stopped) if this hub is the one that marks it lost. A failed round is logged."""
        while True:
            await self.clock.sleep(self.config.heartbeat)
            try:
                if not await self.cluster.beat():
                    log.error("hub %s had been taken over (its heartbeat lapsed): it is live again", self.id)
                    await self._stop_ended_exports()
                for member in await self.cluster.lost():
                    if await self.cluster.take_over(member):  # its clean-up must not hold up the heartbeat
                        self._start_takeover(member)
                for member in await self.cluster.unfinished():  # a takeover that failed or whose taker was lost
                    self._start_takeover(member)
            except HubIdInUse as exc:  # another process runs as this hub: stop serving (ended() raises it)
                log.critical("%s", exc)
                raise
            except Exception as exc:  # noqa: BLE001 - keep beating
                log.error("the cluster heartbeat failed: %s", exc)

    def _start_takeover(self, member: Member) -> None:
        """Take ``member`` over in the background, unless this hub is doing it already."""
        if member.id in self._taking:
            return
        self._taking.add(member.id)
        task = asyncio.create_task(self._take_over(member), name=f"taking over hub {member.id}")
        self._after.add(task)
        task.add_done_callback(self._after.discard)
        task.add_done_callback(lambda _: self._taking.discard(member.id))

    async def _take_over(self, member: Member) -> None:
        """Take a lost hub over (:meth:`_take_over_steps`); a failure is logged, and the takeover is done again
        at a later heartbeat while the lost hub's work is left (:meth:`Cluster.unfinished`)."""
        try:
            await self._take_over_steps(member)
        except Exception as exc:  # noqa: BLE001 - in the background: logged, and tried again
            log.error("taking over hub %s failed: %s; it is tried again at the next heartbeat", member.id, exc)

    async def _take_over_steps(self, member: Member) -> None:
        """A lost hub's jobs fail (``hub_lost``: no change ID advances, their points are discarded, the store's
        locks its clients held on their disks broken first), its ports are released, its open runs are ours, its
        pending offsite copies go on here and its recent undelivered alerts are delivered from here."""
        why = "stopped" if member.state is HubState.STOPPED else (
            f"lost (no heartbeat for {self.clock.now() - member.heartbeat:.0f} s)")  # fmt: skip
        failure = req.Failure("hub", f"hub {member.id} was {why}; hub {self.id} failed its jobs", "hub_lost")
        jobs = [
            job for state in (JobState.RUNNING, JobState.PENDING)
            for job in await self._jobs.list(state=state, hub=member.id) if job.hub == member.id
        ]  # fmt: skip
        await self._repository.take_back({(job.vm_path, disk.disk_key) for job in jobs for disk in job.disks})
        for job in jobs:
            with contextlib.suppress(JobStateError):
                await self._alert_failed(await self._jobs.transition(job.id, JobState.FAILED, error=failure))
            await self._cleanup(job.id, job.disks)
        if not await self.cluster.still_taken(member.id):  # it restarted meanwhile: its new leases and runs are its
            log.warning("hub %s is live again: its takeover stops after failing its jobs %s", member.id,
                        [job.id for job in jobs])  # fmt: skip
            return
        ports = await release_hub(self._db, member.id)
        runs = await self.scheduler.store.take_runs(member.id, self.id)
        copies = await self.copies.resume()  # its copies left pending go on here (in turn with the live hubs')
        alerts = await self.alerts.redeliver()  # and its recent alerts not delivered yet
        log.warning("took over hub %s (%s): jobs failed %s, ports released %s, runs taken %s, copies resumed %s, "
                    "alerts delivered again %d",
                    member.id, why, [job.id for job in jobs], ports, runs, copies, alerts)  # fmt: skip

    async def _stop_ended_exports(self) -> None:
        """Stop the exports of jobs that ended elsewhere (another hub took this one over meanwhile); an offsite
        copy's export (no job) goes on, and one export that cannot be stopped does not keep the others."""
        for job_id in {export.job_id for export in await self._exports.stats()}:
            try:
                if (await self._jobs.get(job_id)).state.terminal:
                    await self._exports.stop_job(job_id)
            except UnknownJob:
                continue
            except Exception as exc:  # noqa: BLE001 - the next exports still stop
                log.error("stopping the exports of %s, which another hub ended: %s", job_id, exc)

    async def _owned(self, job: Job) -> None:
        """Refuse (:class:`OtherHub`: 307, or 409 when its registered API URL is none to send clients to) a
        change of a job another live hub runs."""
        owner = await self.cluster.owner(job.hub)
        if owner is None or not owner.live:
            return
        fault = api_url_fault(owner.api_url)
        if fault is None:
            raise OtherHub(f"job {job.id} runs on hub {owner.id} ({owner.api_url})", owner.api_url)
        raise OtherHub(
            f"job {job.id} runs on hub {owner.id}, whose registered API URL {fault}: ask that hub, and restart it "
            "with a valid --api-advertise", None
        )  # fmt: skip

    async def _expire(self) -> None:
        """Fail this hub's running jobs past their deadline."""
        now = time.time()
        for job in await self._jobs.list(state=JobState.RUNNING, hub=self.id):
            if job.deadline < now:
                async with await self._lock(job.id):
                    if not (await self._jobs.get(job.id)).state.terminal:
                        timeout = f"no completion within {self.config.job_timeout:.0f} s"
                        await self._fail(job.id, req.Failure("timeout", timeout, "timeout"))

    async def _fail_lost_jobs(self) -> None:
        """Fail (``node_unavailable``) the running backup jobs whose node is lost: silent for more than
        ``node_lost`` seconds, or answering that it does not know the job (it restarted) once the job is
        :data:`JOB_GRACE` seconds old. Runs after each round of health checks, on the hub's clock."""
        running = [
            job for job in await self._jobs.list(kind=JobKind.BACKUP, state=JobState.RUNNING, hub=self.id) if job.node
        ]  # fmt: skip
        slots = asyncio.Semaphore(HEALTH_CONCURRENCY)

        async def check(job: Job) -> None:
            async with slots:
                why = await self._why_lost(job, self.clock.now())
            if why is not None:
                async with await self._lock(job.id):
                    if not (await self._jobs.get(job.id)).state.terminal:
                        log.warning("job %s: %s", job.id, why)
                        await self._fail(job.id, req.Failure("node", why, "node_unavailable"))

        await asyncio.gather(*(check(job) for job in running))

    async def _exports_lost(self, owner: str, why: str) -> None:
        """An export worker died with exports of ``owner``: its job fails ``worker_crashed`` (its points are
        discarded, its ports released), or the offsite copy's export ends."""
        try:
            lock = await self._lock(owner)
        except UnknownJob:
            await self.copies.export_lost(owner)
            return
        async with lock:
            if not (await self._jobs.get(owner)).state.terminal:
                await self._fail(owner, req.Failure("export", f"its exports are gone: {why}", "worker_crashed"))

    async def _why_lost(self, job: Job, now: float) -> str | None:
        """Why a running job's node is lost, or None while it may still finish it."""
        assert job.node is not None
        queued = job.stages[0].started if job.stages else now  # the hub's clock (``created`` is the machine's)
        record = await self.nodes.find(job.node)
        if record is None:
            return f"node {job.node} is no longer registered"
        heard = max(record.last_contact or queued, queued)
        if now - heard > self.config.node_lost:
            return f"node {job.node} has not answered for {now - heard:.0f} s (more than {self.config.node_lost:.0f} s)"
        if record.up is False or now - queued < JOB_GRACE:
            return None
        if await self.nodes.knows_job(job.node, job.id) is False:
            return f"node {job.node} does not know the job (it restarted, or lost it)"
        return None

    async def _lock(self, job_id: str) -> asyncio.Lock:
        """The lock of an existing job (:class:`UnknownJob` otherwise, so junk IDs make no locks)."""
        lock = self._locks.get(job_id)
        if lock is None:
            await self._jobs.get(job_id)
            lock = self._locks.setdefault(job_id, asyncio.Lock())
        return lock

    # -- views -------------------------------------------------------------------

    async def job(self, job_id: str) -> Job:
        """Any job by ID; :class:`UnknownJob` if there is none."""
        return await self._jobs.get(job_id)

    async def jobs(self, query: JobQuery) -> list[Job]:
        """The jobs of every kind that match ``query``, newest first, at most ``query.limit``."""
        return await self._jobs.query(query)

    async def job_samples(self, job_id: str) -> list[Sample]:
        """A job's bytes sent over time (at each progress report and at completion), oldest first;
        :class:`UnknownJob` if there is no such job."""
        return await self._jobs.samples(job_id)

    async def backups(self, vm_path: str | None = None) -> list[Job]:
        """The backup jobs (of one VM, when given), oldest first."""
        return await self._jobs.list(vm_path=vm_path, kind=JobKind.BACKUP)

    async def points(self, vm_path: str) -> list[Point]:
        """A VM's completed restore points, by disk and age."""
        return await self._repository.points(vm_path)

    async def stored_bytes(self, points: list[Point]) -> dict[str, int | None]:
        """The bytes each point's own data takes in the repository, by point ID (None: gone meanwhile)."""
        return await self._repository.allocated(points)

    async def last_backup(self, vm_path: str, disk_key: int) -> Point | None:
        """The latest completed point of a disk that has a change ID and is not damaged (where the next
        incremental starts)."""
        return (await self._repository.base_for(vm_path, disk_key))[0]

    async def port_status(self) -> PortsView:
        """The port pool's leases and the running exports."""
        return PortsView(await self._ports.status(), await self._exports.stats(), self._exports.workers())

    async def repository_usage(self) -> capacity.Usage:
        """The repository's space and its completed points, with the configured reserve."""
        return await capacity.usage(self._repository, min_free=self.config.min_free)

    async def space_history(self, since: float) -> list[SpaceSample]:
        """The repository's space sampled since ``since`` (epoch seconds, the hub's clock), oldest first."""
        return await self._space.since(since)

    async def retention_preview(self, policy: Policy) -> list[PreviewVM]:
        """What ``policy``'s retention rules alone keep of each VM in the repository it covers, by VM path."""
        covered = policy.vms.select(await self.stored_vms())
        return [preview_vm(vm_path, await self.points(vm_path), policy) for vm_path in covered]

    # -- backups -----------------------------------------------------------------

    async def create_backup(self, request: req.BackupRequest) -> Job:
        """Start a backup job: a point and an export per disk, then the node is told to push to them.

        Refused before any port is leased or image made: a VM with a backup job pending or running
        (``Conflict`` ``vm_busy``), and a repository without room for the job's expected size, the
        reserve and what the backups pending or running still expect to write (:class:`InsufficientSpace`).
        Each disk's full copy gets its reason here (first backup, base missing, failed verify, the policy's
        chain cap, or full asked for).
        """
        await self._jobs.refuse_busy(request.vm_path)
        node_name, node = await self._node_of(request.node)
        record = await self.nodes.find(node_name) if node_name is not None else None
        route = self._route(record)
        try:
            disks = await self._disks_to_back_up(request, node)
        except NodeUnavailable as exc:  # a failed job, listed (the node's 404 or odd answer: only refused)
            await self._node_unavailable(request, node_name, exc)
            raise
        plans = [await self._plan_disk(request, disk) for disk in disks]
        needs = [plan.need for plan in plans]
        reason = next((plan.reason for plan in plans if plan.reason is not None), None)
        # the check sees every job created before, on every hub
        async with self._admission, self._repository.cluster_lock("admission"):
            expected = await self._jobs.expected()
            held = await capacity.reserved(self._repository, expected)
            await capacity.check_space(
                self._repository, request.vm_path, needs, min_free=self.config.min_free, held=held, jobs=len(expected)
            )
            job = await self._jobs.create(
                JobKind.BACKUP, request.vm_path, request.mode, BackupDetail(), lifetime=self.config.job_timeout,
                node=node_name, policy=request.policy, full_reason=reason, exclusive=True,
                expected_bytes=sum(need.expected for need in needs),
            )  # fmt: skip
        prepared: list[DiskExport] = []
        try:
            for plan in plans:
                prepared.append(await self._prepare_disk(job.id, request, plan, route, node_name))
            job = await self._jobs.transition(job.id, JobState.RUNNING, detail=BackupDetail(tuple(prepared)))
            if node is not None:
                targets = {disk.disk_key: disk.uri for disk in prepared}
                api_url = (record.hub_url if record is not None else None) or self.config.public_url
                await node.start_backup(job.id, request.vm_path, request.mode, targets, api_url)
        except BaseException as exc:
            await self._cleanup(job.id, prepared)
            with contextlib.suppress(JobStateError):
                await self._jobs.transition(job.id, JobState.FAILED, error=_start_failure(exc))
            if isinstance(exc, Exception):
                await self._alert_failed(await self._jobs.get(job.id))
            raise
        return job

    async def _node_of(self, name: str | None) -> tuple[str | None, NodeClient | None]:
        """The node a backup goes to (by name; None: the default node) and its client; (None, None)
        when no node is named and there is no default (the job then waits for a node told some other way)."""
        if name is None and await self.nodes.find(None) is None:
            return None, None
        return name or DEFAULT, await self.nodes.client(name)

    async def _node_unavailable(self, request: req.BackupRequest, node: str | None, exc: NodeError) -> None:
        """Record the backup its node could not start as a failed job (listed; retried at the next schedule)."""
        job = await self._jobs.create(
            JobKind.BACKUP, request.vm_path, request.mode, BackupDetail(), lifetime=self.config.job_timeout,
            node=node, policy=request.policy,
        )  # fmt: skip
        await self._jobs.transition(job.id, JobState.FAILED, error=_start_failure(exc))
        await self._alert_failed(await self._jobs.get(job.id))

    async def _disks_to_back_up(self, request: req.BackupRequest, node: NodeClient | None) -> tuple[req.DiskSpec, ...]:
        """The request's disks (or the node's list of the VM's disks), each with a size where it needs one."""
        disks = request.disks
        if disks is None:
            if node is None:
                raise InvalidBackup("give disks ([{key, capacity}]): no node is configured to list them")
            disks = await node.disks(request.vm_path)
        return disks

    async def _plan_disk(self, request: req.BackupRequest, disk: req.DiskSpec) -> _DiskPlan:
        """Full (and why) or incremental for one disk, and the bytes its new point is expected to take.

        The repository's reason wins (no point yet: first backup, or base missing when a completed job
        had the disk; a damaged or unusable newest point); then the request's (a policy's chain cap),
        then mode full (requested), then a disk whose capacity differs from its newest point's size
        (``cbt_reset``, as the node says: it copies a resized disk whole)."""
        base, reason = await self._repository.base_for(request.vm_path, disk.key)
        if reason is FullReason.FIRST_BACKUP and await self._jobs.backed_up(request.vm_path, disk.key):
            reason = FullReason.BASE_MISSING
        if reason is None:
            reason = request.full_reason or (FullReason.REQUESTED if request.mode is Mode.FULL else None)
        latest = base or await self._repository.latest(request.vm_path, disk.key)
        if reason is None and latest is not None and disk.capacity is not None and disk.capacity != latest.size:
            reason = FullReason.CBT_RESET  # the disk was resized: the node copies it whole, into a point of its size
        size = disk.capacity if disk.capacity is not None else None if latest is None else latest.size
        if size is None:
            raise InvalidBackup(f"disk {disk.key}: give its capacity (no completed point to build an incremental on)")
        need = await capacity.disk_need(self._repository, request.vm_path, disk.key, size, full=reason is not None)
        return _DiskPlan(disk, reason, need)

    def _route(self, node: NodeRecord | None) -> Route:
        """How a backup's node reaches its exports: over TLS when the hub requires it or the node's transport
        is ``tls``, at the node's ``nbd_host``, else ``--nbd-advertise``, else ``--nbd-bind``
        (:meth:`ExportTLS.route`: :class:`Conflict` when that cannot work). A job without a node: the
        default host, TLS when the hub requires it."""
        if node is None:
            return self._tls.restore_route()
        return self._tls.route(node.name, node.transport, node.nbd_host, pinned=node.tls_pinned)

    async def _prepare_disk(
        self, job_id: str, request: req.BackupRequest, plan: _DiskPlan, route: Route, node: str | None
    ) -> DiskExport:
        """The disk's new point, served on a leased port (over TLS if ``route`` says so; with client
        certificates, to ``node``'s certificate only)."""
        disk = plan.disk
        point = await self._repository.new_point(
            request.vm_path, disk.key, job_id, incremental=plan.reason is None, capacity=disk.capacity
        )
        try:
            allocation = await self._ports.allocate(self.holder, job_id, disk.key)
            try:
                name = f"{job_id}-{disk.key}"
                running = await self._exports.start(
                    job_id, disk.key, name, point.path, allocation.socket,
                    opener=self._repository.opener(point, readonly=False), tls=route.tls,
                    admit_peer=self._tls.peer_check(node, route.tls),
                )  # fmt: skip
            except BaseException:
                allocation.socket.close()
                await self._ports.release(port=allocation.lease.port)
                raise
        except BaseException:
            await self._repository.discard(point.id)
            raise
        uri = route.uri(running.port, name)
        reason = None if plan.reason is None else plan.reason.value
        return DiskExport(disk.key, running.port, name, uri, point.id, point.kind, point.backing, full_reason=reason)

    async def _cleanup(self, job_id: str, disks: list[DiskExport] | tuple[DiskExport, ...]) -> None:
        """Stop a failed job's exports, discard its points, release its ports: the images go first, so a
        repository that ran full has room again for the store's own writes. A failed flush (ENOSPC) of
        an image about to be discarded is logged; the export is stopped and its file closed all the same."""
        while True:
            try:
                await self._exports.stop_job(job_id)
                break
            except (SendenseError, OSError) as exc:  # each failure stopped one export: go on with the rest
                log.warning("stopping an export of %s, whose points are discarded: %s", job_id, exc)
        for disk in disks:
            await self._repository.discard(disk.point_id)
        await self._ports.release(job_id=job_id)

    async def progress(self, job_id: str, report: req.Progress) -> Job:
        """Record a node's progress report of a job (:class:`OtherHub` for another live hub's job)."""
        await self._owned(await self._jobs.get(job_id))
        return await self._jobs.set_progress(job_id, report)

    async def complete(self, job_id: str, report: req.Completion) -> Job:
        """Record a job's end. Everything is checked before anything changes; a failure after the
        exports stopped fails the job, so no job stays running without its exports."""
        async with await self._lock(job_id):
            job = await self._jobs.get(job_id)
            await self._owned(job)
            _check_completion(job, report)
            if report.failure is not None:
                return await self._fail(job_id, _space_code(report.failure))
            try:
                await self._jobs.enter_stage(job_id, "completing")
                await self._exports.stop_job(job_id)  # flushes every point before it counts
                reported = {d.disk_key: d for d in report.disks}
                await self._repository.complete([(d.point_id, reported[d.disk_key]) for d in job.disks])
                await self._ports.release(job_id=job_id)
                disks = tuple(_with_figures(d, reported[d.disk_key]) for d in job.disks)
                job = await self._jobs.transition(
                    job_id, JobState.COMPLETED, detail=BackupDetail(disks), outcome=_outcome(disks)
                )
            except Exception as exc:
                log.error("completing %s failed: %s", job_id, exc)
                code = "insufficient_space" if _out_of_space(exc) else None
                await self._fail(job_id, req.Failure("complete", f"recording the completion failed: {exc}", code))
                raise
        await self._check_repeated_full(job)
        try:  # before retention runs: a point waiting for its offsite copy is protected from merges
            await self.copies.after_backup(job.vm_path, [disk.point_id for disk in job.disks])
        except (SendenseError, OSError, sqlite3.Error) as exc:
            log.error("recording the offsite copies of %s failed: %s", job_id, exc)
        # In the background, after the answer: each waits its turn on the disk's lock (a verify may hold it
        # for long), and the node's completion call must not wait for them.
        retention = asyncio.create_task(self._retain(job), name=f"retention of {job_id}")
        self._after.add(retention)
        retention.add_done_callback(self._after.discard)
        self._verifier.digests_after_backup(disk.point_id for disk in job.disks)
        return job

    async def settled(self) -> None:
        """Wait until the retention of every completed job so far has run."""
        while self._after:
            await asyncio.gather(*self._after, return_exceptions=True)

    async def _retain(self, job: Job) -> None:
        """Apply the VM's retention rules to each of the job's disks; recorded as the job's ``retention`` stage.
        Then the repository's space is sampled (at most once a minute)."""
        started = self.clock.now()
        rules = await self._retention_of(job.vm_path)
        for disk in job.disks:
            try:
                await self._repository.apply_retention(job.vm_path, disk.disk_key, rules, protected=self._restoring)
            except (SendenseError, OSError) as exc:
                log.error("retention of %s disk %s failed: %s", job.vm_path, disk.disk_key, exc)
        await self._jobs.add_stage(job.id, "retention", started)
        await self._space.after_backup()

    async def _retain_disk(self, vm_path: str, disk_key: int) -> None:
        """Apply the VM's retention rules to one disk (after its offsite copies ended: they kept its points)."""
        rules = await self._retention_of(vm_path)
        await self._repository.apply_retention(vm_path, disk_key, rules, protected=self._restoring)

    async def _retention_of(self, vm_path: str) -> list[tuple[Retention, str]]:
        """The rules of a VM's points: those of every policy whose selection covers it (enabled or not),
        each with its schedule's time zone; a VM no policy covers: ``--keep N`` as ``keep_last``."""
        covering = [s.policy for s in await self.scheduler.store.all() if s.policy.vms.select([vm_path])]
        if covering:
            return [retention_rules(policy) for policy in covering]
        return [(Retention(keep_last=self.config.keep_points), "UTC")]

    async def _restoring(self) -> set[str]:
        """The points a restore job that has not ended serves or converts, and those waiting for an offsite
        copy (retention keeps them)."""
        active = await self._jobs.list(kind=JobKind.RESTORE, state=JobState.RUNNING)
        active += await self._jobs.list(kind=JobKind.RESTORE, state=JobState.PENDING)
        restoring = {job.detail.point_id for job in active if isinstance(job.detail, (ExportDetail, ConvertDetail))}
        return restoring | await self.copies.protected()

    async def _policies(self) -> list[Policy]:
        """Every stored policy (for offsite copies: which VMs have a copy target)."""
        return [stored.policy for stored in await self.scheduler.store.all()]

    async def _serve_copy(self, owner: str, disk_key: int | None, spec: ExportSpec) -> int:
        """Serve an offsite copy's export (``spec``; ``owner`` holds its port lease) on a leased port; the port."""
        allocation = await self._ports.allocate(self.holder, owner, disk_key, purpose=JobKind.RESTORE)
        try:
            running = await self._exports.start(
                owner, disk_key, spec.name, spec.path, allocation.socket, opener=spec.opener, readonly=True,
                tls=spec.tls, admit_peer=spec.admit_peer,
            )  # fmt: skip
        except BaseException:
            allocation.socket.close()
            await self._ports.release(job_id=owner)
            raise
        return running.port

    async def _release_copy_port(self, owner: str) -> None:
        """Stop an offsite copy's export (flushed and closed; gone already if its worker died) and release its port."""
        try:
            with contextlib.suppress(ExportWorkerError):
                await self._exports.stop_job(owner)
        finally:
            await self._ports.release(job_id=owner)

    async def _fail(self, job_id: str, failure: req.Failure, state: JobState = JobState.FAILED) -> Job:
        job = await self._jobs.get(job_id)
        await self._cleanup(job_id, job.disks)
        try:
            ended = await self._jobs.transition(job_id, state, error=failure)
        except JobStateError:
            return await self._jobs.get(job_id)
        await self._alert_failed(ended)
        return ended

    async def _alert_damaged(self, point: Point, verdict: PointVerdict) -> None:
        """VERIFY_FAILED for a point a verify found damaged (keyed by the point)."""
        where = "" if verdict.bad_offset is None else f" at offset {verdict.bad_offset}"
        message = f"point {point.id} of disk {point.disk_key} is damaged{where}: {verdict.error}"
        detail = attrs.asdict(verdict)
        await self.alerts.fire(AlertKind.VERIFY_FAILED, point.vm_path, message, key=point.id, detail=detail)

    async def _alert_failed(self, job: Job) -> None:
        """JOB_FAILED for a backup or verify job that failed (not cancelled; a restore answers its caller)."""
        if job.kind is JobKind.RESTORE or job.state is not JobState.FAILED or job.error is None:
            return
        error = job.error
        message = f"{job.kind.value} job {job.id} failed at {error.stage}: {error.message}"
        detail = {"job_id": job.id, "job_kind": job.kind.value, **error.to_json()}
        await self.alerts.fire(AlertKind.JOB_FAILED, job.vm_path, message, key=job.id, detail=detail)

    async def _check_repeated_full(self, job: Job) -> None:
        """REPEATED_FULL when this backup and the VM's previous completed one both fell back to a full copy."""
        done = await self._jobs.list(vm_path=job.vm_path, kind=JobKind.BACKUP, state=JobState.COMPLETED)
        earlier = [other for other in done if other.id != job.id and other.created <= job.created]
        if not earlier:
            return
        previous = earlier[-1]
        reasons = [None if j.full_reason is None else j.full_reason.value for j in (previous, job)]
        if repeated_full(reasons[1], reasons[0]):
            message = (
                f"two full copies in a row that were not planned: {reasons[0]} (job {previous.id}), "
                f"then {reasons[1]} (job {job.id}); check CBT on the VM and its points"
            )
            detail = {"job_id": job.id, "previous_job_id": previous.id, "reasons": reasons}
            await self.alerts.fire(AlertKind.REPEATED_FULL, job.vm_path, message, key=job.vm_path, detail=detail)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not ended (the node is told, best effort); its points are discarded."""
        async with await self._lock(job_id):
            job = await self._jobs.get(job_id)
            if job.state.terminal:
                raise JobStateError(f"job {job_id} is already {job.state.value}")
            await self._owned(job)
            if job.node is not None and job.kind is JobKind.BACKUP:
                try:
                    await (await self.nodes.client(job.node)).cancel(job_id)
                except SendenseError as exc:
                    log.warning("the node did not take the cancel of %s: %s", job_id, exc)
            cancelled = req.Failure("cancelled", "cancelled by the API", "cancelled")
            return await self._fail(job_id, cancelled, JobState.CANCELLED)

    # -- restores ----------------------------------------------------------------

    @property
    def restores_need_reader(self) -> bool:
        """Whether a restore's (and an offsite copy's) export must name its reader: it is TLS with client
        certificates, and admits only the certificate the reader names."""
        return self._tls.binds_readers(self._tls.restore_route())

    async def restore(self, request: req.RestoreRequest) -> Job:
        """Serve a completed point over NBD (read-only), convert it to a new file in the restore directory, or
        clone it to a new RBD image (an RBD repository)."""
        point = await self._repository.point(request.point_id)
        # Under the disk's lock (so no retention merge rewrites its files meanwhile): the export's start
        # (the running job then protects the point) or the whole convert.
        async with self._repository.disk_lock(point.vm_path, point.disk_key):
            point = await self._repository.point(request.point_id)
            if point.status is not PointStatus.COMPLETED:
                raise Conflict(f"point {point.id} is not a completed restore point", "not_restorable")
            if request.action is req.RestoreAction.EXPORT:
                return await self._export_point(point, request.reader)
            if request.action is req.RestoreAction.CLONE:
                return await self._clone_point(point, request)
            return await self._convert_point(point, request)

    async def _clone_point(self, point: Point, request: req.RestoreRequest) -> Job:
        """A new RBD image from the point (refused before any job when the repository cannot clone)."""
        assert request.name is not None
        target = self._repository.store.clone_target(request.name)
        detail = ConvertDetail(point.id, target, ImageFormat.RAW)
        job = await self._jobs.create(
            JobKind.RESTORE, point.vm_path, req.RestoreAction.CLONE, detail, lifetime=self.config.job_timeout
        )
        await self._jobs.transition(job.id, JobState.RUNNING)
        try:
            await self._repository.clone(point, request.name)
        except (SendenseError, OSError) as exc:
            code = exc.code if isinstance(exc, Conflict) else "insufficient_space" if _out_of_space(exc) else None
            return await self._jobs.transition(job.id, JobState.FAILED, error=req.Failure("clone", str(exc), code))
        return await self._jobs.transition(job.id, JobState.COMPLETED)

    async def _convert_point(self, point: Point, request: req.RestoreRequest) -> Job:
        assert request.name is not None
        path = os.path.join(self.restore_dir, request.name)
        if await asyncio.to_thread(os.path.lexists, path):
            raise Conflict(f"{request.name} exists in the restore directory {self.restore_dir}", "exists")
        detail = ConvertDetail(point.id, path, request.fmt)
        job = await self._jobs.create(
            JobKind.RESTORE, point.vm_path, req.RestoreAction.CONVERT, detail, lifetime=self.config.job_timeout
        )
        await self._jobs.transition(job.id, JobState.RUNNING)
        try:
            await self._repository.convert(point, path, request.fmt)
        except (SendenseError, OSError) as exc:
            return await self._jobs.transition(job.id, JobState.FAILED, error=req.Failure("convert", str(exc)))
        return await self._jobs.transition(job.id, JobState.COMPLETED)

    async def _export_point(self, point: Point, reader: str | None) -> Job:
        route = self._tls.restore_route()  # restores: TLS when the hub requires it
        admit = self._tls.reader_check(route, reader, "a restore's export")  # with client certificates: one
        job = await self._jobs.create(
            JobKind.RESTORE, point.vm_path, req.RestoreAction.EXPORT, None, lifetime=self.config.job_timeout
        )
        try:
            allocation = await self._ports.allocate(self.holder, job.id, point.disk_key, purpose=JobKind.RESTORE)
            try:
                running = await self._exports.start(
                    job.id, point.disk_key, f"restore-{point.id}", point.path, allocation.socket,
                    opener=self._repository.opener(point, readonly=True), readonly=True, tls=route.tls,
                    admit_peer=admit,
                )  # fmt: skip
            except BaseException:
                allocation.socket.close()
                raise
        except BaseException as exc:
            await self._ports.release(job_id=job.id)
            await self._jobs.transition(job.id, JobState.FAILED, error=req.Failure("export", str(exc)))
            raise
        detail = ExportDetail(point.id, running.port, running.name, route.uri(running.port, running.name), reader)
        return await self._jobs.transition(job.id, JobState.RUNNING, detail=detail)

    async def stop_restore(self, job_id: str) -> Job:
        """Stop a restore job's export (if any) and mark it completed; a finished one is returned as is."""
        job = await self._jobs.get(job_id)
        if job.kind is not JobKind.RESTORE:
            raise UnknownJob(f"{job_id} is not a restore job")
        if not job.state.terminal:
            await self._owned(job)
        with contextlib.suppress(ExportWorkerError):  # a dead worker's export: the job fails worker_crashed
            await self._exports.stop_job(job_id)
        await self._ports.release(job_id=job_id)
        with contextlib.suppress(JobStateError):
            return await self._jobs.transition(job_id, JobState.COMPLETED)
        return await self._jobs.get(job_id)

    # -- verify ------------------------------------------------------------------

    async def verify(self, request: VerifyRequest) -> Job:
        """Start a verify job over a VM's points or one point's chain; it runs in the background."""
        return await self._verifier.start(request)

    # -- policies (the scheduler's calls) and status ---------------------------------

    async def start_policy_backup(self, policy: Policy, vm_path: str, mode: Mode, reason: FullReason | None) -> Job:
        """One VM's backup for a policy's run; a failure after this call recorded a job (a node that did not
        answer) gives that failed job back, any other (a VM the node does not know, refused before a job
        exists) is raised. Never an older job of the VM."""
        request = req.BackupRequest(vm_path, mode, None, node=policy.node, policy=policy.name, full_reason=reason)
        before = {job.id for job in await self._jobs.list(vm_path=vm_path, kind=JobKind.BACKUP)}
        try:
            return await self.create_backup(request)
        except SendenseError:
            made = [
                job for job in await self._jobs.list(vm_path=vm_path, kind=JobKind.BACKUP)
                if job.id not in before and job.policy == policy.name and job.state.terminal
            ]  # fmt: skip
            if made:
                return made[-1]
            raise

    async def start_policy_verify(self, policy: Policy, vm_path: str) -> Job:
        """A verify job of one VM's points for a policy's verify schedule."""
        return await self.verify(VerifyRequest(vm_path=vm_path))

    async def policy_vms(self, policy: Policy) -> list[str]:
        """Every VM the policy's node knows (its inventory paths)."""
        return await self.nodes.list_vms(policy.node)

    async def stored_vms(self) -> list[str]:
        """The VMs that have completed points."""
        return await self._repository.vm_paths()

    async def busy(self, vm_path: str) -> bool:
        """Whether the VM has a backup job pending or running."""
        try:
            await self._jobs.refuse_busy(vm_path)
        except Conflict:
            return True
        return False

    async def incrementals(self, vm_path: str) -> int:
        """How many incremental backups of the VM completed since its last full one (by its jobs: retention
        merges relabel points, so their kinds do not tell the chain's history)."""
        count = 0
        for job in reversed(await self._jobs.list(vm_path=vm_path, kind=JobKind.BACKUP, state=JobState.COMPLETED)):
            if job.full_reason is not None:
                break
            count += 1
        return count

    async def node_jobs(self, node: str | None) -> int:
        """How many backup jobs are pending or running on a node (None: the default node)."""
        name = node or DEFAULT
        active = await self._jobs.list(kind=JobKind.BACKUP, state=JobState.RUNNING)
        active += await self._jobs.list(kind=JobKind.BACKUP, state=JobState.PENDING)
        return sum(1 for job in active if job.node == name)

    async def check_node(self, node: str | None) -> None:
        """Refuse a node that is not registered (:class:`UnknownNode`)."""
        await self.nodes.get(node)

    async def status(self) -> dict[str, object]:
        """The hub at a glance (``GET /status``): running jobs, VMs at risk, space, ports, nodes, policies."""
        running = await self._jobs.list(state=JobState.RUNNING) + await self._jobs.list(state=JobState.PENDING)
        policies = await self.scheduler.store.all()
        now = self.clock.now()
        return {
            "time": now,
            "running": [
                {"job_id": job.id, "kind": job.kind.value, "vm_path": job.vm_path, "state": job.state.value,
                 "policy": job.policy, "node": job.node,
                 "progress": None if job.progress is None else job.progress.to_json()}
                for job in sorted(running, key=lambda job: job.created)
            ],
            "at_risk": await self.scheduler.at_risk(policies, now),
            "repository": (await self.repository_usage()).to_json(),
            "ports": (await self._ports.status()).to_json(),
            "nodes": [node.to_json() for node in await self.nodes.records()],
            "policies": await self.scheduler.views(),
            "alerts": [alert.to_json() for alert in await self.alerts.list(AlertQuery(active=True))],
        }  # fmt: skip


def _start_failure(exc: BaseException) -> req.Failure:
    """Why a backup could not start: ``node_unavailable`` (no answer, or 5xx), ``node_refused`` (the
    node refused the job), else no code."""
    message = str(exc) or type(exc).__name__
    if _out_of_space(exc):
        return req.Failure("starting", message, "insufficient_space")
    if isinstance(exc, NodeUnavailable):
        return req.Failure("starting", message, "node_unavailable")
    return req.Failure("starting", message, "node_refused" if isinstance(exc, NodeError) else None)


def _out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it stands for) is the repository's filesystem or the store running full."""
    seen: BaseException | None = exc
    for _ in range(16):  # a chain of causes, bounded
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if isinstance(seen, sqlite3.OperationalError) and "full" in str(seen):
            return True
        if getattr(seen, "sqlstate", None) == "53100":  # PostgreSQL's disk_full (psycopg's error, chained)
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _space_code(failure: req.Failure) -> req.Failure:
    """A node's failure report whose write failed with ENOSPC (only the hub's exports, writing to the
    repository, answer that) gets the code ``insufficient_space``."""
    return attrs.evolve(failure, code="insufficient_space") if "ENOSPC" in failure.message else failure


@attrs.frozen
class _DiskPlan:
    """One disk of a backup about to start: full (``reason``) or incremental, and its expected size."""

    disk: req.DiskSpec
    reason: FullReason | None
    need: capacity.DiskNeed


def _with_figures(disk: DiskExport, reported: req.ReportedDisk) -> DiskExport:
    """The job's disk with the bytes its node reported sending and changing, and why it was full (the
    hub's reason, else the node's)."""
    reason = disk.full_reason or (None if reported.full_reason is None else reported.full_reason.value)
    return attrs.evolve(
        disk,
        bytes_changed=reported.bytes_changed,
        bytes_transferred=reported.bytes_transferred,
        full_reason=reason,
        full_reason_detail=reported.full_reason_detail,
    )


def _outcome(disks: tuple[DiskExport, ...]) -> Outcome:
    """A completed job's reason (its first full disk's) and byte sums (None if a disk did not report)."""
    reason = next((FullReason(d.full_reason) for d in disks if d.full_reason is not None), None)
    changed = [d.bytes_changed for d in disks]
    sent = [d.bytes_transferred for d in disks]
    return Outcome(
        reason,
        None if None in changed else sum(c for c in changed if c is not None),
        None if None in sent else sum(c for c in sent if c is not None),
    )


def _check_completion(job: Job, report: req.Completion) -> None:
    """Refuse a completion that does not fit the job, before anything changes."""
    if job.kind is not JobKind.BACKUP:
        raise UnknownJob(f"{job.id} is not a backup job")
    if job.state.terminal:
        raise JobStateError(f"job {job.id} is already {job.state.value}")
    if report.vm_path is not None and report.vm_path != job.vm_path:
        raise CompletionMismatch(f"the completion is for {report.vm_path}, job {job.id} backs up {job.vm_path}")
    if report.failure is not None:
        return
    reported = sorted(d.disk_key for d in report.disks)
    expected = sorted(d.disk_key for d in job.disks)
    if reported != expected:
        raise CompletionMismatch(f"the completion names disks {reported}, the job has {expected}")


def _open_restore_dir(path: str) -> str:
    """Create the restore directory (0700) if needed; refuse one that is a symlink or not a directory."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise RepositoryError(f"restore directory {path}: {exc.strerror or exc} (give a real directory)") from exc
    os.close(fd)
    return path


def _sweep_temporaries(folder: str) -> list[str]:
    """Remove the temporary files interrupted converts left in ``folder``."""
    removed = []
    for entry in os.scandir(folder):
        if is_temporary(entry.name) and entry.is_file(follow_symlinks=False):
            remove_quietly(entry.path)
            log.warning("removed %s: an interrupted restore", entry.path)
            removed.append(entry.path)
    return removed
