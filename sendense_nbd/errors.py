"""The one exception tree of sendense-nbd: every public exception is defined here.

::

    SendenseError                  base of every error this package raises on purpose
    ├── ProtocolError              the peer broke the NBD protocol: drop that connection
    ├── LocalProtocolError         our own code misused a protocol object (a bug)
    ├── OptionError                the server refused a handshake option (e.g. an unknown export)
    ├── DeviceError                a block-device operation failed; carries the NBD errno
    ├── ImageError                 an image cannot be opened or created as asked
    │   └── RbdError               an RBD image cannot be reached, opened or created (cluster, auth, pool)
    │       ├── RbdSpecError       an rbd: filename or its json: form is malformed or asks what is not supported
    │       ├── RbdNotFound        no such pool, namespace, image or snapshot
    │       └── RbdPermissionDenied  the Ceph user's caps do not allow it (cephx EACCES/EPERM)
    ├── ServerError                a server cannot start (address in use, bad export set-up)
    │   └── ExportWorkerError      an export worker process died, stopped answering or could not start
    ├── NBDRequestError            an NBD request failed: the server's errno reply, or a local check
    ├── NBDConnectionError         the client cannot connect, or the connection is gone (a ConnectionError)
    │   └── ConnectionLostError    the connection dropped or broke the protocol with requests in flight
    ├── NBDTimeoutError            connecting, negotiating or a request took too long (a TimeoutError)
    ├── URIError                   a string is not a usable NBD URI (a ValueError)
    ├── EndpointError              a copy endpoint failed; ``transient`` says if a retry may help
    ├── CopyError                  a copy failed; names the offset and the ranges already done
    │   └── VerifyError            source and target differ after the copy
    ├── VSphereError               vCenter/ESXi refused or failed a call (login, inventory, task)
    │   └── ChangeIdError          a CBT change ID is no longer valid (a CBT reset)
    ├── DiskSourceError            nbdkit could not serve a VMware disk
    ├── HubApiError                the hub API (OMA_API_URL) failed or refused a call
    ├── BackupError                a backup job failed; names its stage
    │   └── SnapshotNotRemoved     the data was copied, but the job's snapshot could not be removed
    ├── TunnelError                the SSH tunnel cannot start or run (key, host key, login, option)
    ├── TLSError                   TLS credentials cannot be used (file missing, unreadable, bad PEM, key
    │                              not matching its certificate), a pin or a TLS handshake failed
    ├── ConfigError                the node's configuration file is missing, malformed or unsafe
    │   ├── ClockSkew              this machine's clock is too far off the database server's (hubs need NTP)
    │   └── HubIdInUse             another live process of the cluster runs with this hub's ID
    ├── NodeBusy                   the node's queue of waiting jobs is full (503)
    ├── BadRequest                 an HTTP API request is malformed (400)
    ├── Conflict                   a request clashes with the current state (409, with its code)
    ├── JobStateError              a hub job cannot move to the asked state (e.g. completed twice)
    ├── UnknownJob                 no hub job has this ID
    ├── InvalidBackup              a backup cannot start as asked (no disks to back up, a size missing; 400)
    ├── CompletionMismatch         a node's completion names another VM or other disks than its job (400)
    ├── RepositoryError            a backup repository operation cannot be done as asked
    │   ├── UnknownPoint           no restore point has this ID
    │   ├── InsufficientSpace      the repository has no room for a backup's expected size (507)
    │   └── RepositoryClaimed      another hub claimed a new RBD repository first (a cluster's hubs started at once)
    ├── UnknownPolicy              no backup policy has this name (404)
    ├── NodeError                  a node refused or did not answer the hub
    │   ├── NodeNotFound           the node does not know the VM or job asked for
    │   └── NodeUnavailable        the node did not answer, or answered 5xx (its jobs fail node_unavailable)
    ├── UnknownNode                no node is registered in the hub under this name (404)
    ├── OffsiteError               an offsite copy (S3) cannot be made, read or deleted as asked
    │   ├── CopyLocked             S3 refused to delete a copy its Object Lock still protects (409)
    │   ├── CopyDamaged            a copy read back differs from its manifest or its recorded digests
    │   ├── UnknownCopy            no offsite copy has this ID (404)
    │   └── UploadTakenOver        another live hub took over a copy's upload (this hub stops it between parts)
    ├── StoreError                 the hub's store (SQLite or PostgreSQL) cannot be opened, migrated or used
    │   └── StoreUnavailable       PostgreSQL unreachable, the connection dropped, or a bound passed (503)
    ├── PortError                  the NBD port pool cannot satisfy a request
    ├── OtherHub                   the job runs on another live hub of the cluster (307 to its API, else 409)
    └── ClusterLockTimeout         another live hub held a cluster lock past the wait limit (503)

Foreign exceptions (``OSError``) are translated at the boundary with
``raise ... from exc`` so callers only need to catch ``SendenseError``. A
failed task group is reduced to the one error it stands for by
:func:`first_error`.

This module imports nothing heavy: the sans-IO protocol layer and the
fast-starting copy command import it. The NBD constants that messages name
are imported late, because the protocol package imports this module.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from sendense_nbd.protocol.constants import Errno

_E = TypeVar("_E", bound=enum.IntEnum)


class SendenseError(Exception):
    """Base class of every error this package raises on purpose."""


class ProtocolError(SendenseError):
    """The remote peer sent something the NBD protocol forbids.

    The only safe reaction is to drop that one connection.
    """


class LocalProtocolError(SendenseError):
    """A protocol object was driven in a way its state does not allow."""


class OptionError(SendenseError):
    """The server refused an option the handshake cannot do without.

    ``reply`` is the ``NBD_REP_ERR_*`` code (None when the server just hung
    up, which is how ``NBD_OPT_EXPORT_NAME`` refuses) and ``server_message``
    the text the server sent with it. The connection cannot go on. A refusal
    is the server's right, not a protocol violation: this is no ProtocolError.
    """

    def __init__(self, option: int, reply: int | None, server_message: str, export: str = "") -> None:
        from sendense_nbd.protocol.constants import Option, OptionReply  # late: see the module docstring

        self.option = option
        self.reply = reply
        self.server_message = server_message
        self.export = export
        known = _member(Option, option)
        name = known.name if known is not None else str(option)
        code = "a hang-up" if reply is None else _reply_name(_member(OptionReply, reply), reply)
        text = f"NBD_OPT_{name} for export {export!r} refused with {code}"
        shown = server_message if len(server_message) <= 1024 else server_message[:1021] + "..."
        super().__init__(f"{text}: {shown}" if server_message else text)

    @property
    def unknown_export(self) -> bool:
        """The server does not have the export that was asked for."""
        from sendense_nbd.protocol.constants import Option, OptionReply

        return self.reply == OptionReply.ERR_UNKNOWN or (self.reply is None and self.option == Option.EXPORT_NAME)


class DeviceError(SendenseError):
    """A block-device request failed; ``errno`` is what goes on the wire."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        #: An NBD errno (``sendense_nbd.protocol.Errno``), not an OS one.
        self.errno = errno


class ImageError(SendenseError):
    """An image file cannot be opened or created the way it was asked."""


class RbdError(ImageError):
    """An RBD image cannot be reached, opened or created: the cluster, the connection or the pool said no."""


class RbdSpecError(RbdError):
    """An ``rbd:`` filename (or its ``json:`` form) is malformed, or asks for what is not supported."""


class RbdNotFound(RbdError):
    """The pool, namespace, image or snapshot named does not exist."""


class RbdPermissionDenied(RbdError):
    """The Ceph user may not do this (its caps; ``profile rbd pool=POOL`` is what a device needs)."""


class ServerError(SendenseError):
    """The server cannot start or serve as configured."""


class ExportWorkerError(ServerError):
    """An export worker process of the hub died, stopped answering or could not start: its exports are gone."""


class NBDRequestError(SendenseError):
    """A request failed: the server's error reply, or a check that would fail
    on the server too. ``errno`` is the NBD error (an unknown value counts as
    ``EINVAL``, as the spec says; ``raw_errno`` keeps what was sent)."""

    def __init__(self, errno: int, message: str = "", *, command: int | None = None, offset: int | None = None) -> None:
        from sendense_nbd.protocol.constants import Command, Errno  # late: see the module docstring

        known = _member(Errno, errno)
        self.raw_errno = errno
        self.errno: Errno = known if known is not None else Errno.EINVAL
        self.server_message = message
        self.command = command
        self.offset = offset
        what = Command(command).name if command is not None else "request"
        text = f"{what} failed: {known.name if known is not None else f'errno {errno}'}"
        super().__init__(f"{text}: {message}" if message else text)


class NBDConnectionError(SendenseError, ConnectionError):
    """The connection to the server could not be made or is gone."""


class ConnectionLostError(NBDConnectionError):
    """The connection dropped (or broke the protocol) with requests in flight."""


class NBDTimeoutError(SendenseError, TimeoutError):
    """Connecting, negotiating or a request took longer than allowed."""


class URIError(SendenseError, ValueError):
    """A string is not an NBD URI this client can use."""


class EndpointError(SendenseError):
    """An endpoint operation failed; ``transient`` failures are worth a retry."""

    def __init__(self, message: str, *, transient: bool, offset: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.offset = offset


class CopyError(SendenseError):
    """A copy failed; ``offset`` is where (None: not tied to one range);
    ``completed`` lists the ``(offset, length)`` ranges with nothing left to
    do: durable writes, and ranges the plan skips."""

    def __init__(self, message: str, *, offset: int | None = None, completed: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(message)
        self.offset = offset
        self.completed = completed


class VerifyError(CopyError):
    """Source and target differ; ``offset`` is the first differing byte."""


class VSphereError(SendenseError):
    """vCenter or ESXi refused or failed a call (login, inventory lookup, a task)."""


class ChangeIdError(VSphereError):
    """A CBT change ID is no longer valid (CBT was reset): a full copy is needed."""


class DiskSourceError(SendenseError):
    """nbdkit could not start or serve a VMware disk."""


class HubApiError(SendenseError):
    """The hub API failed or refused a call; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BackupError(SendenseError):
    """A backup job failed; ``stage`` is where (e.g. ``"transferring"``).

    ``reason`` is the error it stands for (the hub or vSphere failing at that
    stage); None when the job itself found the problem.
    """

    def __init__(self, message: str, stage: str, *, reason: Exception | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.reason = reason


class SnapshotNotRemoved(BackupError):
    """The disks were copied, but the job's snapshot could not be removed (the next run removes it)."""


class TunnelError(SendenseError):
    """The SSH tunnel cannot start or run as configured (bad option, key, host key, refused login)."""


class TLSError(SendenseError):
    """TLS credentials cannot be loaded or made as asked, a certificate pin does not match, or a TLS
    handshake failed; the message names the file or the reason an operator can act on."""


class ConfigError(SendenseError):
    """A configuration (a node's file, a hub's options) is missing, malformed or unsafe."""


class ClockSkew(ConfigError):
    """This machine's clock differs from the hub store's PostgreSQL server's by more than the cluster allows:
    hubs compare each other's heartbeats, so a cluster's machines need synchronised clocks (NTP)."""


class HubIdInUse(ConfigError):
    """Another process runs with this hub's ID (a reused ``--hub-id`` or a cloned state directory): it is
    refused at join while that process's heartbeat is fresh, and a running hub whose ID another process took
    over stops serving."""


class NodeBusy(SendenseError):
    """The node's queue of waiting jobs is full."""


class BadRequest(SendenseError):
    """A caller's request is invalid: malformed, or asking what cannot be (answered 400)."""


class Conflict(SendenseError):
    """A request clashes with the current state; ``code`` names the clash (e.g. ``busy``, ``conflict``)."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code


class JobStateError(SendenseError):
    """A job cannot move to the asked state (e.g. completing it twice)."""


class UnknownJob(SendenseError):
    """No job has this ID."""


class InvalidBackup(SendenseError):
    """A backup cannot start as asked: no disks given and no node to list them, or a disk without
    the capacity its full point needs."""


class CompletionMismatch(SendenseError):
    """A node's completion does not fit its job: it names another VM, or other disks."""


class RepositoryError(SendenseError):
    """A repository operation cannot be done as asked."""


class UnknownPoint(RepositoryError):
    """No restore point has this ID."""


class InsufficientSpace(RepositoryError):
    """The repository has not enough free space for a backup's expected size and the reserve (507)."""


class RepositoryClaimed(RepositoryError):
    """Another process claimed the pool's prefix as a new repository between this claim's read and its write
    (two new hubs of a cluster starting at once): the cluster's repository is the winner's."""


class UnknownPolicy(SendenseError):
    """No backup policy has this name (404)."""


class NodeError(SendenseError):
    """The node refused or did not answer."""


class NodeNotFound(NodeError):
    """The node answered 404: it does not know the VM (or job) asked for."""


class NodeUnavailable(NodeError):
    """The node did not answer (down, unreachable, timed out) or answered a server error (5xx)."""


class UnknownNode(SendenseError):
    """No node is registered in the hub under this name (or there is no default node)."""


class OffsiteError(SendenseError):
    """An offsite copy cannot be made, read or deleted as asked: the bucket refused (credentials, no
    Object Lock, a missing object), did not answer, or a downloaded copy does not match its manifest.
    ``code`` is S3's error code when S3 answered (e.g. ``AccessDenied``), else empty."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class CopyLocked(OffsiteError):
    """S3 refused to delete a copy because its Object Lock retention (or a legal hold) still protects it."""


class CopyDamaged(OffsiteError):
    """A copy read back from the bucket differs from what was recorded: an object's length or sha256 from
    its manifest, a chunk from the digests recorded at backup time (bit rot, tampering)."""


class UnknownCopy(OffsiteError):
    """No offsite copy has this ID."""


class UploadTakenOver(OffsiteError):
    """Another live hub marks itself as the uploader of the copy this hub is uploading: it took the copy
    over while this hub was lost. This hub stops between parts and leaves the copy to that hub."""


class PortError(SendenseError):
    """The pool cannot satisfy a request (exhausted, or a bad range)."""


class StoreError(SendenseError):
    """The hub's store cannot be opened, migrated or used as asked: a bad ``--db`` URL, a schema newer than
    this release, a statement the database refused, or ``db migrate`` into a target that is not empty."""


class StoreUnavailable(StoreError):
    """The PostgreSQL server cannot be reached (refused, timed out, authentication failed), the connection
    to it dropped (the next call connects again), the writer lock stayed taken past ``lock_timeout`` or a
    statement ran past ``statement_timeout``. The message names the server (never its password); the
    API answers 503 ``store_unavailable``."""


class OtherHub(SendenseError):
    """A change of a job that another live hub of the cluster runs (its exports, ports and lock are there):
    the API answers 307 to ``api_url``, that hub's API; 409 ``other_hub`` when ``api_url`` is None (the
    hub's registered URL is none to send clients to, or its row is unreadable)."""

    def __init__(self, message: str, api_url: str | None) -> None:
        super().__init__(message)
        self.api_url = api_url


class ClusterLockTimeout(SendenseError):
    """A cluster lock (``Cluster.lock``) stayed held by another live hub past the wait limit; the message
    names the lock, its holder and since when (the API answers 503 ``cluster_lock``)."""


def first_error(
    group: BaseExceptionGroup[BaseException],
    *,
    prefer: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> BaseException:
    """The one error a failed task group stands for, to raise in its place.

    Of the group's leaves (nested groups flattened in order, cancellations
    left out): the first that is a ``prefer`` instance, else the first. The
    group itself when it holds nothing but cancellations.
    """
    from asyncio import CancelledError  # late: task groups load asyncio long before they fail

    leaves: list[BaseException] = []
    pending = list(reversed(group.exceptions))
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(reversed(exc.exceptions))
        elif not isinstance(exc, CancelledError):
            leaves.append(exc)
    return next((exc for exc in leaves if isinstance(exc, prefer)), leaves[0] if leaves else group)


def _member(kind: type[_E], value: int) -> _E | None:
    """``value`` as a member of the NBD enum ``kind``; None when it names none."""
    try:
        return kind(value)
    except ValueError:
        return None


def _reply_name(reply: enum.IntEnum | None, raw: int) -> str:
    return f"NBD_REP_{reply.name}" if reply is not None else f"reply {raw:#x}"
