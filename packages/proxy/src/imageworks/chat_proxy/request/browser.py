"""What a web page in the operator's browser may do: nothing it was not allowed to.

A page on any site can make the browser send requests to ``127.0.0.1``: "simple" ones (a
``text/plain`` POST) without asking first, and, through DNS rebinding (a name of the
attacker's that first points at their server, then at 127.0.0.1), requests whose answers it
can read. Loopback trust alone does not stop either. So, for the proxy and the executor alike,
before any route runs:

- the ``Host`` header must name this server: a loopback name, an IP address (a rebinding page
  always sends its own *name*), the configured bind host, this machine's host name, or one of
  the names a setting adds (``CHAT_PROXY_ALLOWED_HOSTS``; ``*`` turns the check off);
- on admin and lease paths (``/admin/*``, ``/v1/gpu/*``) a request carrying an ``Origin`` must
  come from this server's own origin, and CORS never applies there: a preflight is refused,
  whatever ``CHAT_PROXY_CORS_ORIGINS`` says;
- elsewhere a state-changing request (anything but GET, HEAD, OPTIONS) carrying an ``Origin``
  must come from this server's origin or one of the CORS origins;
- every refusal is the error envelope (Anthropic's on its Messages routes), a CORS refusal
  included.

Admin and lease bodies must also be ``application/json`` (``bodies.json_object``): a page can
send ``text/plain`` without a preflight, but not JSON.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from imageworks.chat_proxy.errors import ProxyError
from imageworks.chat_proxy.request.surfaces import envelope_of

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ADMIN_PREFIXES = ("/admin/", "/v1/gpu/")


class ForbiddenHost(ProxyError):
    status = 403
    code = "host_not_allowed"


class ForbiddenOrigin(ProxyError):
    status = 403
    code = "origin_not_allowed"


def is_admin_path(path: str) -> bool:
    return path.startswith(ADMIN_PREFIXES) or path == "/admin"


def _hostname(host: str) -> str:
    """The name in a ``Host`` value or an origin's authority, port and brackets removed,
    lower-cased, without a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


class AllowedHosts:
    """The names the ``Host`` header may carry."""

    def __init__(self, bind_host: str, extra: Iterable[str] = ()) -> None:
        extra = [_hostname(h) for h in extra if h.strip()]
        self.any = "*" in extra
        names = set(LOOPBACK_NAMES) | set(extra)
        names.add(_hostname(bind_host))
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.add(name.lower().rstrip("."))
        self.names = frozenset(n for n in names if n)

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        name = _hostname(host)
        if not name:
            return False
        return name in self.names or _is_ip(name) or name.endswith(".localhost")


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value).decode("latin-1")
    return None


def same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` (``scheme://authority``) is the origin of the server the request
    was sent to (``host`` is its ``Host`` header)."""
    scheme, sep, authority = origin.partition("://")
    if not sep or scheme not in ("http", "https"):
        return False
    return authority.rstrip("/").lower() == host.strip().lower()


class BrowserGuard:
    """The ASGI middleware that applies the rules above; outermost, before any route."""

    app: ASGIApp

    def __init__(
        self,
        app: ASGIApp,
        hosts: AllowedHosts,
        cors_origins: tuple[str, ...] = (),
        on_refusal: Callable[[Scope, ProxyError], None] | None = None,
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.on_refusal = on_refusal  # told of each refusal (the proxy's JSONL record)
        self.cors_origins = frozenset(o.rstrip("/") for o in cors_origins)
        self.cors: ASGIApp | None = None
        if cors_origins:
            # Browsers (Open WebUI direct connections, web tools). A wildcard origin never comes
            # with credentials: the middleware would echo each origin back instead of "*".
            self.cors = CORSMiddleware(
                app,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                allow_credentials="*" not in cors_origins,
                expose_headers=["x-request-id", "retry-after"],
                max_age=600,
            )

    def _cors_allows(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.rstrip("/") in self.cors_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        host = _header(scope, b"host")
        if host is None or not self.hosts.allows(host):
            await self._refuse(
                ForbiddenHost(
                    f"the Host header {host!r} does not name this server; add the name to "
                    "CHAT_PROXY_ALLOWED_HOSTS if clients reach it by that name"
                    if host is not None
                    else "the request has no Host header"
                ),
                scope,
                send,
            )
            return
        method: str = scope["method"]
        origin = _header(scope, b"origin")
        # An engine's raw routes (/upstream/...) may change its state for an admin: no page may
        # send those either, whatever the CORS origins.
        raw_write = path.startswith("/upstream/") and method not in SAFE_METHODS
        if is_admin_path(path) or raw_write:
            if origin is not None and not same_origin(origin, host):
                await self._refuse(
                    ForbiddenOrigin(
                        f"admin and lease calls are not taken from web pages (Origin {origin!r})"
                    ),
                    scope,
                    send,
                )
                return
            if method == "OPTIONS" and _header(scope, b"access-control-request-method"):
                await self._refuse(
                    ForbiddenOrigin("CORS is not offered on admin and lease paths"), scope, send
                )
                return
            await self.app(scope, receive, send)
            return
        if origin is None or same_origin(origin, host):
            await self.app(scope, receive, send)
            return
        if not self._cors_allows(origin):
            if method not in SAFE_METHODS or _header(scope, b"access-control-request-method"):
                await self._refuse(
                    ForbiddenOrigin(
                        f"the origin {origin!r} is not allowed (CHAT_PROXY_CORS_ORIGINS)"
                    ),
                    scope,
                    send,
                )
                return
            await self.app(scope, receive, send)
            return
        await (self.cors or self.app)(scope, receive, send)

    async def _refuse(self, error: ProxyError, scope: Scope, send: Send) -> None:
        if self.on_refusal is not None:
            self.on_refusal(scope, error)
        await _refuse(error, send, envelope_of(scope["path"]))


async def _refuse(error: ProxyError, send: Send, envelope: str = "openai") -> None:
    anthropic = envelope == "anthropic"
    body = error.anthropic_bytes() if anthropic else error.to_bytes()
    await send(
        {
            "type": "http.response.start",
            "status": error.anthropic_status() if anthropic else error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
