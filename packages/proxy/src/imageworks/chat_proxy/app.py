"""The ASGI application: ``create_app(config)`` and the module-level ``app``.

``uvicorn imageworks.chat_proxy.app:app`` works (runbook §2.1). ``app`` is built from the
environment when it is first looked up (the module's ``__getattr__``): importing this module
has no side effects, and a configuration error stops ``uvicorn`` as it loads the app, with the
variable's name, instead of surfacing later as plain-text 500s.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imageworks.chat_proxy.arbiter.gpu import GpuProbe
from imageworks.chat_proxy.config import ConfigError, ProxyConfig
from imageworks.chat_proxy.errors import MethodNotAllowed, NotFound, ProxyError, internal_error
from imageworks.chat_proxy.request.bodies import BodyBudget, BodyGuard
from imageworks.chat_proxy.request.browser import AllowedHosts, BrowserGuard, is_admin_path
from imageworks.chat_proxy.request.surfaces import BY_PATH, RAW, RESPONSE_BY_ID, envelope_of
from imageworks.chat_proxy.routes import admin, byid, gpu, openai, ops, raw, relay, views
from imageworks.chat_proxy.server.heap import freeze_startup_heap, give_big_blocks_back
from imageworks.chat_proxy.server.lifespan import close_state, open_state, start_background
from imageworks.chat_proxy.upstream.forwarding import send_error

log = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable, no spaces, bounded


class _RequestIds:
    """Ids unique across processes and restarts without a system call per request (uuid4 reads
    the kernel's random pool each time): 64 random bits per process, then a counter."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.count = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.count):016x}"


_request_ids = _RequestIds()


def _error_response(exc: ProxyError, admin: bool = False) -> Response:
    return Response(
        exc.to_bytes(admin),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


def _refused(request: Request, error: ProxyError) -> Response:
    """The error as an envelope, and a JSONL record of the refused request (the forwarded
    endpoints record theirs themselves)."""
    state = getattr(request.app.state, "proxy", None)
    if state is not None:
        state.records.refusal(
            request.scope.get("state", {}).get("request_id"),
            request.url.path,
            request.client.host if request.client else None,
            error,
        )
    return _error_response(error, admin=is_admin_path(request.url.path))


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return _refused(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _refused(
            request, MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        )
    if exc.status_code == 404:
        return _refused(request, NotFound(f"no route for {request.method} {request.url.path}"))
    return _refused(request, ProxyError(str(exc.detail), status=exc.status_code))


class RequestIdMiddleware:
    """Gives every response an ``x-request-id`` (the client's if it sent a sane one) and turns
    any unexpected exception into an enveloped 500 instead of a plain-text one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        rid = state.get("request_id", "")
        header = None  # an outer one has given the id, and adds the header
        if not rid:
            for name, value in scope["headers"]:
                if name == b"x-request-id":
                    rid = value.decode("latin-1")
                    break
            if not _CLIENT_ID.match(rid):
                rid = _request_ids.next()
            state["request_id"] = rid
            header = (b"x-request-id", rid.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if header is not None:
                    message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            error = internal_error(exc, rid)
            if envelope_of(scope["path"]) != "openai":
                await send_error(error, send_with_id, envelope_of(scope["path"]))
                return
            await _error_response(error)(scope, receive, send_with_id)


class ProxyApp:
    """The ASGI app the server runs. The forwarded surfaces (``surfaces.BY_PATH``, the
    Responses by id, the raw engine routes) go straight to the pipeline (``routes/forward``),
    with request ids and the 500 envelope but without Starlette's routing
    table, exception middleware and Request object; everything else, and the lifespan, goes
    to the Starlette app."""

    def __init__(
        self,
        app: Starlette,
        cors_origins: tuple[str, ...] = (),
        hosts: AllowedHosts | None = None,
    ) -> None:
        self.app = app
        self.state = app.state
        config: ProxyConfig | None = getattr(app.state, "config", None)
        self.bodies = BodyBudget(config.body_budget_bytes if config else 256 * 1024 * 1024)
        # Host, Origin and CORS rules before any route (request/browser.py); then every body
        # counted against the budget of bodies in flight, within a total deadline.
        guarded = BodyGuard(
            self._dispatch,
            self.bodies,
            config.body_deadline_s if config else 300.0,
            config.body_timeout_s if config else 30.0,
        )
        # The request id first: a request the Host or Origin rules refuse has one too, and
        # its JSONL record.
        self._entry: ASGIApp = RequestIdMiddleware(
            BrowserGuard(
                guarded, hosts or AllowedHosts("127.0.0.1"), cors_origins, self._record_refusal
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    def _record_refusal(self, scope: Scope, error: ProxyError) -> None:
        state = getattr(self.state, "proxy", None)
        if state is not None:
            client = scope.get("client")
            state.records.refusal(
                scope["state"]["request_id"], scope["path"], client[0] if client else None, error
            )

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif scope["path"] in BY_PATH:
            await self._forward(scope, receive, send)
        elif scope["path"].startswith(("/v1/responses/", "/responses/")):
            await self._response_by_id(scope, receive, send)
        elif scope["path"].startswith("/upstream/"):
            await self._upstream(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        surface = BY_PATH[path]
        if scope["method"] != "POST":
            error = MethodNotAllowed(f"{scope['method']} is not allowed on {path}; use POST")
            client = scope.get("client")
            self.state.proxy.records.refusal(
                scope["state"]["request_id"], path, client[0] if client else None, error
            )
            await send_error(error, send, surface.envelope)
            return
        await relay.forward(self.state.proxy, surface, scope, receive, send)

    async def _response_by_id(self, scope: Scope, receive: Receive, send: Send) -> None:
        await byid.by_id(self.state.proxy, RESPONSE_BY_ID, scope, receive, send)

    async def _upstream(self, scope: Scope, receive: Receive, send: Send) -> None:
        await relay.run(raw.RawCall(self.state.proxy, RAW, scope), scope, receive, send)


def create_app(
    config: ProxyConfig | None = None, *, probe: GpuProbe | None = None, freeze_heap: bool = False
) -> ProxyApp:
    """The proxy app. ``probe`` replaces the configured GPU probe (tests inject a fake one);
    ``freeze_heap``: the process is the proxy's own (the command line), and what its start
    built is frozen for the garbage collector (``freeze_startup_heap``)."""
    config = config or ProxyConfig.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = open_state(config, probe=probe)
        app.state.proxy = state
        background = await start_background(state)
        if freeze_heap:
            freeze_startup_heap()
        try:
            yield
        finally:
            await close_state(state, background)

    app = Starlette(
        routes=[*openai.ROUTES, *ops.ROUTES, *admin.ROUTES, *views.ROUTES, *gpu.ROUTES],
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.add_middleware(RequestIdMiddleware)
    app.state.config = config
    return ProxyApp(app, config.cors_origins, AllowedHosts(config.host, config.allowed_hosts))


_built: ProxyApp | None = None


def __getattr__(name: str) -> Any:
    """``app``: the application built from the environment, once, when first looked up; the
    process that looks it up serves it (``uvicorn imageworks.chat_proxy.app:app``), so its heap
    is the proxy's own, as under the command line (``server/heap.py``)."""
    global _built
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _built is None:
        try:
            _built = create_app(freeze_heap=True)
            give_big_blocks_back()
        except ConfigError as exc:  # one line naming the variable, as the CLI prints it
            raise SystemExit(f"Error: {exc}") from None
    return _built
