"""The last steps of the pipeline (``forward.py``): relay the upstream's answer, streamed or
whole, and record it. ``forward`` is the entry of every forwarded surface; ``run`` takes a
prepared ``Call`` of any kind (the raw engine routes and the Responses by id too).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from imageworks.chat_proxy.engines.modelstate import SLEEPING, STARTING, WAKING
from imageworks.chat_proxy.errors import ProxyError, ShuttingDown, internal_error
from imageworks.chat_proxy.observe.records import Outcome
from imageworks.chat_proxy.request.surfaces import RESPONSES_NAME, Surface
from imageworks.chat_proxy.request.toolcalls import StreamConverter, convert_answer
from imageworks.chat_proxy.routes.forward import JSON, Call, Exchange
from imageworks.chat_proxy.routes.routing import loading_comment
from imageworks.chat_proxy.server.state import ProxyState
from imageworks.chat_proxy.upstream.forwarding import (
    ClientGone,
    read_body,
    send_error,
    until_disconnect,
)
from imageworks.chat_proxy.upstream.sse import SSEResponse


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
    except Exception as exc:  # a bug: the RequestIdMiddleware answers the 500, this records it
        outcome.error = internal_error(exc, info.request_id)
        state.records.request(info, outcome)
        raise
    exchange = Exchange(
        state, info, call.gate if call.gate is not None and not call.loading else None
    )
    try:
        if info.stream:
            await relay_stream(call, exchange, scope, receive, send)
        else:
            await relay_answer(call, exchange, receive, send)
    except Exception as exc:  # a bug: the model, its turn and the record are let go all the same
        if outcome.error is None:
            outcome.error = internal_error(exc, info.request_id)
        exchange.finish(outcome)  # once: a relay that finished it already is left as it was
        raise


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
