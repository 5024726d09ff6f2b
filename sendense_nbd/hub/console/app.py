"""The console on the hub's aiohttp application: templates, static files, sessions, pages.

:func:`setup_console` adds it to the API's application, so one server answers both; the API's
own middleware leaves every path outside ``/api/`` and ``/metrics`` to the console's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from sendense_nbd.errors import SendenseError
from sendense_nbd.http_api import ErrorMap, Handler
from sendense_nbd.hub.service import Hub

from . import auth, dashboard, jobs, nodes, policies, vms
from .render import CLOCK, ERRORS, csrf_field, filters, message_for, page_context, render, status_for

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
#: Paths the API answers; everything else is the console's.
API_PATHS = ("/api/", "/metrics")
_PUBLIC = ("/login",)


def setup_console(app: web.Application, hub: Hub, *, token: str | None, errors: ErrorMap) -> None:
    """Serve the console from ``app`` (the hub's API application) at ``/``."""
    sessions = auth.Sessions()
    app[CLOCK] = hub.clock
    app[ERRORS] = errors
    app.middlewares.append(_error_pages)
    app.middlewares.append(_console_only(auth.console_middleware(sessions, token, _PUBLIC)))
    env = aiohttp_jinja2.setup(  # after the session middleware: its context processors need the session
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        context_processors=[page_context],
        undefined=jinja2.StrictUndefined,
        filters=filters(),
    )
    env.globals["csrf_field"] = csrf_field
    env.globals["static"] = _static_urls()
    env.globals["login_required"] = token is not None
    login = _Login(sessions, token)
    app.router.add_get("/login", login.form)
    app.router.add_post("/login", login.submit)
    app.router.add_post("/logout", login.logout)
    app.router.add_static("/static/", HERE / "static")
    for page in (dashboard, vms, jobs, policies, nodes):
        app.router.add_routes(page.routes(hub))


def _static_urls() -> Callable[[str], str]:
    """``static(name)``: the file's URL with a digest of its content, so browsers never use a stale copy."""
    versions = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12] for path in (HERE / "static").iterdir()}
    return lambda name: f"/static/{name}?v={versions[name]}"


def is_api(request: web.Request) -> bool:
    """Whether the REST API (not the console) answers ``request``."""
    return request.path.startswith(API_PATHS[0]) or request.path == API_PATHS[1]


def _console_only(middleware: Any) -> Any:
    """``middleware`` for the console's paths; the API's pass by."""

    @web.middleware
    async def scoped(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_api(request):
            return await handler(request)
        response: web.StreamResponse = await middleware(request, handler)
        return response

    return scoped


@web.middleware
async def _error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A console error is a page with a sentence (for htmx, a fragment), never JSON."""
    if is_api(request):
        return await handler(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            auth.secure_headers(request, exc)
            raise
        response = _error_page(request, exc.status, exc.reason)
        if "HX-Redirect" in exc.headers:  # htmx: go to the login page
            response.headers["HX-Redirect"] = exc.headers["HX-Redirect"]
    except SendenseError as exc:
        response = _error_page(request, status_for(exc, request.app[ERRORS]), message_for(exc))
    except Exception:
        log.exception("console error on %s %s", request.method, request.path)
        response = _error_page(request, 500, "The hub failed to answer this page; its log has the details.")
    auth.secure_headers(request, response)
    return response


def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    template = "_error.html" if request.headers.get("HX-Request") else "error.html"
    return render(request, template, {"status": status, "message": message}, status=status)


class _Login:
    """``/login`` and ``/logout``: the bearer token for a session cookie."""

    def __init__(self, sessions: auth.Sessions, token: str | None) -> None:
        self.sessions, self.token = sessions, token
        self._guesses = asyncio.Lock()  # wrong tokens are answered one at a time, each after a delay

    async def form(self, request: web.Request) -> web.Response:
        """GET /login: the form, with a one-time token in a cookie against login CSRF."""
        return self._form(request, request.query.get("next"), error=None, status=200)

    def _form(self, request: web.Request, target: str | None, *, error: str | None, status: int) -> web.Response:
        nonce = secrets.token_urlsafe(32)
        target = auth.safe_next(target)
        context = {"error": error, "login_csrf": nonce, "next": target, "open_hub": self.token is None}
        response = render(request, "login.html", context, status=status)
        auth.set_cookie(response, request, auth.LOGIN_COOKIE, nonce, 3600)
        return response

    async def submit(self, request: web.Request) -> web.Response:
        """POST /login: the right token opens a session and goes on to ``next``."""
        form = await auth.checked_form(request)
        expected = request.cookies.get(auth.LOGIN_COOKIE, "")
        if not expected or not auth.token_matches(form.get("csrf", ""), expected):
            raise web.HTTPForbidden(reason="the login form expired: reload it and log in again")
        if self.token is not None and not auth.token_matches(form.get("token", ""), self.token):
            async with self._guesses:
                await auth.refuse_login()
            return self._form(request, form.get("next"), error="That is not the hub's API token.", status=401)
        session = self.sessions.open()
        response = web.HTTPSeeOther(auth.safe_next(form.get("next")))
        auth.set_cookie(response, request, auth.COOKIE, session.id, auth.LIFETIME)
        response.del_cookie(auth.LOGIN_COOKIE, path="/")
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        """POST /logout: the session ends here and now."""
        self.sessions.close(auth.session_of(request))
        response = web.HTTPSeeOther("/login")
        response.del_cookie(auth.COOKIE, path="/")
        raise response
