"""Operations endpoints that never touch a backend: liveness and Prometheus metrics."""

from __future__ import annotations

import json
import time

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imageworks.chat_proxy.auth import is_loopback, require_api_key
from imageworks.chat_proxy.routes.openai import JSON, proxy_state

VERSION = "0.1.0"


async def healthz(request: Request) -> Response:
    state = proxy_state(request)
    registry = state.registry
    body = {
        "status": "ok",
        "version": VERSION,
        "uptime_s": round(time.time() - state.started_at, 3),
        "registry_version": registry.version,
        "registry_error": state.watcher.last_error,
        "profile": state.profile.name,
        "models": sum(1 for e in registry if state.visible(e)),
        "in_flight": sum(state.lifecycle.in_flight.values()),
    }
    return Response(json.dumps(body).encode(), media_type=JSON)


async def metrics(request: Request) -> Response:
    """With API keys set, a client on another host needs one (or the admin token)."""
    state = proxy_state(request)
    peer = request.client.host if request.client else None
    if state.config.api_keys and not is_loopback(peer):
        accepted = (*state.config.api_keys, *filter(None, [state.config.admin_token]))
        require_api_key(request.headers, accepted)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/v1/healthz", healthz, methods=["GET"]),
    Route("/v1/health", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
