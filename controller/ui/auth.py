"""Who may talk to a cube web server (`cube ui`, `cube serve`).

The rule: a web endpoint bound anywhere but loopback needs a token. The token arrives once as
`?token=` (then lives in an HttpOnly cookie), or as `Authorization: Bearer T` from scripts, and is
compared in constant time on every request, static files included. Form posts also carry a CSRF
token, so a hostile page in the same browser cannot post on the user's behalf. On loopback
without a token the Host header must name loopback too: that stops DNS rebinding, where a
hostile name resolves to 127.0.0.1 and its page reads ours.

A pure ASGI wrapper (not Starlette's BaseHTTPMiddleware) so streamed responses (server-sent
events) pass through untouched.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

from controller.errors import CubeError

COOKIE = "cube_token"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def is_loopback(bind: str) -> bool:
    if bind in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere, so it counts as exposed


def bind_token(bind: str, token: str | None, announce: Callable[[str], None],
               url: str) -> str | None:
    """The token a server bound to `bind` must demand: the given one, or for a non-loopback
    bind without one a fresh token, printed once (it is never stored anywhere)."""
    if token is not None and len(token) < 16:
        raise CubeError("The token is too short (fewer than 16 characters).",
                        "Pass a longer --token, or leave it out to get a generated one.")
    if token or is_loopback(bind):
        return token
    token = secrets.token_urlsafe(24)
    announce(f"{bind} is not loopback, so every request needs this token (shown only now): "
             f"{url}/?token={token}")
    return token


def same(given: str | None, expected: str) -> bool:
    """Constant-time: the time taken says nothing about how much of a guess was right."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


class TokenGuard:
    """Refuses requests without the token (401), moves a `?token=` into the cookie, and on a
    tokenless loopback server refuses a Host header that is not loopback (403)."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if self.token is None:
            if _host_name(headers.get("host", "")) not in LOOPBACK_NAMES:
                return await _plain(send, 403, "Forbidden: this server answers only to "
                                    "localhost (Host header is not loopback).")
            return await self.app(scope, receive, send)
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if same(query.get("token"), self.token):
            return await _set_cookie_and_redirect(scope, send, self.token, query)
        if same(_cookie(headers), self.token) or same(_bearer(headers), self.token):
            return await self.app(scope, receive, send)
        await _plain(send, 401, "Unauthorized: this server needs its token. Open the URL "
                     "`cube ui` printed (it ends in ?token=...), or send 'Authorization: "
                     "Bearer TOKEN'.")


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie(headers: dict[str, str]) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:  # a malformed cookie header is just "no token"
        return None
    return jar[COOKIE].value if COOKIE in jar else None


def _bearer(headers: dict[str, str]) -> str | None:
    kind, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if kind.lower() == "bearer" else None


async def _plain(send: Callable, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _set_cookie_and_redirect(scope: Scope, send: Callable, token: str,
                                   query: dict[str, str]) -> None:
    """The token leaves the address bar (and history) at once: same page, without it."""
    rest = urlencode({k: v for k, v in query.items() if k != "token"})
    location = scope.get("path", "/") + (f"?{rest}" if rest else "")
    cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode()),
                            (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
