"""Forwarding one request of any surface (``request/surfaces.py``), as a pipeline of steps.

    read within limits -> lift big strings -> parse -> validate -> resolve and route
    -> check capabilities -> prepare images -> prepare the payload -> admit
    -> open the upstream -> relay -> record

Each step is a function (or a method of ``Call``, which carries what the steps learn) that can
be tested and profiled alone. The forwarded surfaces are plain ASGI, reached from ``ProxyApp``
without Starlette's routing, middleware stack or Request object: this is the hot path, and on
a shared core every layer of code it runs shows in the added latency (docs/performance.md).
Every failure becomes an error in the surface's envelope (OpenAI's or Anthropic's).

Here: the steps up to the upstream (``Call``) and the hold on the model (``Exchange``). Resolve
and route, and the loading progress, are ``routing.py``; the relay and the entry ``forward``
are ``relay.py``; the raw engine routes ``raw.py``; the Responses by id ``byid.py``.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import aiohttp
from starlette.types import Receive, Scope

from imageworks.chat_proxy.auth import NamedKey, identify
from imageworks.chat_proxy.engines.modelstate import STARTING, WAKING
from imageworks.chat_proxy.engines.turns import Ticket
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    CapabilityMismatch,
    InvalidRequest,
    NotFound,
)
from imageworks.chat_proxy.observe.records import Outcome, RequestInfo
from imageworks.chat_proxy.request import multipart
from imageworks.chat_proxy.request.admission import Turnstile
from imageworks.chat_proxy.request.bodies import read_limited
from imageworks.chat_proxy.request.payloads import (
    CHAT,
    check_capabilities,
    check_engine_fields,
    check_template,
    parse_body,
    prepare,
)
from imageworks.chat_proxy.request.surfaces import RESPONSES_NAME, Surface, speaks
from imageworks.chat_proxy.request.toolcalls import declares_tools
from imageworks.chat_proxy.routes.routing import resolve, route
from imageworks.chat_proxy.server.state import ProxyState
from imageworks.chat_proxy.upstream.forwarding import open_upstream, until_disconnect
from imageworks.chat_proxy.upstream.peers import FORWARDED_HEADER
from imageworks.chat_proxy.upstream.responses import as_items
from imageworks.chat_proxy.vision.lifting import LiftedBody
from imageworks.chat_proxy.vision.prepare import ImageStats, VisionPolicy
from imageworks.model_loader.schema import ModelEntry

JSON = "application/json"
# Bodies beyond this (images, mostly) are cut, parsed and re-encoded in the vision pool, their
# big data: URLs lifted out first (lifting.py): parsing 8 MB of JSON holds the GIL, and so the
# event loop, for tens of milliseconds.
BIG_BODY = 1024 * 1024

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


async def admit(
    state: ProxyState, info: RequestInfo, gate: Turnstile, receive: Receive | None
) -> None:
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


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by (lower-case) name, the first of each, as Starlette's
    ``Headers.get`` has them: one pass, where each ``Headers`` lookup walked the list (and one
    for a header not sent raised a KeyError inside)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}


class Call:
    """One forwarded request: what the steps learn about it, and the steps that need it."""

    def __init__(self, state: ProxyState, surface: Surface, scope: Scope) -> None:
        self.state = state
        self.surface = surface
        self.scope = scope
        self.headers = headers = _headers(scope)
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
        self.gate: Turnstile | None = None
        self.loading = False
        self.at_root = False  # the path is under the engine's root, not its /v1
        self.asked: list[Any] | None = None  # Responses kept by the proxy: the whole input
        self.key: NamedKey | None = None  # the API key the request came with, when keys are set

    @property
    def entry(self) -> ModelEntry:
        assert self.info.entry is not None
        return self.info.entry

    def identify(self) -> None:
        """The API key (401 without a good one, when keys are set); its name is logged."""
        self.key = identify(self.headers, self.state.config.named_keys)
        self.info.key_name = self.key.name if self.key is not None else None

    def to(self, entry: ModelEntry) -> ModelEntry:
        """The request goes to ``entry``, if its API key may use it (403 naming the key)."""
        if self.key is not None:
            self.key.require(entry)
        self.info.entry = entry
        return entry

    async def prepare(self, receive: Receive) -> None:
        """Every step up to the upstream: read, lift, parse, validate, route, check, images,
        payload, admit."""
        state = self.state
        self.identify()
        raw = await read_limited(
            receive, self.headers.get("content-length"), state.config.max_body_bytes
        )
        self.info.prompt_bytes = len(raw)
        if self.surface.body == "json":
            await self.prepare_json(raw, receive)
        else:
            self.prepare_other(raw)
        if self.plan_admission():
            assert self.gate is not None
            await admit(state, self.info, self.gate, receive)

    def prepare_other(self, raw: bytes) -> None:
        """A body that is not JSON: a multipart upload (audio)."""
        self.prepare_form(raw)

    async def prepare_json(self, raw: bytes, receive: Receive | None = None) -> None:
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
        entry = self.to(route(state, info.model, FORWARDED_HEADER in self.headers))
        images = self.check(body) if lifted is None else await state.images.run(self.check, body)
        if images:
            # Photographs take seconds: a client that leaves stops the work within one image.
            work = self.prepare_images(body, lifted)
            fitted = await (until_disconnect(receive, work) if receive is not None else work)
            changed = fitted or changed
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
        entry = self.to(route(self.state, name, FORWARDED_HEADER in self.headers))
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
        if not book.place(response["id"], self.entry.name):
            return
        if not self.entry.responses_stored and self.asked is not None:
            book.keep(response, self.asked)


class Exchange:
    """One forwarded request: its hold on the model, and the bookkeeping when it ends."""

    def __init__(self, state: ProxyState, info: RequestInfo, gate: Turnstile | None) -> None:
        self.state = state
        self.info = info
        self.gate = gate  # entered: a turn under the model's max_concurrency
        self.ticket: Ticket | None = None
        self.finished = False
        state.metrics.in_flight.inc()

    async def acquire(self, entry: ModelEntry) -> str:
        self.ticket = await self.state.lifecycle.acquire(
            entry, autostart=self.state.autostart, lease_token=self.info.lease_token
        )
        self.info.wait_ms, self.info.loaded = self.ticket.wait_ms, self.ticket.loaded
        return self.ticket.base_url

    def finish(self, outcome: Outcome) -> None:
        """Record: release the model and the turn, write the JSONL record and the metrics
        (once: a second call does nothing)."""
        if self.finished:
            return
        self.finished = True
        if self.ticket is not None:
            refused = isinstance(outcome.error, BackendUnavailable) and outcome.error.unreached
            self.ticket.release(reached=None if outcome.client_gone else not refused)
        if self.gate is not None:
            self.gate.release()
        self.state.metrics.in_flight.dec()
        self.state.records.request(self.info, outcome)
