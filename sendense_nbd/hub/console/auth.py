"""Who may use the console: the API's bearer token, exchanged at a login form for a session cookie.

- A session is a random ID in an HttpOnly, SameSite=Strict cookie, held in memory (a hub restart
  logs everyone out), bounded in number, and ended by logout, :data:`IDLE` seconds unused or
  :data:`LIFETIME` seconds after login.
- Every state-changing request (any method but GET and HEAD) carries the session's CSRF token, in
  the form field ``csrf`` or the header ``X-CSRF-Token`` (htmx), and comes from this origin.
- A hub with no token (loopback only) gives every visitor a session without a login, still with CSRF.
- Every console answer carries a Content Security Policy that allows this origin's files only.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from sendense_nbd.http_api import Handler, foreign_host

COOKIE = "sendense_session"
LOGIN_COOKIE = "sendense_login"
#: Sessions held at once; logging in beyond this ends the least recently used one.
MAX_SESSIONS = 256
IDLE = 8 * 3600.0
LIFETIME = 24 * 3600.0
#: Messages kept for a session's next page.
MAX_FLASH = 8
#: A failed login answers after this many seconds, one at a time (a guess costs time).
FAILED_LOGIN_DELAY = 0.5
_SAFE_METHODS = frozenset({"GET", "HEAD"})
#: What a console page may load and where its forms may go: this origin only, no inline script or style.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


@attrs.define
class Flash:
    """A message for the next page: done, or an error (``role=alert``)."""

    text: str
    error: bool = False


@attrs.define
class Session:
    """One logged-in browser: its CSRF token, its times (monotonic seconds) and its pending messages."""

    id: str
    csrf: str
    started: float
    seen: float
    flashes: list[Flash] = attrs.field(factory=list)
    #: Logged out, expired or pushed out: its live feeds stop.
    ended: bool = False
    #: Live feeds (``/events``) it has open.
    streams: int = 0


#: Where the middleware leaves the request's session for the handlers.
SESSION: web.RequestKey[Session] = web.RequestKey("console_session", Session)


class Sessions:
    """The console's sessions, least recently used first; at most :data:`MAX_SESSIONS`."""

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._shared: Session | None = None

    def shared(self) -> Session:
        """The one session of a hub without a token (loopback only, so every visitor is its operator):
        a stateless visitor, such as a monitoring ``curl``, never pushes a browser's session out."""
        if self._shared is None:
            now = time.monotonic()
            self._shared = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        return self._shared

    def open(self) -> Session:
        """A new session (the oldest goes when the table is full)."""
        now = time.monotonic()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        self._by_id[session.id] = session
        while len(self._by_id) > MAX_SESSIONS:
            self._by_id.popitem(last=False)[1].ended = True
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this ID (and it counts as used now), else None."""
        session = None if session_id is None else self._by_id.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > IDLE or now - session.started > LIFETIME:
            self.close(session)
            return None
        session.seen = now
        self._by_id.move_to_end(session.id)
        return session

    def close(self, session: Session) -> None:
        """End ``session`` (logout)."""
        session.ended = True
        self._by_id.pop(session.id, None)


def session_of(request: web.Request) -> Session:
    """The request's session (the middleware admitted it)."""
    session: Session = request[SESSION]
    return session


def flash(request: web.Request, text: str, *, error: bool = False) -> None:
    """Show ``text`` on the session's next page."""
    flashes = session_of(request).flashes
    flashes.append(Flash(text, error))
    del flashes[:-MAX_FLASH]


def take_flashes(request: web.Request) -> list[Flash]:
    """The session's pending messages, which this page shows (and so they go)."""
    session = request.get(SESSION)
    if session is None:
        return []
    shown, session.flashes = session.flashes, []
    return list(shown)


async def checked_form(request: web.Request) -> MultiDictProxy[str]:
    """A POST's form fields as text (the middleware has checked its CSRF token already); files are refused."""
    form = await read_form(request)
    if any(not isinstance(value, str) for value in form.values()):
        raise web.HTTPBadRequest(reason="the console's forms take no files")
    return form  # every value was just checked to be text


def set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: float) -> None:
    """A cookie scripts cannot read and other sites cannot send; Secure when the browser came over HTTPS
    (to the hub, or to a TLS proxy that says so in ``X-Forwarded-Proto``)."""
    secure = forwarded_scheme(request) == "https"
    response.set_cookie(name, value, max_age=int(max_age), path="/", httponly=True, samesite="Strict", secure=secure)


def console_middleware(sessions: Sessions, token: str | None, public: tuple[str, ...]) -> Any:
    """Admit a console request: its session (else the login page), its CSRF token and origin on changes.

    Paths under ``public`` (the login page, static files) need no session.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _admit(request, handler, sessions, token, public)

    return middleware


def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The headers every console answer carries: CSP, no sniffing, no caching of pages."""
    if response.prepared:
        return
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


async def _admit(
    request: web.Request, handler: Handler, sessions: Sessions, token: str | None, public: tuple[str, ...]
) -> web.StreamResponse:
    changes = request.method not in _SAFE_METHODS
    if token is None and foreign_host(request):  # a DNS-rebinding page: a hub without a token is loopback only
        raise web.HTTPForbidden(reason="this hub has no token and answers only loopback host names")
    if changes and not same_origin(request):
        raise web.HTTPForbidden(reason="this request came from another site")
    if request.path in public or request.path.startswith("/static/"):
        return await handler(request)
    session = sessions.shared() if token is None else sessions.get(request.cookies.get(COOKIE))
    if session is None:
        raise _login_needed(request, changes)
    if changes and not await _csrf_ok(request, session):
        raise web.HTTPForbidden(reason="the form's CSRF token is missing or stale: reload the page and try again")
    request[SESSION] = session
    response = await handler(request)
    if token is None and request.cookies.get(COOKIE) != session.id:
        set_cookie(response, request, COOKIE, session.id, LIFETIME)
    return response


def _login_needed(request: web.Request, changes: bool) -> web.HTTPException:
    """What a request without a live session gets: the login page, or for htmx, a live feed or a form, a 401/403
    that says so (htmx follows ``HX-Redirect`` to the login page)."""
    login = "/login?" + urlencode({"next": request.path_qs})
    if request.headers.get("HX-Request"):
        current = urlsplit(request.headers.get("HX-Current-URL", ""))
        login = "/login?" + urlencode({"next": current.path or "/"})
        return web.HTTPUnauthorized(reason="your session has ended: log in again", headers={"HX-Redirect": login})
    if changes:
        return web.HTTPForbidden(reason="your session has ended: log in again")
    if "text/event-stream" in request.headers.get("Accept", ""):
        return web.HTTPUnauthorized(reason="your session has ended: log in again")
    return web.HTTPSeeOther(login)


def same_origin(request: web.Request) -> bool:
    """Whether a change request's ``Origin`` (or, lacking it, ``Referer``) is this console's own (with the scheme
    a TLS proxy reports in ``X-Forwarded-Proto``)."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if origin is None:
        return True  # not a browser's cross-site request: browsers send Origin on every cross-site POST
    parts = urlsplit(origin)
    return parts.scheme in (request.scheme, forwarded_scheme(request)) and parts.netloc == request.host


def forwarded_scheme(request: web.Request) -> str:
    """``https`` when a TLS proxy says the browser came over HTTPS, else the request's own scheme."""
    return "https" if request.headers.get("X-Forwarded-Proto", "").lower() == "https" else request.scheme


async def read_form(request: web.Request) -> MultiDictProxy[Any]:
    """The request's form; one that cannot be parsed is a 400 with a sentence."""
    try:
        return await request.post()
    except (ValueError, HttpProcessingError) as exc:
        detail = " ".join(str(exc).split())[:160]  # a reason is one line
        raise web.HTTPBadRequest(reason=f"the form could not be read: {detail}") from None


async def _csrf_ok(request: web.Request, session: Session) -> bool:
    given = request.headers.get("X-CSRF-Token")
    if given is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        value = (await read_form(request)).get("csrf")
        given = value if isinstance(value, str) else None
    return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())


def safe_next(target: str | None) -> str:
    """Where to go after login: a path on this site only (no ``//host`` or scheme), else the dashboard."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/"


def token_matches(given: str, token: str) -> bool:
    """Whether ``given`` is the bearer token (compared in constant time)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


async def refuse_login() -> None:
    """Slow down a wrong guess."""
    await asyncio.sleep(FAILED_LOGIN_DELAY)
