"""Hostile values on the multi-hub surfaces. ``--hub-id`` and ``--api-advertise`` (and ``--public-url``, the URL
a hub registers without it) are refused before anything opens, in one line that never repeats a password. The
307 a hub answers for a job another live hub runs goes only to an http(s) URL with a host, no credentials and
nothing smuggled into the header: a hostile or malformed row of that hub answers 409 ``other_hub`` without
``Location``, and the job stays untouched. ``GET /hubs`` shows odd rows as JSON and leaves out a row that reads
as no member (a state this release does not know) instead of failing; that hub's jobs are refused, not
changed here. Against SQLite and the session's PostgreSQL (the hubs' rows are shared there)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import sendense_nbd.cli.hub as cli_hub
from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import ConfigError
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.cluster import MAX_API_URL
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.jobs import BackupDetail, JobKind, JobStore
from sendense_nbd.hub.service import HubConfig
from tests.hub.operating import START, LocalHub, local_hub

pytestmark = pytest.mark.peer  # store_target: the session's PostgreSQL too

BAD_IDS = ["", "a" * 129, "hub 1", "hub\n1", "hub\x00", "hub\r\nX-Injected: 1", "-hub", "hub/1", "hüb", "\x1b[31m"]
GOOD_IDS = ["h", "a" * 128, "hub-1.site:a_b"]
#: Each refused URL and what the refusal says.
BAD_URLS = {
    "": "visible ASCII",
    "http://h" + "a" * MAX_API_URL: "visible ASCII",
    "http://hub 2:8082": "visible ASCII",
    "http://hub2:8082\r\nSet-Cookie: a=b": "visible ASCII",
    "http://hub2\x00": "visible ASCII",
    "http://hüb2:8082": "visible ASCII",
    "http://admin:s3cret@hub2:8082": "no user name or password",
    "https://admin@hub2": "no user name or password",
    "ftp://hub2/": "http:// or https://",
    "javascript:alert(1)": "http:// or https://",
    "file:///etc/passwd": "http:// or https://",
    "//evil.example/": "http:// or https://",
    "http://": "http:// or https://",
    "hub2:8082": "http:// or https://",
    "http://hub2:99999": "not a URL",
    "http://[::1": "not a URL",
    "http://hub2/?next=//evil.example": "no query or fragment",
    "http://hub2/#x": "no query or fragment",
}
GOOD_URLS = ["http://hub2:8082", "https://hub2.example/base/", "http://[::1]:8082", "http://127.0.0.2:8082"]


@pytest.mark.parametrize("value", BAD_IDS)
def test_a_hub_id_that_is_no_name_is_refused(value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--hub-id .*1-128 of letters, digits") as caught:
        HubConfig(repo=str(tmp_path), hub_id=value)
    assert "\n" not in str(caught.value) and "\r" not in str(caught.value) and len(str(caught.value)) < 200


@pytest.mark.parametrize("value", GOOD_IDS)
def test_a_hub_id_of_name_characters_is_taken(value: str, tmp_path: Path) -> None:
    assert HubConfig(repo=str(tmp_path), hub_id=value).hub_id == value


@pytest.mark.parametrize(("value", "why"), BAD_URLS.items())
def test_an_api_url_to_register_that_is_no_http_url_to_send_clients_to_is_refused(
    value: str, why: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=f"^--api-advertise .*{why}") as caught:
        HubConfig(repo=str(tmp_path), api_advertise=value)
    assert "s3cret" not in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=f"^--public-url \\(the API URL this hub registers .*{why}"):
        HubConfig(repo=str(tmp_path), public_url=value)  # registered without --api-advertise
    assert HubConfig(repo=str(tmp_path), public_url=value, api_advertise="http://hub2").api_advertise == "http://hub2"


@pytest.mark.parametrize("value", GOOD_URLS)
def test_an_http_api_url_with_a_host_is_taken(value: str, tmp_path: Path) -> None:
    assert HubConfig(repo=str(tmp_path), api_advertise=value).api_advertise == value


def test_the_hub_command_refuses_hostile_values_in_one_line_before_anything_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[dict[str, Any]] = []

    async def run_hub(o: dict[str, Any], *args: Any) -> int:
        started.append(o)
        return 0

    monkeypatch.setattr(cli_hub, "_run_hub", run_hub)
    repo = tmp_path / "repo"

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli_hub.hub_command, ["--repo", str(repo), *args], catch_exceptions=False)
        return result.exit_code, result.output

    for option, value in [("--hub-id", v) for v in BAD_IDS] + [("--api-advertise", v) for v in BAD_URLS]:
        code, output = invoke(option, value)
        (error,) = [line for line in output.splitlines() if line.startswith("Error:")]
        assert code == 2 and error.startswith(f"Error: {option}"), (value, output)
        assert "s3cret" not in output and not started and not repo.exists()
    code, output = invoke("--hub-id", "hub-2", "--api-advertise", "https://hub2.example:8443/sendense")
    assert code == 0, output
    assert [(o["hub_id"], o["api_advertise"]) for o in started] == [("hub-2", "https://hub2.example:8443/sendense")]


@pytest.fixture
async def hub_and_store(tmp_path: Path, store_target: str) -> AsyncIterator[tuple[LocalHub, Database]]:
    """An in-process hub with its API, and a second handle on its store (as another hub of the cluster has)."""
    db = Database(store_target)
    try:
        async with local_hub(tmp_path / "repo", clock=ManualClock(START), db=store_target) as hub:
            yield hub, db
    finally:
        db.close()


async def _register(
    db: Database, hub_id: str, api_url: str, *, state: str = "live", ports: tuple[int, int] = (1, 2)
) -> None:
    """A row of another hub, beating now (the hub's clock: START), as it would register itself."""
    await db.run(
        lambda c: c.execute(
            "INSERT INTO hubs (id, api_url, nbd_host, port_first, port_last, store, repository, started, heartbeat, "
            "state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (hub_id, api_url, "\x1b[31m127.0.0.2", *ports, "rbd://p?prefix=x", None, START, START, state),
        )
    )


async def _cancel(hub: LocalHub, job_id: str) -> tuple[int, dict[str, str], Any]:
    """DELETE /backups/JOB with a query of escaped CR LF and '#', not following a redirect."""
    url = f"{hub.url}/api/v1/backups/{job_id}?note=%0D%0ASet-Cookie:%20a=b%23x"
    async with hub.session.delete(url, allow_redirects=False) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


async def test_a_job_of_another_hub_is_redirected_only_to_its_http_url(
    hub_and_store: tuple[LocalHub, Database],
) -> None:
    hub, db = hub_and_store
    await _register(db, "two", "http://hub2.example:8082/")
    job = await JobStore(db, ManualClock(START), hub="two").create(
        JobKind.BACKUP, "/DC0/vm/a", Mode.AUTO, BackupDetail(), lifetime=3600
    )
    status, headers, body = await _cancel(hub, job.id)
    location = f"http://hub2.example:8082/api/v1/backups/{job.id}?note=%0D%0ASet-Cookie:%20a=b%23x"
    assert status == 307 and headers["Location"] == location and body["location"] == location, (status, body)
    assert "Set-Cookie" not in headers

    for value, why in BAD_URLS.items():
        if "\x00" in value:
            continue  # PostgreSQL's text holds no NUL
        await db.run(lambda c, value=value: c.execute("UPDATE hubs SET api_url = ? WHERE id = ?", (value, "two")))
        status, headers, body = await _cancel(hub, job.id)
        assert status == 409 and body["error"]["code"] == "other_hub", (value, status, body)
        assert "Location" not in headers and "Set-Cookie" not in headers and "location" not in body
        message = body["error"]["message"]
        assert why in message and "valid --api-advertise" in message and "s3cret" not in message, message
    assert (await hub.ok("GET", f"/backups/{job.id}"))["state"] == "pending"  # changed nowhere


async def test_hubs_shows_odd_rows_and_leaves_out_one_that_is_no_member(
    hub_and_store: tuple[LocalHub, Database],
) -> None:
    hub, db = hub_and_store
    odd_url = "javascript:alert(1)\r\nSet-Cookie: a=b"
    await _register(db, "two", odd_url, ports=(9, 4))
    await _register(db, "x" * 2000, "http://hub3:8082")
    await _register(db, "four", "http://hub4:8082", state="draining")  # a state of a newer release, say
    async with hub.session.get(hub.url + "/api/v1/hubs") as response:
        assert response.status == 200 and "Set-Cookie" not in response.headers
        raw = await response.text()
    assert "\r" not in raw and "\x1b" not in raw  # JSON escapes them
    listed = await hub.ok("GET", "/hubs")
    assert sorted(h["id"] for h in listed["hubs"]) == sorted([hub.hub.id, "two", "x" * 2000])
    (two,) = [h for h in listed["hubs"] if h["id"] == "two"]
    assert two["api_url"] == odd_url and two["nbd_host"] == "\x1b[31m127.0.0.2" and two["live"] is True
    assert two["ports"] == {"first": 9, "last": 4, "size": 0}  # as the row says

    job = await JobStore(db, ManualClock(START), hub="four").create(
        JobKind.BACKUP, "/DC0/vm/b", Mode.AUTO, BackupDetail(), lifetime=3600
    )
    status, headers, body = await _cancel(hub, job.id)
    assert status == 409 and body["error"]["code"] == "other_hub" and "Location" not in headers, body
    assert "hub four, whose row in the hubs table is unreadable" in body["error"]["message"]
    assert (await hub.ok("GET", f"/backups/{job.id}"))["state"] == "pending"
