"""The console's guard: login with the API token, the session cookie, CSRF, origins, headers, errors as pages."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp

from sendense_nbd.hub.console import auth
from tests.console.inprocess import TOKEN, console_client, console_hub


async def test_login_sets_a_strict_httponly_cookie_and_opens_the_dashboard(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        status, _ = await client.get("/")
        assert status == 303  # to the login page
        response = await client.login()
        assert response.status == 303 and response.headers["Location"] == "/"
        cookie = response.cookies[auth.COOKIE]
        assert cookie["httponly"] is True and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        status, page = await client.get("/")
        assert status == 200 and "<h1>Dashboard</h1>" in page and "Running jobs" in page


async def test_a_wrong_token_is_refused_with_a_sentence(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        response = await client.login("not-the-token")
        assert response.status == 401
        status, _ = await client.get("/jobs")
        assert status == 303
        assert auth.COOKIE not in response.cookies


async def test_login_form_needs_its_own_csrf_cookie(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), aiohttp.ClientSession() as session:
        async with session.post(url + "/login", data={"token": TOKEN, "csrf": "x"}, allow_redirects=False) as answer:
            text = await answer.text()
            assert answer.status == 403 and "login form expired" in text and auth.COOKIE not in answer.cookies


async def test_next_goes_only_to_this_site(tmp_path: Path) -> None:
    assert auth.safe_next("/jobs?state=failed") == "/jobs?state=failed"
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "jobs", None, ""):
        assert auth.safe_next(evil) == "/"


async def test_logout_ends_the_session_and_its_cookie_is_stale(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        await client.login()
        old = next(cookie.value for cookie in client.session.cookie_jar if cookie.key == auth.COOKIE)
        response = await client.post("/logout")
        assert response.status == 303 and response.headers["Location"] == "/login"
        async with console_client(url) as replay:
            replay.session.cookie_jar.update_cookies({auth.COOKIE: old})
            status, _ = await replay.get("/")
            assert status == 303  # to the login page
            replay.csrf = "anything"
            refused = await replay.post("/logout")
            assert refused.status == 403


async def test_a_forged_session_is_refused(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        client.session.cookie_jar.update_cookies({auth.COOKIE: "forged"})
        status, page = await client.get("/")
        assert status == 303
        client.csrf = "forged"
        response = await client.post("/logout")
        assert response.status == 403


async def test_a_change_without_or_with_a_wrong_csrf_token_is_refused(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        await client.login()
        missing = await client.post("/logout", csrf=False)
        wrong = await client.post("/logout", {"csrf": "0" * 43})
        assert missing.status == wrong.status == 403
        status, page = await client.get("/")
        assert status == 200  # still logged in: the refused logouts did nothing
        async with client.session.post(url + "/logout", headers={"X-CSRF-Token": client.csrf or ""}) as answer:
            assert answer.status == 200  # htmx's header is accepted too (redirect followed to the login page)
            assert "Log in" in await answer.text()


async def test_a_cross_site_post_is_refused_even_with_the_token(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        await client.login()
        headers = {"Origin": "http://evil.example"}
        data = {"csrf": client.csrf or ""}
        async with client.session.post(url + "/logout", data=data, headers=headers, allow_redirects=False) as answer:
            assert answer.status == 403 and "another site" in await answer.text()


async def test_pages_carry_a_strict_content_security_policy(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), aiohttp.ClientSession() as session:
        async with session.get(url + "/login") as answer:
            policy = answer.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
            page = await answer.text()
        scripts = re.findall(r'<script src="(/static/[^"]+)"', page)
        assert len(scripts) == 3 and "<script>" not in page
        for src in scripts:  # every asset is the hub's own
            async with session.get(url + src) as asset:
                assert asset.status == 200 and len(await asset.read()) > 100


async def test_the_api_keeps_its_bearer_token_and_json(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        await client.login()
        async with client.session.get(url + "/api/v1/status") as answer:  # a console cookie is no API token
            assert answer.status == 401 and (await answer.json())["error"]["code"] == "unauthorized"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with client.session.get(url + "/api/v1/nowhere", headers=headers) as answer:
            assert answer.status == 404 and (await answer.json())["error"]["code"] == "not_found"
        status, page = await client.get("/nowhere")
        assert status == 404 and "Not found" in page and "{" not in page.split("<main", 1)[1]


async def test_a_hub_without_a_token_opens_a_session_for_every_visitor(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo", token=None) as (_, url), console_client(url) as client:
        status, page = await client.get("/")
        assert status == 200 and "Dashboard" in page and "Log out" not in page
        assert auth.COOKIE in {cookie.key for cookie in client.session.cookie_jar}
        refused = await client.post("/logout", csrf=False)
        assert refused.status == 403  # CSRF still applies


async def test_the_live_feed_sends_the_running_jobs_fragment(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        await client.login()
        async with client.session.get(url + "/events") as stream:
            assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
            lines = [await asyncio.wait_for(stream.content.readline(), 5) for _ in range(3)]
        assert lines[0] == b"event: running\r\n" and b"No job is running." in b"".join(lines)


async def test_the_cookie_is_secure_behind_a_tls_proxy(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), aiohttp.ClientSession() as session:
        headers = {"X-Forwarded-Proto": "https"}
        async with session.get(url + "/login", headers=headers) as answer:
            nonce = answer.cookies[auth.LOGIN_COOKIE]
            assert nonce["secure"] is True
        data = {"csrf": nonce.value, "token": TOKEN}  # a Secure cookie is not sent over plain HTTP: by hand
        headers["Cookie"] = f"{auth.LOGIN_COOKIE}={nonce.value}"
        async with session.post(url + "/login", data=data, headers=headers, allow_redirects=False) as answer:
            assert answer.status == 303 and answer.cookies[auth.COOKIE]["secure"] is True
        async with session.get(url + "/login") as answer:
            assert not answer.cookies[auth.LOGIN_COOKIE]["secure"]


async def test_a_wrong_token_keeps_where_the_login_was_going(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        status, page = await client.get("/login?next=/jobs%3Fstate%3Dfailed")
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert status == 200 and found is not None
        data = {"csrf": found.group(1), "token": "wrong", "next": "/jobs?state=failed"}
        async with client.session.post(url + "/login", data=data, allow_redirects=False) as answer:
            page = await answer.text()
        assert answer.status == 401 and 'name="next" value="/jobs?state=failed"' in page
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found is not None
        data = {"csrf": found.group(1), "token": TOKEN, "next": "/jobs?state=failed"}
        async with client.session.post(url + "/login", data=data, allow_redirects=False) as answer:
            assert answer.status == 303 and answer.headers["Location"] == "/jobs?state=failed"


async def test_leaving_the_live_feed_ends_its_stream_quietly(tmp_path: Path, caplog: Any) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        await client.login()
        for _ in range(3):
            stream = await client.session.get(url + "/events")
            assert await asyncio.wait_for(stream.content.readline(), 5) == b"event: running\r\n"
            stream.close()
        await asyncio.sleep(2.5)  # each stream's next send finds its browser gone
        async with client.session.get(url + "/events") as stream:
            assert stream.status == 200
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


async def test_the_api_refuses_what_a_browser_sends_for_another_site(tmp_path: Path) -> None:
    body = '{"name": "evil", "url": "http://127.0.0.1:1"}'
    async with console_hub(tmp_path / "repo", token=None) as (hub, url), aiohttp.ClientSession() as session:
        port = url.rsplit(":", 1)[1]
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "null"},  # a sandboxed frame
            {"Sec-Fetch-Site": "cross-site"},
            {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},  # DNS rebinding
            {"Host": f"evil.example:{port}"},
        ):
            headers["Content-Type"] = "text/plain"  # what a cross-site form or fetch may send without asking
            async with session.post(url + "/api/v1/nodes", data=body, headers=headers) as answer:
                assert answer.status == 403, headers
                assert (await answer.json())["error"]["code"] == "forbidden"
        assert [node.name for node in await hub.nodes.records()] == []
        same = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
        async with session.get(url + "/api/v1/nodes", headers=same) as answer:
            assert answer.status == 200
        async with session.get(url.replace("127.0.0.1", "localhost") + "/api/v1/nodes") as answer:
            assert answer.status == 200  # loopback names are fine


async def test_a_hub_without_a_token_refuses_a_foreign_host_and_shares_one_session(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo", token=None) as (_, url), console_client(url) as client:
        port = url.rsplit(":", 1)[1]
        async with client.session.get(url + "/nodes", headers={"Host": f"evil.example:{port}"}) as answer:
            assert answer.status == 403 and "loopback" in await answer.text()
            assert auth.COOKIE not in answer.cookies
        status, _ = await client.get("/nodes")  # a page with a form
        assert status == 200 and client.csrf
        for _ in range(auth.MAX_SESSIONS + 5):  # visitors without a cookie (monitoring) push nobody out
            async with aiohttp.ClientSession() as visitor, visitor.get(url + "/") as answer:
                assert answer.status == 200
        response = await client.post("/nodes/nothing/check")
        assert response.status in (303, 404)  # the CSRF token still holds: the node is merely unknown


async def test_an_htmx_request_or_live_feed_without_a_session_is_told_to_log_in(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), aiohttp.ClientSession() as session:
        headers = {"HX-Request": "true", "HX-Current-URL": url + "/jobs/x?y=1"}
        async with session.get(url + "/jobs", headers=headers, allow_redirects=False) as answer:
            assert answer.status == 401 and answer.headers["HX-Redirect"] == "/login?next=%2Fjobs%2Fx"
            assert "log in again" in await answer.text()
        headers = {"Accept": "text/event-stream"}
        async with session.get(url + "/events", headers=headers, allow_redirects=False) as answer:
            assert answer.status == 401


async def test_a_malformed_form_is_a_400_sentence(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        await client.login()
        headers = {"Content-Type": "multipart/form-data; boundary=x"}
        body = b"--x\r\nContent-Disposition: form-data; name=csrf\r\nbroken header\r\n\r\nvalue\r\n--x--\r\n"
        async with client.session.post(url + "/logout", data=body, headers=headers) as answer:
            assert answer.status == 400 and "form could not be read" in await answer.text()


async def test_live_feeds_are_bounded_per_session_and_end_with_it(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        await client.login()
        streams = [await client.session.get(url + "/events") for _ in range(4)]
        assert [stream.status for stream in streams] == [200] * 4
        async with client.session.get(url + "/events") as fifth:
            assert fifth.status == 503 and "too many live views" in await fifth.text()
        await client.post("/logout")
        for stream in streams:  # each feed ends within a tick of the logout
            await asyncio.wait_for(stream.content.read(), 5)
            stream.close()


async def test_a_tls_proxy_origin_is_this_consoles_own(tmp_path: Path) -> None:
    async with console_hub(tmp_path / "repo") as (_, url), console_client(url) as client:
        await client.login()
        host = url.removeprefix("http://")
        headers = {"Origin": f"https://{host}", "X-Forwarded-Proto": "https"}
        data = {"csrf": client.csrf or ""}
        async with client.session.post(url + "/logout", data=data, headers=headers, allow_redirects=False) as answer:
            assert answer.status == 303
        async with client.session.post(url + "/logout", data=data, headers={"Origin": f"https://{host}"}) as answer:
            assert answer.status == 403  # https without the proxy saying so is another origin
