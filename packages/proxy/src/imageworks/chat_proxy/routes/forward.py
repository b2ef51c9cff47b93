"""Forwarding one request of any surface (``request/surfaces.py``), as a pipeline of steps.

    read within limits -> lift big strings -> parse -> validate -> resolve and route
    -> check capabilities -> prepare images -> prepare the payload -> admit
    -> open the upstream -> relay -> record

Each step is a function (or a method of ``Call``, which carries what the steps learn) that can
be tested and profiled alone. The forwarded surfaces are plain ASGI, reached from ``ProxyApp``
without Starlette's routing, middleware stack or Request object: this is the hot path, and on
a shared core every layer of code it runs shows in the added latency (docs/performance.md).
Every failure becomes an error in the surface's envelope (OpenAI's or Anthropic's).
"""

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
from starlette.types import Receive, Scope, Send

from imageworks.chat_proxy.auth import require_admin, require_api_key
from imageworks.chat_proxy.engines.modelstate import READY, SLEEPING, STARTING, WAKING
from imageworks.chat_proxy.engines.turns import Ticket
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    CapabilityMismatch,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    ProxyError,
    ShuttingDown,
)
from imageworks.chat_proxy.observe.progress import Progress, comment, progress
from imageworks.chat_proxy.observe.records import Outcome, RequestInfo
from imageworks.chat_proxy.request import multipart
from imageworks.chat_proxy.request.admission import Gate
from imageworks.chat_proxy.request.bodies import read_limited
from imageworks.chat_proxy.request.payloads import (
    CHAT,
    check_capabilities,
    check_engine_fields,
    check_template,
    parse_body,
    prepare,
)
from imageworks.chat_proxy.request.surfaces import RESPONSES_NAME, Surface, raw_access, speaks
from imageworks.chat_proxy.request.toolcalls import StreamConverter, convert_answer, declares_tools
from imageworks.chat_proxy.server.state import ProxyState
from imageworks.chat_proxy.upstream.forwarding import (
    ClientGone,
    SSEResponse,
    open_upstream,
    read_body,
    send_error,
    until_disconnect,
)
from imageworks.chat_proxy.upstream.peers import FORWARDED_HEADER
from imageworks.chat_proxy.upstream.responses import as_items
from imageworks.chat_proxy.vision.lifting import LiftedBody
from imageworks.chat_proxy.vision.prepare import ImageStats, VisionPolicy
from imageworks.model_loader.errors import UnknownModelError
from imageworks.model_loader.schema import ModelEntry

JSON = "application/json"
# Bodies beyond this (images, mostly) are cut, parsed and re-encoded in the vision pool, their
# big data: URLs lifted out first (lifting.py): parsing 8 MB of JSON holds the GIL, and so the
# event loop, for tens of milliseconds.
BIG_BODY = 1024 * 1024


# --- resolve and route -----------------------------------------------------------------------


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


def loading_comment(state: ProxyState, entry: ModelEntry, asked: float) -> bytes:
    """``: loading <model> (4.2 s of about 11 s)``: time since its start began (since the
    request began waiting, while it waits for its turn), of its learned load time."""
    return comment(entry.name, loading_progress(state, entry, asked))


def loading_progress(state: ProxyState, entry: ModelEntry, asked: float | None = None) -> Progress:
    status = state.lifecycle.status(entry)
    if status.state == WAKING:  # a wake, of about its learned wake time
        return progress(status.since, status.wake_ms, kind="wake")
    starting = status.state == STARTING
    since = status.since if starting or asked is None else asked
    return progress(since, status.load_ms)


# --- the steps that need no request context --------------------------------------------------


async def lift(state: ProxyState, raw: bytes) -> LiftedBody | None:
    """Lift big strings (data: URLs) out of a big body, in the vision pool."""
    state.pool.has_room()
    return await state.pool.run(LiftedBody.lift, raw)


async def parse(state: ProxyState, raw: bytes, lifted: LiftedBody | None) -> dict[str, Any]:
    return parse_body(raw) if lifted is None else await state.pool.run(parse_body, lifted.skeleton)


def check_surface(surface: Surface, entry: ModelEntry) -> None:
    """The backend speaks the surface, and the model has the capability it needs."""
    if surface.speaks not in speaks(entry):
        raise CapabilityMismatch(
            f"model {entry.name!r} ({entry.backend}) does not serve {surface.paths[0]}; "
            "an external server that does can say so in its entry's 'protocols'",
            param="model",
        )
    need = surface.capability
    if need is not None and need != "embedding" and not getattr(entry.capabilities, need, False):
        raise CapabilityMismatch(
            f"model {entry.name!r} has no {need} capability (capabilities.{need} in its entry)",
            param="model",
        )


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


# --- one request -----------------------------------------------------------------------------


class Call:
    """One forwarded request: what the steps learn about it, and the steps that need it."""

    def __init__(self, state: ProxyState, surface: Surface, scope: Scope) -> None:
        self.state = state
        self.surface = surface
        self.scope = scope
        self.headers = headers = Headers(scope=scope)
        client = scope.get("client")
        self.info = RequestInfo(
            scope["state"]["request_id"], surface.name, client[0] if client else None
        )
        self.info.lease_token = headers.get("x-gpu-lease-token")
        self.outcome = Outcome()
        self.payload = b""
        self.path = surface.upstream  # under the engine's OpenAI base
        self.method = "POST"
        self.content_type = JSON
        self.gate: Gate | None = None
        self.loading = False
        self.at_root = False  # the path is under the engine's root, not its /v1
        self.asked: list[Any] | None = None  # Responses kept by the proxy: the whole input

    @property
    def entry(self) -> ModelEntry:
        assert self.info.entry is not None
        return self.info.entry

    async def prepare(self, receive: Receive) -> None:
        """Every step up to the upstream: read, lift, parse, validate, route, check, images,
        payload, admit."""
        state = self.state
        require_api_key(self.headers, state.config.api_keys)
        raw = await read_limited(
            receive,
            self.headers.get("content-length"),
            state.config.max_body_bytes,
            idle_timeout=state.config.body_timeout_s,
        )
        self.info.prompt_bytes = len(raw)
        if self.surface.body == "json":
            await self.prepare_json(raw)
        else:
            self.prepare_other(raw)
        if self.plan_admission():
            assert self.gate is not None
            await admit(state, self.info, self.gate, receive)

    def prepare_other(self, raw: bytes) -> None:
        """A body that is not JSON: a multipart upload (audio)."""
        self.prepare_form(raw)

    async def prepare_json(self, raw: bytes) -> None:
        state, info, surface = self.state, self.info, self.surface
        lifted = await lift(state, raw) if len(raw) > BIG_BODY else None
        if lifted is None:
            body = parse_body(raw)
            info.model = surface.validate(body)
        else:  # a big body is also walked off the loop (900,000 messages: 0.5 s of CPU)
            body = await parse(state, raw, lifted)
            info.model = await state.images.run(surface.validate, body)
        info.stream = surface.stream is not None and body.get("stream") is True
        changed = self.chain(body) if surface.name == RESPONSES_NAME else False
        info.entry = entry = route(state, info.model, FORWARDED_HEADER in self.headers)
        images = self.check(body) if lifted is None else await state.images.run(self.check, body)
        if images:
            changed = await self.prepare_images(body, lifted) or changed
        if images or lifted is not None:
            dump = lifted.dump if lifted is not None else None
            self.payload = await state.pool.run(
                prepare, surface.name, entry, body, raw, changed, dump
            )
        else:  # the fast path: the body as it came, unless the served id or defaults differ
            self.payload = prepare(surface.name, entry, body, raw, changed)
        info.prompt_bytes = len(self.payload)  # what the model reads (photographs resized)

    def prepare_form(self, raw: bytes) -> None:
        """A multipart upload: the model from its form, the served id put in its place."""
        content_type = self.headers.get("content-type")
        name, start, end = multipart.model_field(content_type, raw)
        self.info.model = name
        self.info.entry = entry = route(self.state, name, FORWARDED_HEADER in self.headers)
        check_surface(self.surface, entry)
        self.payload = (
            raw
            if entry.upstream_id == name
            else multipart.with_model(raw, start, end, entry.upstream_id)
        )
        assert content_type is not None
        self.content_type = content_type

    def check(self, body: dict[str, Any]) -> int:
        """Check capabilities, engine-control fields and the template; the number of images."""
        state, entry, surface = self.state, self.entry, self.surface
        check_surface(surface, entry)
        images = check_capabilities(surface.name, entry, body) if surface.model_checks else 0
        self.info.tools = surface.name == CHAT and declares_tools(body)
        check_engine_fields(entry, body)
        backend = state.lifecycle.backend(entry)
        check_template(
            entry, state.config.require_template, surface.name == CHAT and backend.requires_template
        )
        if body.get("background") and not entry.responses_stored:
            raise InvalidRequest(
                f"model {entry.name!r}'s engine keeps no responses, so it cannot run one in the "
                "background (responses_stored in its entry)",
                param="background",
            )
        return images

    async def prepare_images(self, body: dict[str, Any], lifted: LiftedBody | None) -> bool:
        state, entry = self.state, self.entry
        backend = state.lifecycle.backend(entry)
        policy = VisionPolicy.of(
            entry, state.config, backend.image_formats, backend.takes_image_urls
        )
        self.info.images = ImageStats()
        return await state.images.prepare(
            entry, body, policy, state.egress.session, self.info.images, lifted
        )

    def chain(self, body: dict[str, Any]) -> bool:
        """Responses: a ``previous_response_id`` reaches the entry that made it; for an engine
        that keeps no responses, the proxy puts the conversation in the input instead."""
        book = self.state.responses
        previous = body.get("previous_response_id")
        if previous is None:
            self.asked = as_items(body.get("input"))
            return False
        maker = book.where(previous)
        if maker is None:
            raise NotFound(
                f"response {previous!r} is not known to this proxy", param="previous_response_id"
            )
        made_by = resolve(self.state, maker)
        if made_by.responses_stored:
            self.info.model = maker
            return False
        conversation = book.conversation(previous)
        if conversation is None:
            raise NotFound(
                f"response {previous!r} is no longer held by the proxy (it keeps the "
                "conversations of engines without a response store in memory, bounded)",
                param="previous_response_id",
            )
        self.asked = [*conversation, *as_items(body.get("input"))]
        body["input"] = self.asked
        del body["previous_response_id"]
        return True

    def plan_admission(self) -> bool:
        """Refuse a start that will be refused; True: wait for a turn now (not when the model
        loads first: waiting for it is the lifecycle's queue, with loading comments, and the
        concurrency limit applies once it runs)."""
        state, entry = self.state, self.entry
        self.loading = loading = state.lifecycle.needs_start(entry)
        if loading and state.autostart and state.lifecycle.state(entry) not in (STARTING, WAKING):
            # A start that will be refused (backoff, crash loop, restart: never) is refused
            # now, with its real status, before a stream commits to 200.
            state.lifecycle.may_start(entry)
        self.gate = gate = state.admission.gate(entry)
        return gate is not None and not loading

    async def connect(self, exchange: Exchange) -> aiohttp.ClientResponse:
        """Open the upstream: acquire the model (starting it if need be), then send."""
        state, entry = self.state, self.entry
        base_url = await exchange.acquire(entry)
        if self.gate is not None and self.loading:
            await admit(state, self.info, self.gate, None)  # the relay watches for a disconnect
            exchange.gate = self.gate
        target = state.egress.target(entry, base_url)
        return await open_upstream(
            state.egress,
            target,
            self.path,
            self.payload,
            self.info.request_id,
            method=self.method,
            content_type=self.content_type,
            at_root=self.at_root,
        )

    def remember(self, outcome: Outcome, answer: bytes | None) -> None:
        """Record where a new response lives (and, for an engine without a store, keep it)."""
        if (
            self.surface.name != RESPONSES_NAME
            or outcome.error is not None
            or self.method != "POST"
        ):
            return
        response = outcome.answer
        if response is None and answer is not None:
            with contextlib.suppress(ValueError):
                parsed = json.loads(answer)
                response = parsed if isinstance(parsed, dict) else None
        if response is None or not isinstance(response.get("id"), str):
            return
        book = self.state.responses
        book.place(response["id"], self.entry.name)
        if not self.entry.responses_stored and self.asked is not None:
            book.keep(response, self.asked)


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
        """Record: release the model and the turn, write the JSONL record and the metrics."""
        if self.ticket is not None:
            refused = isinstance(outcome.error, BackendUnavailable) and outcome.error.unreached
            self.ticket.release(reached=None if outcome.client_gone else not refused)
        if self.gate is not None:
            self.gate.release()
        self.state.metrics.in_flight.dec()
        self.state.records.request(self.info, outcome)


# --- relay -----------------------------------------------------------------------------------


async def forward(
    state: ProxyState, surface: Surface, scope: Scope, receive: Receive, send: Send
) -> None:
    """Check, resolve and forward one request of ``surface``."""
    await run(Call(state, surface, scope), scope, receive, send)


async def run(call: Call, scope: Scope, receive: Receive, send: Send) -> None:
    """Prepare ``call`` (every step up to the upstream), then relay its answer."""
    state, info, outcome = call.state, call.info, call.outcome
    try:
        await call.prepare(receive)
    except ProxyError as exc:
        outcome.error = exc
        state.records.request(info, outcome)
        await send_error(exc, send, call.surface.envelope)
        return
    except ClientGone:
        outcome.client_gone = True
        state.records.request(info, outcome)
        return
    exchange = Exchange(
        state, info, call.gate if call.gate is not None and not call.loading else None
    )
    if info.stream:
        await relay_stream(call, exchange, scope, receive, send)
    else:
        await relay_answer(call, exchange, receive, send)


async def relay_stream(
    call: Call, exchange: Exchange, scope: Scope, receive: Receive, send: Send
) -> None:
    state, entry, surface = call.state, call.entry, call.surface
    # The loading comment commits the response to 200: only when the model will load. With
    # autostart off a stopped model is refused before the first byte, as a real 502.
    comments = call.loading and (
        state.autostart or state.lifecycle.state(entry) in (STARTING, WAKING, SLEEPING)
    )
    assert surface.stream is not None
    waiting: Callable[[], bytes] | None = (
        functools.partial(loading_comment, state, entry, time.time()) if comments else None
    )

    def finish(outcome: Outcome) -> None:
        call.remember(outcome, None)
        exchange.finish(outcome)

    relay = SSEResponse(
        call.outcome,
        finish if surface.name == RESPONSES_NAME else exchange.finish,
        connect=lambda: call.connect(exchange),
        waiting_comment=waiting,
        keepalive_s=state.config.keepalive_s,
        converter=StreamConverter() if call.info.tools else None,
        stream_format=surface.stream,
        envelope=surface.envelope,
        model=entry.name,
        answer_limit=state.config.max_answer_bytes,
    )
    await relay(scope, receive, send)


async def relay_answer(call: Call, exchange: Exchange, receive: Receive, send: Send) -> None:
    """A whole answer: relayed with its content type (JSON, audio, ...) once it is complete."""
    outcome = call.outcome

    async def answer() -> tuple[str, bytes]:
        upstream = await call.connect(exchange)
        answer = await read_body(
            upstream, outcome, call.entry.name, call.state.config.max_answer_bytes
        )
        if call.info.tools:  # a legacy function_call becomes tool_calls
            answer = convert_answer(answer)
        return upstream.headers.get("content-type", JSON), answer

    envelope = call.surface.envelope
    try:
        content_type, raw = await until_disconnect(receive, answer())  # one watch for both
    except asyncio.CancelledError:  # the server is shutting down: an answer, and a record
        outcome.error = ShuttingDown("the proxy shut down before the answer came")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await send_error(outcome.error, send, envelope)
        exchange.finish(outcome)
        raise
    except ClientGone:
        outcome.client_gone = True
        exchange.finish(outcome)
        return
    except ProxyError as exc:
        outcome.error = exc
        try:
            await send_error(exc, send, envelope)
        finally:
            exchange.finish(outcome)
        return
    try:
        await send_whole(send, outcome.status, content_type, raw)
    finally:  # the answer is on its way: the log and the metrics can wait for it
        call.remember(outcome, raw)
        exchange.finish(outcome)


async def send_whole(send: Send, status: int, content_type: str, raw: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode("latin-1")),
                (b"content-length", str(len(raw)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw, "more_body": False})


# --- the raw engine routes and the Responses by id -------------------------------------------


class RawCall(Call):
    """``/upstream/{model}/{path}``: an allow-listed engine route, the body as it came."""

    def prepare_other(self, raw: bytes) -> None:
        scope = self.scope
        name, _, rest = scope["path"].removeprefix("/upstream/").partition("/")
        self.method = scope["method"]
        path = "/" + rest
        if not name or self.method not in ("GET", "POST"):
            raise NotFound(f"no route for {self.method} {scope['path']}")
        self.info.model = name
        self.info.entry = entry = route(self.state, name, FORWARDED_HEADER in self.headers)
        access = raw_access(entry, self.method, path)
        if access == "never":
            raise NotFound(
                f"{self.method} {path} is not an engine route the proxy forwards for "
                f"{entry.backend} models (docs/api.md lists them)"
            )
        if access == "admin":
            config = self.state.config
            require_admin(
                self.headers, config.admin_token, peer=self.info.client, api_keys=config.api_keys
            )
        query = scope.get("query_string", b"")
        if entry.metadata.get("peer"):  # another ImageWorks proxy: its own raw route
            path = f"/upstream/{entry.upstream_id}{path}"
        self.path = path + ("?" + query.decode("latin-1") if query else "")
        self.at_root = True
        self.payload = raw
        self.content_type = self.headers.get("content-type", JSON)


def response_path(path: str) -> tuple[str, str]:
    """``/v1/responses/{id}[/cancel|/input_items]`` as (id, action)."""
    rest = path.split("/responses/", 1)[1]
    rid, _, action = rest.partition("/")
    if not rid or action not in ("", "cancel", "input_items"):
        raise NotFound(f"no route for {path}")
    return rid, action


class ByIdCall(Call):
    """``GET/DELETE /v1/responses/{id}``, ``.../cancel``, ``.../input_items``: to the engine
    that made the response (one that keeps responses); the proxy answers for the others."""

    def prepare_other(self, raw: bytes) -> None:
        scope = self.scope
        rid, action = response_path(scope["path"])
        self.method = method = scope["method"]
        allowed = {"": ("GET", "DELETE"), "cancel": ("POST",), "input_items": ("GET",)}[action]
        if method not in allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {scope['path']}")
        maker = self.state.responses.where(rid)
        if maker is None:
            raise NotFound(f"response {rid!r} is not known to this proxy")
        self.info.model = maker
        self.info.entry = resolve(self.state, maker)
        query = scope.get("query_string", b"")
        self.path = f"/responses/{rid}" + (f"/{action}" if action else "")
        self.path += "?" + query.decode("latin-1") if query else ""
        self.payload = raw


async def by_id(
    state: ProxyState, surface: Surface, scope: Scope, receive: Receive, send: Send
) -> None:
    call = ByIdCall(state, surface, scope)
    try:
        require_api_key(call.headers, state.config.api_keys)
        rid, action = response_path(scope["path"])
        maker = state.responses.where(rid)
        entry = resolve(state, maker) if maker is not None else None
    except ProxyError as exc:
        call.outcome.error = exc
        state.records.request(call.info, call.outcome)
        await send_error(exc, send)
        return
    if entry is not None and not entry.responses_stored:
        await answer_kept(call, entry, rid, action, send)
        return
    await run(call, scope, receive, send)


async def answer_kept(call: Call, entry: ModelEntry, rid: str, action: str, send: Send) -> None:
    """A request by id for a response the proxy keeps (its engine keeps none)."""
    state, outcome, method = call.state, call.outcome, call.scope["method"]
    call.info.model, call.info.entry = entry.name, entry
    book = state.responses
    kept = book.kept.get(rid)
    try:
        if kept is None:
            raise NotFound(f"response {rid!r} is no longer held by the proxy")
        if action == "cancel":
            raise InvalidRequest("only a response created with background: true can be cancelled")
        if action == "input_items" and method == "GET":
            items = [
                {"id": f"item_{i}", **i_} if isinstance(i_, dict) else i_
                for i, i_ in enumerate(kept.input)
            ]
            body: dict[str, Any] = {"object": "list", "data": items, "has_more": False}
        elif action == "" and method == "GET":
            body = kept.response
        elif action == "" and method == "DELETE":
            book.forget(rid)
            body = {"id": rid, "object": "response", "deleted": True}
        else:
            raise MethodNotAllowed(f"{method} is not allowed on {call.scope['path']}")
    except ProxyError as exc:
        outcome.error = exc
        state.records.request(call.info, outcome)
        await send_error(exc, send)
        return
    outcome.status = 200
    outcome.finished_at = time.perf_counter()
    await send_whole(send, 200, JSON, json.dumps(body).encode())
    state.records.request(call.info, outcome)
