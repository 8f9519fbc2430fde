"""The dashboard's routes: two pages, their JSON, a login form, and the vendored static files.

Read-only: nothing here changes a release. Authentication is the control API's: the
composition root hands in `identify` (the control API's token check, any role may read);
None means the control API has no tokens, and then, as the control API, the dashboard is
only served on loopback (the caller checks the bind). A token is given once through the
login form, which answers with a session: a random id in an HttpOnly, SameSite=Strict
cookie, never the token itself (a copied cookie or a browser profile gives away one
session, which logout or SESSION_S ends, not a credential for the control API). Or the
token is sent as `Authorization: Bearer`. Without either a page answers the login form and
the JSON 401, with no data.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.dashboard.data import History, Sources, overview
from gateway.errors import Unauthenticated

# Takes an Authorization header value; returns the caller, or raises Unauthenticated.
Identify = Callable[[str], object]

COOKIE = "gateway_dashboard"
# How long a login lasts, and how many are kept (the oldest is dropped past it). Sessions
# live in this process (the dashboard is served by one): a restart logs everyone out.
SESSION_S = 12 * 3600.0
MAX_SESSIONS = 1024
# The login form's body is one token: anything larger is not one.
MAX_LOGIN_BYTES = 4096
# The pages load scripts and styles from /static only; no inline script, no framing.
HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
STATIC = resources.files("gateway.dashboard") / "static"


def _page(name: str, status: int = 200, note: str = "") -> HTMLResponse:
    text = (STATIC / name).read_text(encoding="utf-8")
    if note:  # a fixed sentence of ours, never the request's text
        text = text.replace("<form", f'<p class="error" role="alert">{note}</p>\n  <form', 1)
    return HTMLResponse(text, status_code=status, headers=HEADERS)


# The Host names a loopback-only dashboard answers to (a port after them is allowed).
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]"]


def _json(content: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status, headers=HEADERS)


class Sessions:
    """Logins of the dashboard: a random id for each, standing for the token it was given."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}  # id -> (token, expiry); oldest first

    def start(self, token: str) -> str:
        now = self._clock()
        for sid in [sid for sid, (_, until) in self._tokens.items() if until <= now]:
            del self._tokens[sid]
        while len(self._tokens) >= MAX_SESSIONS:
            del self._tokens[next(iter(self._tokens))]
        sid = secrets.token_urlsafe(32)
        self._tokens[sid] = (token, now + SESSION_S)
        return sid

    def token(self, sid: str) -> str | None:
        """The token a live session stands for; the caller checks it again on every request,
        so a session is never worth more than its token."""
        found = self._tokens.get(sid)
        if found is None:
            return None
        if found[1] <= self._clock():
            del self._tokens[sid]
            return None
        return found[0]

    def end(self, sid: str) -> None:
        self._tokens.pop(sid, None)


class Dashboard:
    def __init__(self, sources: Sources, history: History, identify: Identify | None, secure_cookie: bool) -> None:
        self.sources = sources
        self.history = history
        self.identify = identify
        self.secure_cookie = secure_cookie  # served over TLS: the cookie never travels in the clear
        self.sessions = Sessions()

    def allowed(self, request: Request) -> bool:
        if self.identify is None:
            return True
        header = request.headers.get("authorization", "")
        if not header and (cookie := request.cookies.get(COOKIE)):
            token = self.sessions.token(cookie)
            if token is None:
                return False
            header = f"Bearer {token}"
        try:
            self.identify(header)
        except Unauthenticated:
            return False
        return True

    async def index(self, request: Request) -> Response:
        return _page("index.html") if self.allowed(request) else _page("login.html", 401)

    async def model_page(self, request: Request) -> Response:
        return _page("model.html") if self.allowed(request) else _page("login.html", 401)

    async def api_overview(self, request: Request) -> Response:
        if not self.allowed(request):
            return _json({"error": "unauthenticated: log in, or send Authorization: Bearer <token>"}, 401)
        return _json(overview(self.sources, time.time()))

    async def api_model(self, request: Request) -> Response:
        if not self.allowed(request):
            return _json({"error": "unauthenticated: log in, or send Authorization: Bearer <token>"}, 401)
        model = request.path_params["name"]
        if model not in self.sources.models():
            return _json({"error": f"no model {model!r} is loaded"}, 404)
        try:
            seq = int(request.query_params.get("since", "0"))
        except ValueError:
            return _json({"error": "since: expected a sample number"}, 400)
        snapshot = self.sources.snapshot(model, time.time())
        audit = await asyncio.to_thread(self.sources.audit, model)  # SQLite: off the loop
        points = self.history.since(model, seq)
        # A page's first poll carries the whole ring (about a megabyte of JSON): encoded off
        # the loop, which also serves inference on this process.
        return await asyncio.to_thread(_json, {"snapshot": snapshot, "points": points, "audit": audit})

    async def login(self, request: Request) -> Response:
        if self.identify is None:
            return RedirectResponse("/", 303)
        body = await request.body()
        if len(body) > MAX_LOGIN_BYTES:
            return _page("login.html", 413, "That is not a token.")
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0].strip()
        try:
            self.identify(f"Bearer {token}")
        except Unauthenticated:
            return _page("login.html", 401, "That token is not known to this gateway.")
        response = RedirectResponse(_local(request.query_params.get("next", "/")), 303)
        session = self.sessions.start(token)
        response.set_cookie(
            COOKIE,
            session,
            max_age=int(SESSION_S),
            httponly=True,
            samesite="strict",
            secure=self.secure_cookie,
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        if cookie := request.cookies.get(COOKIE):
            self.sessions.end(cookie)
        response = RedirectResponse("/", 303)
        response.delete_cookie(COOKIE, path="/")
        return response


def _local(target: str) -> str:
    """Only a path on this server: a login link can never send the browser elsewhere."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def build_app(sources: Sources, history: History, identify: Identify | None, secure_cookie: bool = False) -> Starlette:
    d = Dashboard(sources, history, identify, secure_cookie)
    # Without tokens the dashboard is open to anyone on this host, and it binds loopback only;
    # a web page elsewhere could still reach it through DNS rebinding (its name resolved to
    # 127.0.0.1): only requests naming this host by a loopback name are answered.
    middleware = [] if identify is not None else [Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES)]
    return Starlette(
        middleware=middleware,
        routes=[
            Route("/", d.index),
            Route("/models/{name}", d.model_page),
            Route("/api/overview", d.api_overview),
            Route("/api/models/{name}", d.api_model),
            Route("/login", d.login, methods=["POST"]),
            Route("/logout", d.logout, methods=["POST"]),
            # Scripts, styles and the vendored chart library: no data, so no login needed.
            Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        ],
    )
