"""The OpenAI-compatible surface: models, chat completions, completions, embeddings."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from imageworks.chat_proxy.auth import require_api_key
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ModelNotFound,
    PayloadTooLarge,
    ProxyError,
)
from imageworks.chat_proxy.forwarding import (
    ClientGone,
    Outcome,
    SSEResponse,
    open_upstream,
    read_body,
    until_disconnect,
)
from imageworks.chat_proxy.lifecycle import Ticket
from imageworks.chat_proxy.payloads import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    PATHS,
    check_capabilities,
    check_template,
    parse_body,
    prepare,
    validate,
)
from imageworks.chat_proxy.state import ProxyState, RequestInfo
from imageworks.model_loader.errors import UnknownModelError
from imageworks.model_loader.schema import ModelEntry

JSON = "application/json"


def proxy_state(request: Request) -> ProxyState:
    state: ProxyState = request.app.state.proxy
    return state


def request_id(request: Request) -> str:
    rid: str = request.scope["state"]["request_id"]
    return rid


# --- models ----------------------------------------------------------------------------------


def model_object(state: ProxyState, entry: ModelEntry) -> dict[str, Any]:
    return {
        "id": entry.name,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "imageworks",
        "imageworks": {
            "logical_name": entry.name,
            "display_name": entry.label,
            "backend": entry.backend,
            "served_model_id": entry.upstream_id,
            "aliases": entry.model_aliases,
            "capabilities": entry.capabilities.model_dump(),
            "state": state.lifecycle.state(entry),
        },
    }


def models_body(state: ProxyState) -> bytes:
    """The /v1/models body, cached until the registry, the profile or a model state changes."""
    key = (state.registry.version, state.profile.name, state.lifecycle.version)
    cached = state._models_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    data = [model_object(state, e) for e in state.registry if state.visible(e)]
    body = json.dumps({"object": "list", "data": data}).encode()
    state._models_cache = (key, body)
    return body


async def list_models(request: Request) -> Response:
    state = proxy_state(request)
    require_api_key(request, state.config.api_keys)
    return Response(models_body(state), media_type=JSON)


async def get_model(request: Request) -> Response:
    state = proxy_state(request)
    require_api_key(request, state.config.api_keys)
    entry = resolve(state, request.path_params["model_id"])
    return Response(json.dumps(model_object(state, entry)).encode(), media_type=JSON)


def resolve(state: ProxyState, name: str) -> ModelEntry:
    try:
        entry = state.registry.resolve(name)
    except UnknownModelError as exc:
        hint = f"; did you mean {', '.join(map(repr, exc.suggestions))}?" if exc.suggestions else ""
        raise ModelNotFound(
            f"The model '{name}' does not exist{hint} (see GET /v1/models)", param="model"
        ) from None
    if not state.visible(entry):
        why = (
            f"is not offered in deployment profile '{state.profile.name}'"
            if entry.servable and not entry.deprecated
            else "is deprecated"
            if entry.deprecated
            else f"uses backend '{entry.backend}', which this proxy does not serve"
        )
        raise ModelNotFound(f"The model '{name}' {why} (see GET /v1/models)", param="model")
    return entry


# --- forwarding ------------------------------------------------------------------------------


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body is {declared} bytes; the limit is {limit} (CHAT_PROXY_MAX_BODY_BYTES)"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes (CHAT_PROXY_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


class _Gone(Response):
    """Nothing to send: the client already left."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


class Exchange:
    """One forwarded request: its hold on the model, and the bookkeeping when it ends."""

    def __init__(self, state: ProxyState, info: RequestInfo) -> None:
        self.state = state
        self.info = info
        self.ticket: Ticket | None = None
        state.metrics.in_flight.inc()

    async def acquire(self, entry: ModelEntry) -> str:
        self.ticket = await self.state.lifecycle.acquire(
            entry, autostart=self.state.autostart, lease_token=self.info.lease_token
        )
        self.info.wait_ms, self.info.loaded = self.ticket.wait_ms, self.ticket.loaded
        return self.ticket.base_url

    def finish(self, outcome: Outcome) -> None:
        if self.ticket is not None:
            refused = isinstance(outcome.error, BackendUnavailable) and outcome.status == 0
            self.ticket.release(reached=None if outcome.client_gone else not refused)
        self.state.metrics.in_flight.dec()
        self.state.record(self.info, outcome)


async def forward(request: Request, endpoint: str) -> Response:
    state = proxy_state(request)
    client = request.client.host if request.client else None
    info = RequestInfo(request_id(request), endpoint, client)
    info.lease_token = request.headers.get("x-gpu-lease-token")
    outcome = Outcome()
    try:
        require_api_key(request, state.config.api_keys)
        raw = await read_limited(request, state.config.max_body_bytes)
        body = parse_body(raw)
        info.model = validate(endpoint, body)
        info.stream = body.get("stream") is True
        info.prompt_bytes = len(raw)
        info.entry = entry = resolve(state, info.model)
        check_capabilities(endpoint, entry, body)
        check_template(
            entry,
            state.config.require_template,
            endpoint == CHAT and state.lifecycle.backend(entry).requires_template,
        )
        payload = prepare(endpoint, entry, body, raw)
    except ProxyError as exc:
        outcome.error = exc
        state.record(info, outcome)
        raise
    exchange = Exchange(state, info)
    headers = {"content-type": JSON, "x-request-id": info.request_id}

    async def connect() -> aiohttp.ClientResponse:
        base_url = await exchange.acquire(entry)
        return await open_upstream(state.session, base_url + PATHS[endpoint], payload, headers)

    if info.stream:
        waiting = (
            f": loading {entry.name}\n\n".encode() if state.lifecycle.needs_start(entry) else None
        )
        return SSEResponse(
            outcome,
            exchange.finish,
            connect=connect,
            waiting_comment=waiting,
            keepalive_s=state.config.keepalive_s,
        )
    try:
        upstream = await until_disconnect(request.receive, connect())
        content_type = upstream.headers.get("content-type", JSON)
        raw = await until_disconnect(request.receive, read_body(upstream, outcome))
    except ClientGone:
        outcome.client_gone = True
        exchange.finish(outcome)
        return _Gone()
    except ProxyError as exc:
        outcome.error = exc
        exchange.finish(outcome)
        raise
    exchange.finish(outcome)
    return Response(
        raw, status_code=outcome.status, media_type=None, headers={"content-type": content_type}
    )


async def chat_completions(request: Request) -> Response:
    return await forward(request, CHAT)


async def completions(request: Request) -> Response:
    return await forward(request, COMPLETIONS)


async def embeddings(request: Request) -> Response:
    return await forward(request, EMBEDDINGS)


ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
