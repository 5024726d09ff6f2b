"""Alerts against real receivers: a local SMTP server (aiosmtpd) gets the mails, an aiohttp webhook
gets the JSON (retried on errors, never blocking the hub), a failed job alerts once, conditions fire
once per key until cleared, LOW_SPACE fires and clears on a small tmpfs, and the queue and the table
stay bounded."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword

from sendense_nbd.backup.records import FullReason, Mode
from sendense_nbd.errors import BadRequest
from sendense_nbd.hub import alerts as alerts_module
from sendense_nbd.hub.alerts import Alert, AlertConfig, AlertKind, AlertQuery, Alerts, repeated_full
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.jobs import Job, JobState
from sendense_nbd.hub.repository import VerifyState
from sendense_nbd.hub.requests import BackupRequest, Completion, DiskSpec
from sendense_nbd.hub.service import Hub, HubConfig
from tests.hub.conftest import Api, HubProcess, free_port_range

MIB = 1 << 20
VM = "/DC0/vm/web01"
START = 1_800_000_000.0
FAST = {"webhook_backoff": 0.05, "low_space": 0.0}


class Webhook:
    """A real aiohttp receiver: records each JSON body; may answer 500 first, or hold requests until released."""

    def __init__(self, *, errors: int = 0, hold: bool = False) -> None:
        self.errors, self.hold = errors, hold
        self.attempts = 0
        self.received: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.json()
        if self.hold:
            await self.release.wait()
        if self.attempts <= self.errors:
            return web.Response(status=500, text="try again")
        self.received.append(body)
        return web.json_response({"ok": True})

    async def __aenter__(self) -> Webhook:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()


class Mailbox:
    """aiosmtpd's handler: keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, email.message.EmailMessage]] = []

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        self.messages.append((envelope, parsed))
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int, list[tuple[str, str]]]]:
    """A real SMTP server on 127.0.0.1 that accepts LOGIN/PLAIN auth (user ``ops``, password ``s3cret``)."""
    mailbox, logins = Mailbox(), []

    def authenticate(server: object, session: object, envelope: object, mechanism: str, data: object) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=(data.login, data.password) == (b"ops", b"s3cret"))

    port = _free_port()
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=port, authenticator=authenticate, auth_require_tls=False
    )
    controller.start()
    try:
        yield mailbox, port, logins
    finally:
        controller.stop()


@contextlib.asynccontextmanager
async def running_hub(repo: Path, config: AlertConfig, clock: ManualClock | None = None) -> AsyncIterator[Hub]:
    hub = Hub(HubConfig(repo=str(repo), nbd_ports=free_port_range(4), clock=clock or ManualClock(START), alerts=config))
    await hub.start()
    try:
        yield hub
    finally:
        hub.close()
        await hub.wait_closed()


async def until(predicate: Any, what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not await predicate():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(0.02)


async def fail_a_job(hub: Hub, vm: str = VM) -> str:
    job = await hub.create_backup(BackupRequest(vm, Mode.FULL, (DiskSpec(2000, MIB),)))
    body = {"status": "failed", "error": {"stage": "copy", "message": "disk 2000: read error at 4096"}}
    failed = await hub.complete(job.id, Completion.from_json(body))
    assert failed.state is JobState.FAILED
    return job.id


async def test_a_failed_job_alerts_once_by_webhook_and_by_mail(
    tmp_path: Path, smtp: tuple[Mailbox, int, list[tuple[str, str]]]
) -> None:
    mailbox, port, logins = smtp
    password = tmp_path / "smtp-password"
    password.write_text("s3cret\n")
    async with Webhook() as hook:
        config = AlertConfig(
            webhook_url=hook.url, smtp_host="127.0.0.1", smtp_port=port, smtp_user="ops",
            smtp_password_file=str(password), mail_from="hub@example.test",
            mail_to=("ops@example.test", "oncall@example.test"), **FAST,
        )  # fmt: skip
        async with running_hub(tmp_path / "repo", config) as hub:
            job_id = await fail_a_job(hub)
            cancelled = await hub.create_backup(BackupRequest("/DC0/vm/other", Mode.FULL, (DiskSpec(2000, MIB),)))
            await hub.cancel(cancelled.id)  # cancelled is no failure: no alert

            async def delivered() -> bool:
                [alert] = await hub.alerts.list()
                return alert.delivered == {"webhook": "ok", "email": "ok"}

            await until(delivered, "both channels delivered")
            [alert] = await hub.alerts.list()
            assert alert.kind is AlertKind.JOB_FAILED and alert.subject == VM and alert.key == job_id
            assert not alert.active  # an event, not a condition
            [body] = hook.received
            assert body["kind"] == "job_failed" and body["subject"] == VM and body["fired"] == START
            assert body["hub"] == "http://127.0.0.1:8082"
            assert {key: body["detail"][key] for key in ("job_id", "job_kind", "stage", "message")} == {
                "job_id": job_id, "job_kind": "backup", "stage": "copy", "message": "disk 2000: read error at 4096",
            }  # fmt: skip
            assert f"backup job {job_id} failed at copy: disk 2000: read error at 4096" == body["message"]
    [(envelope, mail)] = mailbox.messages
    assert logins == [("ops", "s3cret")]
    assert envelope.mail_from == "hub@example.test"
    assert sorted(envelope.rcpt_tos) == ["oncall@example.test", "ops@example.test"]
    assert mail["Subject"] == f"[sendense] job_failed: {VM}"
    text = mail.get_content()
    assert body["message"] in text and job_id in text and "read error at 4096" in text


async def test_a_webhook_answering_500_twice_gets_three_tries(tmp_path: Path) -> None:
    async with Webhook(errors=2) as hook:
        async with running_hub(tmp_path / "repo", AlertConfig(webhook_url=hook.url, **FAST)) as hub:
            await fail_a_job(hub)

            async def delivered() -> bool:
                return (await hub.alerts.list())[0].delivered.get("webhook") == "ok"

            await until(delivered, "the third try delivered")
            assert hook.attempts == 3 and len(hook.received) == 1


async def test_an_unreachable_webhook_is_recorded_as_failed(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/hook"  # nothing listens there
    async with running_hub(tmp_path / "repo", AlertConfig(webhook_url=url, webhook_tries=2, **FAST)) as hub:
        await fail_a_job(hub)

        async def recorded() -> bool:
            return "webhook" in (await hub.alerts.list())[0].delivered

        await until(recorded, "the failed delivery recorded")
        assert (await hub.alerts.list())[0].delivered["webhook"].startswith("failed: ")


async def test_a_webhook_that_never_answers_blocks_neither_jobs_nor_shutdown(tmp_path: Path) -> None:
    async with Webhook(hold=True) as hook:
        config = AlertConfig(webhook_url=hook.url, webhook_timeout=60, webhook_tries=3, **FAST)
        async with running_hub(tmp_path / "repo", config) as hub:
            started = time.monotonic()
            await fail_a_job(hub)
            await until(lambda: _true(hook.attempts >= 1), "the webhook called")
            job = await hub.create_backup(BackupRequest(VM, Mode.FULL, (DiskSpec(2000, MIB),)))
            body = {"status": "completed", "disks": [{"disk_key": 2000, "change_id": "52 aa/1"}]}
            done = await hub.complete(job.id, Completion.from_json(body))
            await fail_a_job(hub, "/DC0/vm/db01")
            assert done.state is JobState.COMPLETED
            assert time.monotonic() - started < 20, "a hanging webhook (60 s per try) held the jobs up"
            closing = time.monotonic()
        assert time.monotonic() - closing < 20, "a hanging webhook held the shutdown up"
        assert hook.received == []


async def _true(value: bool) -> bool:
    return value


async def test_the_delivery_queue_is_bounded_oldest_dropped(
    tmp_path: Path, store_target: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(store_target)
    async with Webhook(hold=True) as hook:
        alerts = Alerts(
            db, AlertConfig(webhook_url=hook.url, webhook_tries=1, webhook_timeout=60, **FAST),
            clock=ManualClock(START), hub="test", space_path=str(tmp_path),
        )  # fmt: skip
        worker = asyncio.create_task(alerts.run())
        try:
            await alerts.fire(AlertKind.JOB_FAILED, "a0", "first")
            await until(lambda: _true(hook.attempts == 1), "the first alert in flight")
            for i in range(1, 150):
                await alerts.fire(AlertKind.JOB_FAILED, f"a{i}", "more")
            hook.hold = False
            hook.release.set()
            await until(lambda: _true(len(hook.received) == 1 + alerts_module.MAX_QUEUED), "the queue delivered")
            await asyncio.sleep(0.2)  # nothing more arrives
            subjects = [body["subject"] for body in hook.received]
            assert subjects == ["a0"] + [f"a{i}" for i in range(50, 150)]
            assert "alert queue of webhook full: dropped job_failed" in caplog.text
            assert len(await alerts.list(AlertQuery(limit=1000))) == 150  # every alert is stored
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    db.close()


async def test_conditions_fire_once_per_key_until_cleared_and_the_table_is_pruned(
    tmp_path: Path, store_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(store_target)
    clock = ManualClock(START)
    alerts = Alerts(db, AlertConfig(**FAST), clock=clock, hub="test", space_path=str(tmp_path))
    try:
        first = await alerts.fire(AlertKind.AT_RISK, VM, "no good point in 2 days", key=VM)
        assert first is not None and first.active
        assert await alerts.fire(AlertKind.AT_RISK, VM, "still", key=VM) is None
        assert await alerts.fire(AlertKind.AT_RISK, "/DC0/vm/db01", "other VM", key="/DC0/vm/db01") is not None
        assert [a.key for a in await alerts.list(AlertQuery(active=True))] == ["/DC0/vm/db01", VM]
        await clock.advance(30)
        assert await alerts.clear(AlertKind.AT_RISK, VM) and not await alerts.clear(AlertKind.AT_RISK, VM)
        [cleared] = (await alerts.list(AlertQuery(kind=AlertKind.AT_RISK, limit=1000)))[-1:]
        assert cleared.id == first.id and cleared.cleared == START + 30 and not cleared.active
        again = await alerts.fire(AlertKind.AT_RISK, VM, "at risk again", key=VM)
        assert again is not None and again.id != first.id
        # Events are recorded every time (two failures of one VM are two alerts).
        for _ in range(2):
            assert await alerts.fire(AlertKind.JOB_FAILED, VM, "failed") is not None

        monkeypatch.setattr(alerts_module, "MAX_STORED", 4)
        for i in range(6):
            await alerts.fire(AlertKind.VERIFY_FAILED, f"/DC0/vm/v{i}", "damaged at 0")
        kept = await alerts.list(AlertQuery(limit=1000))
        assert [a.subject for a in kept] == [f"/DC0/vm/v{i}" for i in (5, 4, 3, 2)]
    finally:
        db.close()


async def test_fire_never_raises(tmp_path: Path, store_target: str, caplog: pytest.LogCaptureFixture) -> None:
    db = Database(store_target)
    alerts = Alerts(db, AlertConfig(**FAST), clock=ManualClock(START), hub="test", space_path=str(tmp_path))
    db.close()  # the store is gone: recording fails, the caller does not
    assert await alerts.fire(AlertKind.JOB_FAILED, VM, "failed") is None
    assert "recording the job_failed alert" in caplog.text


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_low_space_fires_once_and_clears_on_a_small_tmpfs(tmpfs: Path) -> None:
    clock = ManualClock(START)
    async with Webhook() as hook:
        config = AlertConfig(webhook_url=hook.url, low_space=0.5, webhook_backoff=0.05)
        async with running_hub(tmpfs / "repo", config, clock) as hub:
            filler = tmpfs / "filler"

            async def low(active: bool) -> bool:
                await clock.advance(alerts_module.SPACE_CHECK_INTERVAL)
                found = await hub.alerts.list(AlertQuery(active=True, kind=AlertKind.LOW_SPACE))
                return bool(found) == active

            await asyncio.to_thread(filler.write_bytes, os.urandom(12 * MIB))  # 12 of 16 MiB: ~25% free, below 50%
            await until(lambda: low(True), "LOW_SPACE fired")
            for _ in range(5):
                assert await low(True)
            await asyncio.sleep(0.3)
            [alert] = await hub.alerts.list(AlertQuery(kind=AlertKind.LOW_SPACE))
            assert alert.key == str(tmpfs / "repo") and alert.detail["total"] == 16 * MIB
            assert "below 50%" in alert.message and "MiB free of 16.0 MiB" in alert.message
            assert alert.detail["fraction"] == alert.detail["free"] / alert.detail["total"] < 0.5
            filler.unlink()
            await until(lambda: low(False), "LOW_SPACE cleared")
            [alert] = await hub.alerts.list(AlertQuery(kind=AlertKind.LOW_SPACE))
            assert alert.cleared is not None and alert.cleared > alert.fired
            await until(lambda: _true(len(hook.received) == 1), "the webhook got it")
            assert hook.received[0]["kind"] == "low_space"


def test_a_repeated_full_is_two_fallbacks_in_a_row() -> None:
    fallbacks = ("cbt_reset", "base_missing", "verify_failed")
    planned = ("first_backup", "requested", "chain_cap", None)
    for this in fallbacks:
        for previous in fallbacks:
            assert repeated_full(this, previous)
        for previous in planned:
            assert not repeated_full(this, previous) and not repeated_full(previous, this)


def test_the_alerts_query_is_checked() -> None:
    assert AlertQuery.from_query({}) == AlertQuery()
    parsed = AlertQuery.from_query({"active": "1", "kind": "low_space", "limit": "5"})
    assert parsed == AlertQuery(active=True, kind=AlertKind.LOW_SPACE, limit=5)
    for bad, words in (
        ({"active": "yes"}, "active is 1 or 0"),
        ({"kind": "fire"}, "kind must be one of"),
        ({"limit": "0"}, "limit must be"),
        ({"limit": "10001"}, "limit must be"),
        ({"limit": "9" * 400}, "limit must be"),
        ({"limit": "-1"}, "limit must be"),
        ({"limit": "\u00b2"}, "limit must be"),  # "²".isdigit() holds, int() refuses it
        ({"limit": "\u0661\u0662"}, "limit must be"),  # Arabic-Indic 12: int() takes it
        ({"limit": "+5"}, "limit must be"),
        ({"limit": " 5"}, "limit must be"),
        ({"limit": ""}, "limit must be"),
        ({"since": "1"}, "unknown query parameter 'since'"),
    ):
        with pytest.raises(BadRequest, match=words):
            AlertQuery.from_query(bad)


def test_the_hub_command_mails_alerts_and_lists_them(
    hub_factory: Callable[..., HubProcess], smtp: tuple[Mailbox, int, list[tuple[str, str]]]
) -> None:
    mailbox, port, _ = smtp
    hub = hub_factory(
        None, "--smtp", f"127.0.0.1:{port}", "--mail-to", "ops@example.test", "--mail-to", "dba@example.test",
        "--mail-from", "hub@example.test", "--low-space", "0",
    )  # fmt: skip
    api = Api(hub.url)
    status, job = api.post("/backups", {"vm_path": VM, "mode": "full", "disks": [{"key": 2000, "capacity": MIB}]})
    assert status == 201, job
    failure = {"status": "failed", "error": {"stage": "snapshot", "message": "vCenter refused the snapshot"}}
    assert api.post(f"/backups/{job['job_id']}/complete", failure)[0] == 200
    deadline = time.monotonic() + 15
    while not mailbox.messages or api.get("/alerts")[1]["alerts"][0]["delivered"] != {"email": "ok"}:
        assert time.monotonic() < deadline, (mailbox.messages, api.get("/alerts"))
        time.sleep(0.05)
    [(envelope, mail)] = mailbox.messages
    assert sorted(envelope.rcpt_tos) == ["dba@example.test", "ops@example.test"]
    assert mail["Subject"] == f"[sendense] job_failed: {VM}" and "vCenter refused the snapshot" in mail.get_content()
    [listed] = api.get("/alerts?kind=job_failed&limit=10")[1]["alerts"]
    assert listed["key"] == job["job_id"] and listed["kind"] == "job_failed" and listed["active"] is False
    assert api.get("/alerts?active=1")[1] == {"alerts": []}
    status, refused = api.get("/alerts?active=maybe")
    assert status == 400 and refused["error"]["code"] == "bad_request", refused
    status, refused = api.get("/alerts?limit=%C2%B2")  # "²": a clear 400, not a 500
    assert status == 400 and "limit must be an integer" in refused["error"]["message"], refused
    assert api.get("/alerts?limit=00001")[1]["alerts"] == [listed]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--smtp", "127.0.0.1"], "--smtp and --mail-to go together"),
        (["--mail-to", "ops@example.test"], "--smtp and --mail-to go together"),
        (["--smtp", "relay:99999", "--mail-to", "a@b"], "expected HOST or HOST:PORT"),
        (["--alert-webhook", "ftp://example.test/hook"], "expected an http:// or https:// URL"),
        (["--smtp-starttls"], "need --smtp"),
        (["--smtp", "relay", "--mail-to", "a@b", "--smtp-user", "ops"], "go together"),
        (["--smtp", "relay", "--mail-to", "a@b", "--smtp-user", "ops", "--smtp-password-file", "/nonexistent/pw"],
         "cannot read it"),
        (["--low-space", "1.5"], "--low-space"),
        (["--node-lost", "5"], "--node-lost"),
    ],
)  # fmt: skip
def test_bad_alert_options_stop_the_hub_before_it_starts(tmp_path: Path, options: list[str], words: str) -> None:
    repo = tmp_path / "repo"
    command = [sys.executable, "-m", "sendense_nbd", "hub", "--repo", str(repo), "--listen", "127.0.0.1:0", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and words in done.stderr, done.stderr
    assert not repo.exists()


async def test_two_fallback_fulls_in_a_row_raise_repeated_full(tmp_path: Path) -> None:
    async with running_hub(tmp_path / "repo", AlertConfig(**FAST)) as hub:

        async def backup(reported: str | None = None, *, reason: FullReason | None = None) -> Job:
            job = await hub.create_backup(BackupRequest(VM, Mode.AUTO, (DiskSpec(2000, MIB),), full_reason=reason))
            disk = {"disk_key": 2000, "change_id": f"52 aa/{job.id}", "full_reason": reported}
            return await hub.complete(job.id, Completion.from_json({"status": "completed", "disks": [disk]}))

        async def repeated() -> list[Alert]:
            return await hub.alerts.list(AlertQuery(kind=AlertKind.REPEATED_FULL))

        first = await backup()  # first backup, then a CBT reset: one fallback
        second = await backup("cbt_reset")
        assert [first.full_reason, second.full_reason] == [FullReason.FIRST_BACKUP, FullReason.CBT_RESET]
        assert await repeated() == []
        third = await backup("cbt_reset")  # the second fallback in a row
        [alert] = await repeated()
        assert alert.subject == VM and alert.key == VM
        assert alert.detail == {"job_id": third.id, "previous_job_id": second.id, "reasons": ["cbt_reset"] * 2}
        assert "two full copies in a row that were not planned" in alert.message
        incremental = await backup()
        assert incremental.full_reason is None
        await backup("cbt_reset")
        assert len(await repeated()) == 1  # an incremental in between: no repeat
        capped = await backup(reason=FullReason.CHAIN_CAP)
        assert capped.full_reason is FullReason.CHAIN_CAP and len(await repeated()) == 1  # planned, not a fallback
        # The newest point found damaged: the next backup is a full with verify_failed, then a CBT reset.
        [*_, newest] = await hub.points(VM)
        await hub._repository.set_verdict(newest.id, VerifyState.DAMAGED, at=START, bad_offset=0, error="flipped")
        damaged = await backup()
        assert damaged.full_reason is FullReason.VERIFY_FAILED and len(await repeated()) == 1
        again = await backup("cbt_reset")
        latest, _ = await repeated()
        assert latest.detail["reasons"] == ["verify_failed", "cbt_reset"] and latest.detail["job_id"] == again.id


async def test_a_restarted_hub_delivers_what_its_predecessor_had_not_tried(tmp_path: Path, store_target: str) -> None:
    db = Database(store_target)
    async with Webhook() as hook:
        config = AlertConfig(webhook_url=hook.url, **FAST)
        stopped = Alerts(db, config, clock=ManualClock(START - 2 * 86400), hub="test", space_path=str(tmp_path))
        await stopped.fire(AlertKind.JOB_FAILED, "/DC0/vm/old", "two days ago")  # queued, never run: the hub stopped
        stopped.clock = ManualClock(START)
        await stopped.fire(AlertKind.JOB_FAILED, "/DC0/vm/recent", "just before the stop")
        restarted = Alerts(db, config, clock=ManualClock(START + 60), hub="test", space_path=str(tmp_path))
        await restarted.fire(AlertKind.JOB_FAILED, "/DC0/vm/new", "at the restart, before run")
        worker = asyncio.create_task(restarted.run())
        try:
            await restarted.fire(AlertKind.JOB_FAILED, "/DC0/vm/later", "after run started")
            await until(lambda: _true(len(hook.received) >= 3), "the deliveries")
            await asyncio.sleep(0.3)  # nothing more arrives
            subjects = sorted(body["subject"] for body in hook.received)
            assert subjects == ["/DC0/vm/later", "/DC0/vm/new", "/DC0/vm/recent"]  # each once, the old one not
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        [old] = [a for a in await restarted.list(AlertQuery(limit=10)) if a.subject == "/DC0/vm/old"]
        assert old.delivered == {}  # older than a day: not sent after the restart
    db.close()


async def test_a_hub_taking_a_lost_one_over_delivers_its_undelivered_alerts(tmp_path: Path, store_target: str) -> None:
    """A lost hub's recent alerts not delivered yet go out from the hub that takes it over (redeliver), once;
    the taker's own queued alerts are not queued again."""
    db = Database(store_target)
    async with Webhook() as hook:
        config = AlertConfig(webhook_url=hook.url, **FAST)
        lost = Alerts(db, config, clock=ManualClock(START), hub="lost", space_path=str(tmp_path))
        await lost.fire(AlertKind.JOB_FAILED, "/DC0/vm/a", "fired on the lost hub, never delivered")
        taker = Alerts(db, config, clock=ManualClock(START + 60), hub="taker", space_path=str(tmp_path))
        worker = asyncio.create_task(taker.run())  # its start delivers the lost hub's alert already
        try:
            await until(lambda: _true(len(hook.received) >= 1), "the start's delivery")
            await taker.fire(AlertKind.JOB_FAILED, "/DC0/vm/b", "fired on the taker")
            await until(lambda: _true(len(hook.received) >= 2), "the taker's own alert")
            await lost.fire(AlertKind.JOB_FAILED, "/DC0/vm/c", "fired on the lost hub after the taker started")
            assert await taker.redeliver() == 1  # the lost hub's new one; its delivered one and the taker's not
            await until(lambda: _true(len(hook.received) >= 3), "the takeover's delivery")
            await asyncio.sleep(0.3)  # nothing more arrives
            assert sorted(body["subject"] for body in hook.received) == ["/DC0/vm/a", "/DC0/vm/b", "/DC0/vm/c"]
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    db.close()
