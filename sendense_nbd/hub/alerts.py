"""Alerts: stored in the hub's store, delivered to a webhook (JSON) and by mail, in the background.

:meth:`Alerts.fire` records an alert and queues it for each configured
channel; it never waits for a delivery and never raises (a failure is
logged). Each channel has its own worker and its own bounded queue
(:data:`MAX_QUEUED`, the oldest dropped with a log line), so a webhook that
never answers delays neither the caller nor the mail. The webhook gets
``{"id", "kind", "key", "subject", "message", "detail", "fired", "hub"}`` as a
JSON POST (:attr:`AlertConfig.webhook_timeout` per try,
:attr:`AlertConfig.webhook_tries` tries with doubling backoff); the mail goes
through an SMTP relay (stdlib smtplib in a thread). What each channel did is
kept in the alert's ``delivered``; a restarted hub delivers again the recent
alerts (:data:`REDELIVER_WITHIN`) its predecessor stopped before trying, and so
does a hub taking a lost one over (:meth:`Alerts.redeliver`: at least once; a
receiver tells a repeat by its ``id``).

Event alerts (a failed job, a repeated full fallback, a failed verify) are
recorded each time. Condition alerts (:data:`CONDITIONS`: a VM at risk, low
space) are active from :meth:`Alerts.fire` until :meth:`Alerts.clear` of
their ``key``; while active, firing them again records nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import re
import shutil
import smtplib
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping
from email.message import EmailMessage
from typing import Any

import aiohttp
import attrs

from sendense_nbd import fields
from sendense_nbd.errors import BadRequest
from sendense_nbd.hub.clock import Clock
from sendense_nbd.hub.db import Connection, Database, rows
from sendense_nbd.hub.repository.store import Space

log = logging.getLogger(__name__)

#: Undelivered alerts queued per channel; past it the oldest is dropped (and logged).
MAX_QUEUED = 100
#: Alerts kept in the store; older ones are pruned.
MAX_STORED = 10_000
#: Most alerts one ``GET /alerts`` lists.
MAX_LIST = 10_000
#: ``limit`` as given: 1-5 ASCII digits (leading zeros allowed).
_LIMIT = re.compile(r"[0-9]{1,5}")
#: After a restart, undelivered alerts this recent (seconds) are delivered again.
REDELIVER_WITHIN = 86400.0
#: Seconds between two checks of the repository's free space.
SPACE_CHECK_INTERVAL = 60.0


class AlertKind(enum.Enum):
    """What an alert is about; the value is the API's code."""

    JOB_FAILED = "job_failed"
    REPEATED_FULL = "repeated_full"
    VERIFY_FAILED = "verify_failed"
    AT_RISK = "at_risk"
    LOW_SPACE = "low_space"
    COPY_FAILED = "copy_failed"


#: Alerts about a lasting condition: one per key until it is cleared.
CONDITIONS = frozenset({AlertKind.AT_RISK, AlertKind.LOW_SPACE})


@attrs.frozen(kw_only=True)
class AlertConfig:
    """Where alerts go, and when the repository's space is low."""

    webhook_url: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str | None = None
    #: A file holding the SMTP password (read at each delivery, so it can be rotated).
    smtp_password_file: str | None = None
    mail_from: str = "sendense@localhost"
    mail_to: tuple[str, ...] = ()
    #: LOW_SPACE fires when the repository's free fraction falls below this (0: never).
    low_space: float = 0.10
    webhook_timeout: float = 5.0
    webhook_tries: int = 3
    #: Seconds before the second try; doubled before each further one.
    webhook_backoff: float = 1.0
    smtp_timeout: float = 10.0

    @property
    def mail(self) -> bool:
        """Whether alerts are mailed."""
        return self.smtp_host is not None and bool(self.mail_to)


@attrs.frozen
class Alert:
    """One alert as stored."""

    id: str
    kind: AlertKind
    key: str | None
    subject: str
    message: str
    detail: dict[str, Any]
    fired: float
    cleared: float | None
    #: Per channel (``webhook``, ``email``): ``"ok"`` or why it failed; absent while queued.
    delivered: dict[str, str]

    @property
    def active(self) -> bool:
        """A condition alert that has not been cleared."""
        return self.kind in CONDITIONS and self.cleared is None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Alert:
        """An alert from its row in the store."""
        return cls(
            row["id"], AlertKind(row["kind"]), row["key"], row["subject"], row["message"], json.loads(row["detail"]),
            row["fired"], row["cleared"], json.loads(row["delivered"]),
        )  # fmt: skip

    def to_json(self) -> dict[str, object]:
        """The alert as the API shows it."""
        return {**attrs.asdict(self), "kind": self.kind.value, "active": self.active}

    def payload(self, hub: str) -> dict[str, object]:
        """What the webhook receives."""
        return {
            "id": self.id, "kind": self.kind.value, "key": self.key, "subject": self.subject,
            "message": self.message, "detail": self.detail, "fired": self.fired, "hub": hub,
        }  # fmt: skip


@attrs.frozen(kw_only=True)
class AlertQuery:
    """``GET /alerts``'s query: ``active`` (1/0, true/false), ``kind``, ``limit`` (1-10000, default 100)."""

    active: bool = False
    kind: AlertKind | None = None
    limit: int = 100

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> AlertQuery:
        """Parse a query string; :class:`BadRequest` on anything else."""
        unknown = sorted(set(query) - {"active", "kind", "limit"})
        if unknown:
            raise BadRequest(f"unknown query parameter {unknown[0][:40]!r} (known: active, kind, limit)")
        active = query.get("active", "0")
        if active not in ("0", "1", "false", "true"):
            raise BadRequest("active is 1 or 0")
        limit = query.get("limit", "100")
        # ASCII digits only: str.isdigit() takes "²", which int() refuses, and int() takes other scripts' digits
        if not _LIMIT.fullmatch(limit) or not 1 <= int(limit) <= MAX_LIST:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_LIST}")
        kind = None if query.get("kind") is None else fields.choice(query["kind"], "kind", AlertKind)
        return cls(active=active in ("1", "true"), kind=kind, limit=int(limit))


#: Why a full copy is a fallback (not asked for, not planned): two in a row raise REPEATED_FULL.
FALLBACK_REASONS = frozenset({"cbt_reset", "base_missing", "verify_failed"})


def repeated_full(this: str | None, previous: str | None) -> bool:
    """Whether a backup and the VM's previous completed backup both fell back to a full copy (reason codes)."""
    return this in FALLBACK_REASONS and previous in FALLBACK_REASONS


class Alerts:
    """Fire, clear and list alerts; :meth:`run` delivers them and watches the repository's space."""

    def __init__(
        self,
        db: Database,
        config: AlertConfig,
        *,
        clock: Clock,
        hub: str,
        space_path: str,
        space: Callable[[], Awaitable[Space]] | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self.hub = hub
        #: The repository, as the LOW_SPACE alert names it; ``space`` reads its room (default: the filesystem's).
        self.space_path = space_path
        self._space = space
        self._queues: dict[str, asyncio.Queue[Alert]] = {}
        if config.webhook_url is not None:
            self._queues["webhook"] = asyncio.Queue()
        if config.mail:
            self._queues["email"] = asyncio.Queue()
        #: The alerts this hub queued lately (by ID): :meth:`redeliver` does not queue them again.
        self._queued: collections.deque[str] = collections.deque(maxlen=10 * MAX_QUEUED)

    async def fire(
        self, kind: AlertKind, subject: str, message: str, *, key: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Alert | None:  # fmt: skip
        """Record an alert and queue its delivery; None when the same condition is already active.

        Never raises: a failure to record is logged and answers None.
        """
        alert = Alert(
            uuid.uuid4().hex[:16], kind, key, subject[:1000], message[:4000], dict(detail or {}),
            self.clock.now(), None, {},
        )  # fmt: skip
        try:
            recorded = await self.db.run(lambda connection: _insert(connection, alert))
        except Exception as exc:  # noqa: BLE001 - an alert must never fail its caller
            log.error("recording the %s alert %r failed: %s", kind.value, subject, exc)
            return None
        if not recorded:
            return None
        log.warning("alert %s: %s: %s", kind.value, subject, message)
        self._enqueue(alert, self._queues)
        return alert

    def _enqueue(self, alert: Alert, queues: Mapping[str, asyncio.Queue[Alert]]) -> None:
        self._queued.append(alert.id)
        for channel, queue in queues.items():
            if queue.qsize() >= MAX_QUEUED:
                dropped = queue.get_nowait()
                log.error("alert queue of %s full: dropped %s %s (%s)", channel, dropped.kind.value, dropped.id,
                          dropped.subject)  # fmt: skip
            queue.put_nowait(alert)

    async def clear(self, kind: AlertKind, key: str) -> bool:
        """End the active condition alert ``kind`` of ``key``; whether there was one."""
        now = self.clock.now()

        def update(connection: Connection) -> int:
            return connection.execute(
                "UPDATE alerts SET cleared = ? WHERE kind = ? AND key = ? AND cleared IS NULL", (now, kind.value, key)
            ).rowcount

        try:
            cleared = await self.db.run(update) > 0
        except Exception as exc:  # noqa: BLE001 - like fire
            log.error("clearing the %s alert of %s failed: %s", kind.value, key, exc)
            return False
        if cleared:
            log.warning("alert %s cleared: %s", kind.value, key)
        return cleared

    async def list(self, query: AlertQuery = AlertQuery()) -> list[Alert]:
        """The newest alerts first (only the active condition alerts, with ``query.active``)."""
        sql, args = "SELECT * FROM alerts WHERE 1 = 1", []
        if query.active:
            sql += f" AND cleared IS NULL AND kind IN ({', '.join('?' * len(CONDITIONS))})"
            args += sorted(k.value for k in CONDITIONS)
        if query.kind is not None:
            sql += " AND kind = ?"
            args.append(query.kind.value)
        sql += " ORDER BY fired DESC, seq DESC LIMIT ?"
        found = await self.db.run(lambda connection: rows(connection.execute(sql, (*args, query.limit))))
        return [Alert.from_row(row) for row in found]

    # -- background ----------------------------------------------------------------

    async def run(self) -> None:
        """Deliver queued alerts (and the recent ones a stopped hub left undelivered), check the
        repository's space, until cancelled."""
        await self.redeliver()
        async with asyncio.TaskGroup() as group:
            for channel, queue in self._queues.items():
                group.create_task(self._deliver(channel, queue), name=f"alerts-{channel}")
            if self.config.low_space > 0:
                group.create_task(self._watch_space(), name="alerts-space")

    async def redeliver(self) -> int:
        """Queue the stored alerts of the last :data:`REDELIVER_WITHIN` seconds a channel has not delivered
        (but those this hub queued lately): at a start, and when this hub takes a lost one over (another live
        hub may be delivering some of them too: receivers tell a repeat by its ``id``); how many."""
        if not self._queues:
            return 0
        since = self.clock.now() - REDELIVER_WITHIN
        try:
            found = await self.db.run(
                lambda c: rows(
                    c.execute("SELECT * FROM alerts WHERE fired >= ? ORDER BY seq DESC LIMIT ?", (since, MAX_QUEUED))
                )
            )
        except Exception as exc:  # noqa: BLE001 - the new alerts still go out
            log.error("reading the undelivered alerts failed: %s", exc)
            found = []
        queued = 0
        for alert in reversed([Alert.from_row(row) for row in found]):
            missing = {ch: q for ch, q in self._queues.items() if ch not in alert.delivered}
            if missing and alert.id not in self._queued:
                self._enqueue(alert, missing)
                queued += 1
        return queued

    async def _watch_space(self) -> None:
        while True:
            try:
                await self.check_space()
            except Exception as exc:  # noqa: BLE001 - keep watching
                log.error("checking the repository's free space failed: %s", exc)
            await self.clock.sleep(SPACE_CHECK_INTERVAL)

    async def check_space(self) -> None:
        """Fire LOW_SPACE when the repository's free fraction is below the limit, clear it when above."""
        usage = await (self._space() if self._space is not None else self._filesystem())
        fraction = usage.free / usage.total if usage.total else 0.0
        if fraction < self.config.low_space:
            message = (
                f"{_size(usage.free)} free of {_size(usage.total)} ({fraction:.1%}), "
                f"below {self.config.low_space:.0%}: free space or grow the filesystem"
            )
            detail = {"path": self.space_path, "total": usage.total, "free": usage.free, "fraction": fraction}
            await self.fire(AlertKind.LOW_SPACE, self.space_path, message, key=self.space_path, detail=detail)
        else:
            await self.clear(AlertKind.LOW_SPACE, self.space_path)

    async def _filesystem(self) -> Space:
        found = await asyncio.to_thread(shutil.disk_usage, self.space_path)
        return Space(found.total, found.used, found.free)

    async def _deliver(self, channel: str, queue: asyncio.Queue[Alert]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            session = None
            if channel == "webhook":
                session = await stack.enter_async_context(aiohttp.ClientSession())
            while True:
                alert = await queue.get()
                try:
                    if session is not None:
                        await self._post(session, alert)
                    else:
                        await asyncio.to_thread(self._mail, alert)
                    outcome = "ok"
                except Exception as exc:  # noqa: BLE001 - recorded, the next alert goes on
                    outcome = f"failed: {type(exc).__name__}: {exc}"[:500]
                    log.error("delivering alert %s by %s failed: %s", alert.id, channel, exc)
                await self._record(alert.id, channel, outcome)

    async def _post(self, session: aiohttp.ClientSession, alert: Alert) -> None:
        assert self.config.webhook_url is not None
        timeout = aiohttp.ClientTimeout(total=self.config.webhook_timeout)
        backoff = self.config.webhook_backoff
        for attempt in range(1, self.config.webhook_tries + 1):
            try:
                async with session.post(self.config.webhook_url, json=alert.payload(self.hub), timeout=timeout) as r:
                    if r.status < 300:
                        return
                    problem: Exception = RuntimeError(f"the webhook answered HTTP {r.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = exc if str(exc) else RuntimeError(f"{type(exc).__name__} after try {attempt}")
            if attempt == self.config.webhook_tries:
                raise problem
            log.warning("webhook try %d of alert %s failed: %s", attempt, alert.id, problem)
            await asyncio.sleep(backoff)
            backoff *= 2

    def _mail(self, alert: Alert) -> None:
        """Send one alert by mail (blocking: runs in a thread)."""
        config = self.config
        assert config.smtp_host is not None
        mail = EmailMessage()
        mail["Subject"] = f"[sendense] {alert.kind.value}: {alert.subject}"
        mail["From"] = config.mail_from
        mail["To"] = ", ".join(config.mail_to)
        mail.set_content(
            f"{alert.message}\n\nkind: {alert.kind.value}\nhub: {self.hub}\nfired: {alert.fired}\n"
            f"detail: {json.dumps(alert.detail, indent=2, sort_keys=True)}\n"
        )
        with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=config.smtp_timeout) as smtp:
            if config.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if config.smtp_user is not None and config.smtp_password_file is not None:
                with open(config.smtp_password_file, encoding="utf-8") as f:
                    smtp.login(config.smtp_user, f.read(4096).strip())
            smtp.send_message(mail)

    async def _record(self, alert_id: str, channel: str, outcome: str) -> None:
        def update(connection: Connection) -> None:
            found = connection.execute("SELECT delivered FROM alerts WHERE id = ?", (alert_id,)).fetchone()
            if found is not None:  # pruned meanwhile: nothing to record
                delivered = {**json.loads(found["delivered"]), channel: outcome}
                connection.execute("UPDATE alerts SET delivered = ? WHERE id = ?", (json.dumps(delivered), alert_id))

        try:
            await self.db.run(update)
        except Exception as exc:  # noqa: BLE001 - only the record is lost
            log.error("recording the delivery of alert %s failed: %s", alert_id, exc)


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _insert(connection: Connection, alert: Alert) -> bool:
    """Store ``alert`` (unless it is a condition already active) and prune the oldest past :data:`MAX_STORED`."""
    if alert.kind in CONDITIONS:
        active = connection.execute(
            "SELECT 1 FROM alerts WHERE kind = ? AND key IS NOT DISTINCT FROM ? AND cleared IS NULL",
            (alert.kind.value, alert.key),
        ).fetchone()
        if active is not None:
            return False
    connection.execute(
        "INSERT INTO alerts (id, kind, key, subject, message, detail, fired, cleared, delivered) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, NULL, '{}')",
        (
            alert.id,
            alert.kind.value,
            alert.key,
            alert.subject,
            alert.message,
            json.dumps(alert.detail, default=str),
            alert.fired,
        ),
    )
    connection.execute(
        "DELETE FROM alerts WHERE seq <= (SELECT seq FROM alerts ORDER BY seq DESC LIMIT 1 OFFSET ?)",
        (MAX_STORED,),
    )
    return True
