"""The OpenAI-compatible surface: models, chat completions, completions, embeddings."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from imageworks.chat_proxy.auth import require_api_key
from imageworks.chat_proxy.engines.lifecycle import Ticket
from imageworks.chat_proxy.engines.modelstate import READY, STARTING
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ModelNotFound,
    ProxyError,
    ShuttingDown,
)
from imageworks.chat_proxy.observe.progress import Progress, comment, progress
from imageworks.chat_proxy.request.admission import Gate
from imageworks.chat_proxy.request.bodies import read_limited
from imageworks.chat_proxy.request.payloads import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    PATHS,
    check_capabilities,
    check_engine_fields,
    check_template,
    parse_body,
    prepare,
    validate,
)
from imageworks.chat_proxy.request.toolcalls import StreamConverter, convert_answer, declares_tools
from imageworks.chat_proxy.server.state import ProxyState, RequestInfo
from imageworks.chat_proxy.upstream.forwarding import (
    ClientGone,
    Outcome,
    SSEResponse,
    open_upstream,
    read_body,
    send_error,
    until_disconnect,
)
from imageworks.chat_proxy.upstream.peers import FORWARDED_HEADER, Listed
from imageworks.chat_proxy.vision.lifting import LiftedBody
from imageworks.chat_proxy.vision.prepare import ImageStats, VisionPolicy
from imageworks.model_loader.errors import UnknownModelError
from imageworks.model_loader.schema import ModelEntry

JSON = "application/json"
# Bodies beyond this (images, mostly) are cut, parsed and re-encoded in the vision pool, their
# big data: URLs lifted out first (lifting.py): parsing 8 MB of JSON holds the GIL, and so the
# event loop, for tens of milliseconds.
BIG_BODY = 1024 * 1024


def proxy_state(request: Request) -> ProxyState:
    state: ProxyState = request.app.state.proxy
    return state


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


def peer_object(state: ProxyState, listed: Listed) -> dict[str, Any]:
    return {
        "id": listed.id,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "imageworks",
        "imageworks": {**listed.model.info, "peer": listed.model.peer, "boxes": listed.boxes},
    }


def models_data(state: ProxyState, local_only: bool) -> list[dict[str, Any]]:
    data = [model_object(state, e) for e in state.registry if state.visible(e)]
    if state.peers and not local_only:
        local = {item["id"] for item in data}
        data += [peer_object(state, listed) for listed in state.peers.listed(local)]
    return data


def models_body(state: ProxyState, local_only: bool = False) -> bytes:
    """The /v1/models body, cached until the registry, the profile, a model state or what the
    peers serve changes. ``local_only``: for a peer asking (it never lists our peers)."""
    key = (state.registry.version, state.profile.name, state.lifecycle.version, state.peers.version)
    cached = state._models_cache
    if not local_only and cached is not None and cached[0] == key:
        return cached[1]
    body = json.dumps({"object": "list", "data": models_data(state, local_only)}).encode()
    if not local_only:
        state._models_cache = (key, body)
    return body


async def list_models(request: Request) -> Response:
    state = proxy_state(request)
    require_api_key(request.headers, state.config.api_keys)
    local_only = FORWARDED_HEADER in request.headers
    return Response(models_body(state, local_only), media_type=JSON)


async def get_model(request: Request) -> Response:
    state = proxy_state(request)
    require_api_key(request.headers, state.config.api_keys)
    name = request.path_params["model_id"]
    if state.peers and FORWARDED_HEADER not in request.headers:
        for item in models_data(state, local_only=False):
            if item["id"] == name:
                return Response(json.dumps(item).encode(), media_type=JSON)
    entry = resolve(state, name)
    return Response(json.dumps(model_object(state, entry)).encode(), media_type=JSON)


def route(state: ProxyState, name: str, forwarded: bool) -> ModelEntry:
    """The entry a request for ``name`` goes to: this box's, or a peer's (never for a request a
    peer forwarded: one hop at most)."""
    if forwarded or not state.peers:
        return resolve(state, name)
    try:
        local: ModelEntry | None = resolve(state, name)
    except ModelNotFound as exc:
        local, missing = None, exc
    warm = local is not None and state.lifecycle.state(local) == READY
    elsewhere = state.peers.route(name, local, warm)
    if elsewhere is not None:
        return elsewhere
    if local is None:
        raise missing
    return local


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
# The forwarded endpoints are plain ASGI, reached from ``ProxyApp`` without Starlette's routing,
# middleware stack or Request object: this is the hot path, and on a shared core every layer
# of code it runs shows in the added latency (docs/performance.md).

FORWARDED = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
}


class Exchange:
    """One forwarded request: its hold on the model, and the bookkeeping when it ends."""

    def __init__(self, state: ProxyState, info: RequestInfo, gate: Gate | None) -> None:
        self.state = state
        self.info = info
        self.gate = gate  # entered: a turn under the model's max_concurrency
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
            refused = isinstance(outcome.error, BackendUnavailable) and outcome.error.unreached
            self.ticket.release(reached=None if outcome.client_gone else not refused)
        if self.gate is not None:
            self.gate.release()
        self.state.metrics.in_flight.dec()
        self.state.record(self.info, outcome)


async def admit(state: ProxyState, info: RequestInfo, gate: Gate, receive: Receive | None) -> None:
    """A turn under the model's ``max_concurrency``, waiting in its queue if need be.
    ``receive``: watch it for a disconnect (None: a caller up the stack already does)."""
    if gate.try_enter():
        return
    info.queue_depth = len(gate.waiters) + 1
    waited = time.perf_counter()
    wait = gate.wait(state.config.queue_timeout_s)
    await (until_disconnect(receive, wait) if receive is not None else wait)
    info.admission_ms = round((time.perf_counter() - waited) * 1000, 2)


async def forward(
    state: ProxyState, endpoint: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """Check, resolve and forward one request; every failure becomes an OpenAI error."""
    headers = Headers(scope=scope)
    client = scope.get("client")
    info = RequestInfo(scope["state"]["request_id"], endpoint, client[0] if client else None)
    info.lease_token = headers.get("x-gpu-lease-token")
    outcome = Outcome()
    try:
        require_api_key(headers, state.config.api_keys)
        raw = await read_limited(
            receive,
            headers.get("content-length"),
            state.config.max_body_bytes,
            idle_timeout=state.config.body_timeout_s,
        )
        lifted = None
        if len(raw) > BIG_BODY:
            state.images.has_room()
            lifted = await state.images.run(LiftedBody.lift, raw)
        body = (
            parse_body(raw)
            if lifted is None
            else await state.images.run(parse_body, lifted.skeleton)
        )
        info.model = validate(endpoint, body)
        info.stream = body.get("stream") is True
        info.prompt_bytes = len(raw)
        info.entry = entry = route(state, info.model, FORWARDED_HEADER in headers)
        images = check_capabilities(endpoint, entry, body)
        info.tools = endpoint == CHAT and declares_tools(body)
        check_engine_fields(entry, body)
        backend = state.lifecycle.backend(entry)
        check_template(
            entry, state.config.require_template, endpoint == CHAT and backend.requires_template
        )
        changed = False
        if images:
            policy = VisionPolicy.of(
                entry, state.config, backend.image_formats, backend.takes_image_urls
            )
            info.images = ImageStats()
            changed = await state.images.prepare(
                entry, body, policy, state.session, info.images, lifted
            )
        if images or lifted is not None:
            dump = lifted.dump if lifted is not None else None
            payload = await state.images.run(prepare, endpoint, entry, body, raw, changed, dump)
        else:  # the fast path: the body as it came, unless the served id or defaults differ
            payload = prepare(endpoint, entry, body, raw)
        info.prompt_bytes = len(payload)  # what the model reads (photographs resized)
        loading = state.lifecycle.needs_start(entry)
        if loading and state.autostart and state.lifecycle.state(entry) != STARTING:
            # A start that will be refused (backoff, crash loop, restart: never) is refused
            # now, with its real status, before a stream commits to 200.
            state.lifecycle.may_start(entry)
        gate = state.admission.gate(entry)
        # Waiting for a model to load is the lifecycle's queue (one start, loading comments,
        # a start failure for everyone at once); the concurrency limit applies once it runs.
        if gate is not None and not loading:
            await admit(state, info, gate, receive)
    except ProxyError as exc:
        outcome.error = exc
        state.record(info, outcome)
        await send_error(exc, send)
        return
    except ClientGone:
        outcome.client_gone = True
        state.record(info, outcome)
        return
    exchange = Exchange(state, info, gate if gate is not None and not loading else None)

    async def connect() -> aiohttp.ClientResponse:
        base_url = await exchange.acquire(entry)
        if gate is not None and loading:
            await admit(state, info, gate, None)  # the relay watches for a disconnect
            exchange.gate = gate
        target = state.egress.target(entry, base_url)
        return await open_upstream(state.egress, target, PATHS[endpoint], payload, info.request_id)

    if info.stream:
        # The loading comment commits the response to 200: only when the model will load. With
        # autostart off a stopped model is refused before the first byte, as a real 502.
        comments = loading and (state.autostart or state.lifecycle.state(entry) == STARTING)
        waiting: Callable[[], bytes] | None = (
            functools.partial(loading_comment, state, entry, time.time()) if comments else None
        )
        relay = SSEResponse(
            outcome,
            exchange.finish,
            connect=connect,
            waiting_comment=waiting,
            keepalive_s=state.config.keepalive_s,
            converter=StreamConverter() if info.tools else None,
        )
        await relay(scope, receive, send)
        return

    async def answer() -> tuple[str, bytes]:
        upstream = await connect()
        answer = await read_body(upstream, outcome)
        if info.tools:  # a legacy function_call becomes tool_calls
            answer = convert_answer(answer)
        return upstream.headers.get("content-type", JSON), answer

    try:
        content_type, raw = await until_disconnect(receive, answer())  # one watch for both
    except asyncio.CancelledError:  # the server is shutting down: an answer, and a record
        outcome.error = ShuttingDown("the proxy shut down before the answer came")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await send_error(outcome.error, send)
        exchange.finish(outcome)
        raise
    except ClientGone:
        outcome.client_gone = True
        exchange.finish(outcome)
        return
    except ProxyError as exc:
        outcome.error = exc
        try:
            await send_error(exc, send)
        finally:
            exchange.finish(outcome)
        return
    try:
        await send(
            {
                "type": "http.response.start",
                "status": outcome.status,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(raw)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": raw, "more_body": False})
    finally:  # the answer is on its way: the log and the metrics can wait for it
        exchange.finish(outcome)


def loading_comment(state: ProxyState, entry: ModelEntry, asked: float) -> bytes:
    """``: loading <model> (4.2 s of about 11 s)``: time since its start began (since the
    request began waiting, while it waits for its turn), of its learned load time."""
    return comment(entry.name, loading_progress(state, entry, asked))


def loading_progress(state: ProxyState, entry: ModelEntry, asked: float | None = None) -> Progress:
    status = state.lifecycle.status(entry)
    starting = status.state == STARTING
    since = status.since if starting or asked is None else asked
    return progress(since, status.load_ms)


ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
]
