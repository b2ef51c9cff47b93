"""The ASGI application: ``create_app(config)`` and the module-level ``app``.

``uvicorn imageworks.chat_proxy.app:app`` works (runbook §2.1); ``app`` builds the real
application from the environment on first use, so importing this module has no side effects.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imageworks.chat_proxy.backends import build_backends
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import MethodNotAllowed, NotFound, ProxyError
from imageworks.chat_proxy.lifecycle import Lifecycle
from imageworks.chat_proxy.metrics import Metrics
from imageworks.chat_proxy.requestlog import RequestLog
from imageworks.chat_proxy.routes import admin, openai, ops
from imageworks.chat_proxy.state import ProxyState
from imageworks.model_loader.profiles import PROFILES_FILE, ProfileManager
from imageworks.model_loader.registry import Registry
from imageworks.model_loader.watch import RegistryWatcher

log = logging.getLogger("imageworks.chat_proxy")

_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable, no spaces, bounded


def _error_response(exc: ProxyError) -> Response:
    return Response(
        exc.to_bytes(), status_code=exc.status, media_type="application/json", headers=exc.headers
    )


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _error_response(
            MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        )
    if exc.status_code == 404:
        return _error_response(NotFound(f"no route for {request.method} {request.url.path}"))
    error = ProxyError(str(exc.detail), status=exc.status_code)
    return _error_response(error)


class RequestIdMiddleware:
    """Gives every response an ``x-request-id`` (the client's if it sent a sane one) and turns
    any unexpected exception into an enveloped 500 instead of a plain-text one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        if not _CLIENT_ID.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            error = ProxyError(f"internal error: {type(exc).__name__}; request id {rid}")
            await _error_response(error)(scope, receive, send_with_id)


def create_app(config: ProxyConfig | None = None) -> Starlette:
    config = config or ProxyConfig.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = open_state(config)
        app.state.proxy = state
        try:
            yield
        finally:
            await close_state(state)

    app = Starlette(
        routes=[*openai.ROUTES, *ops.ROUTES, *admin.ROUTES],
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.add_middleware(RequestIdMiddleware)
    app.state.config = config
    return app


def open_state(config: ProxyConfig) -> ProxyState:
    watcher = RegistryWatcher(config.registry_dir).start()
    profiles = ProfileManager(config.registry_dir / PROFILES_FILE, config.staging_dir)
    request_log = RequestLog(
        config.log_path,
        max_bytes=config.max_log_bytes,
        backups=config.log_backups,
        recent=config.recent_requests,
    ).start()
    metrics = Metrics()
    # No connection limit: every open stream holds a connection, and aiohttp's default of 100
    # would silently queue stream 101. No total timeout: generations can take minutes.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
        ),
        auto_decompress=False,  # relay bytes as the backend sent them
        skip_auto_headers=("User-Agent",),
    )
    backends = build_backends(config)
    for backend in backends.values():
        backend.attach(session)
    lifecycle = Lifecycle(
        backends,
        staging_dir=config.staging_dir,
        start_timeout=config.start_timeout_s,
        queue_timeout=config.queue_timeout_s,
        request_log=request_log,
    )
    state = ProxyState(
        config=config,
        watcher=watcher,
        profiles=profiles,
        session=session,
        log=request_log,
        metrics=metrics,
        lifecycle=lifecycle,
        backends=backends,
        autostart=config.autostart_enabled,
    )

    def on_reload(registry: Registry) -> None:
        metrics.registry_reloads.labels("ok").inc()
        request_log.event(
            "registry_reload", "registry", version=registry.version, entries=len(registry)
        )

    watcher.subscribe(on_reload)
    request_log.event(
        "startup",
        "proxy",
        host=config.host,
        port=config.port,
        registry_version=watcher.current.version,
        profile=profiles.active.name,
    )
    return state


async def close_state(state: ProxyState) -> None:
    state.watcher.stop()
    try:
        await state.lifecycle.shutdown()  # no model process outlives the proxy
    except Exception:
        log.exception("stopping models at shutdown failed")
    await state.session.close()
    state.log.event("shutdown", "proxy")
    state.log.close()


class _DeferredApp:
    """Builds ``create_app()`` from the environment on first use."""

    def __init__(self) -> None:
        self._app: Starlette | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            self._app = create_app()
        await self._app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        if self._app is None:
            self._app = create_app()
        return getattr(self._app, name)


app = _DeferredApp()
