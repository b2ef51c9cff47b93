"""Pass-through forwarding to a backend, streaming and not.

Bodies travel as bytes through aiohttp's client (the app's one ``ClientSession``, see
``egress``): the upstream response is relayed unchanged, one chunk per network read of the
backend's socket (``iter_any``: no re-chunking, no coalescing, no decompression). The only
inspection is what the request log needs: where the first byte came, how many events passed,
and the usage object near the end; and, for a request that declared ``tools``, the legacy
``function_call`` answers that ``toolcalls`` converts (events are then passed on whole).

A client that goes away cancels the upstream request, whether it was streaming or still
waiting for a non-streaming answer: both paths watch ``receive()`` for ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from starlette.types import Receive, Scope, Send

from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ProxyError,
    ShuttingDown,
    upstream_error,
)
from imageworks.chat_proxy.observe.records import Outcome
from imageworks.chat_proxy.request.bodies import ClientGone
from imageworks.chat_proxy.request.streams import DONE, OPENAI, StreamFormat
from imageworks.chat_proxy.request.toolcalls import StreamConverter, convert_answer
from imageworks.chat_proxy.upstream.egress import JSON, Egress, Target
from imageworks.chat_proxy.upstream.failures import FAILURES, STALE, StreamBroken, classify
from imageworks.chat_proxy.upstream.reading import TooLarge, read_capped

__all__ = ["ClientGone", "SSEResponse", "open_upstream", "read_body", "send_error"]

T = TypeVar("T")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_CHUNKED_ABOVE = 1024 * 1024
_TAIL_CHUNKS = 8  # the usage chunk and [DONE] are in the last few network reads
ERROR_BODY_LIMIT = 64 * 1024  # a backend's error answer: its message is in the first bytes
ANSWER_LIMIT = 64 * 1024 * 1024  # a non-stream answer (CHAT_PROXY_MAX_ANSWER_BYTES)


MAX_TOKENS_COUNTED = 10**9  # more than any context: a count beyond it is not believed


def sane_usage(usage: Any) -> dict[str, Any] | None:
    """A backend's usage object with its token counts as believable integers: a count that is
    not an integer from 0 to ``MAX_TOKENS_COUNTED`` (``1e308``, ``-5``, ``"many"``) is left out,
    so it reaches neither the log nor the metrics as it came."""
    if not isinstance(usage, dict):
        return None

    def believable(value: Any) -> bool:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        return is_int and 0 <= value <= MAX_TOKENS_COUNTED

    return {k: v for k, v in usage.items() if not k.endswith("_tokens") or believable(v)}


async def open_upstream(
    egress: Egress,
    target: Target,
    path: str,
    body: bytes,
    request_id: str,
    *,
    method: str = "POST",
    content_type: str = JSON,
    at_root: bool = False,
) -> aiohttp.ClientResponse:
    """Send (POST unless told) and wait for the response head (interim 1xx heads are skipped
    by aiohttp). A backend 4xx/5xx becomes our error here. ``path`` may carry a query;
    ``at_root``: it is under the engine's root rather than its OpenAI base."""
    url = target.root_url(path) if at_root else target.url(path)
    headers = target.headers(request_id)
    if content_type != JSON:
        headers["content-type"] = content_type
    for attempt in (1, 2):
        try:
            # A big body (photographs) goes out in chunks with a yield to the loop between
            # them; a new BytesIO per attempt (aiohttp closes it after sending). Small ones
            # go as they are: the hot path.
            data = io.BytesIO(body) if len(body) > _CHUNKED_ABOVE else body
            response = await egress.session.request(
                method, url, data=data if method != "GET" else None, headers=headers, ssl=target.ssl
            )
            break
        except STALE as exc:
            # A kept-alive connection the backend had already closed (llama.cpp's server drops
            # them after a few requests without saying so): nothing was answered, so the
            # request is sent once more, on a new connection. aiohttp never resends a POST.
            if attempt == 2 or isinstance(exc, aiohttp.ClientConnectorError):
                raise classify(exc, url, "before answering", target.model) from exc
        except FAILURES as exc:
            raise classify(exc, url, "before answering", target.model) from exc
    if response.status >= 400:
        try:
            raw = await read_capped(response, ERROR_BODY_LIMIT)
        except (*FAILURES, TooLarge):  # a 300 MB "error page": its status is enough
            raw = b""
        finally:
            response.close()
        raise upstream_error(response.status, raw, response.headers.get("retry-after"))
    return response


def as_one_chunk(body: bytes) -> bytes | None:
    """A whole answer (JSON) as the one chunk of a stream: each choice's ``message`` becomes its
    ``delta``; an error object stays as it is (an in-band error event). None: not JSON."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if isinstance(choice, dict) and "message" in choice and "delta" not in choice:
            choice["delta"] = choice.pop("message")
    if data.get("object") == "chat.completion":
        data["object"] = "chat.completion.chunk"
    return json.dumps(data).encode()


async def read_body(
    response: aiohttp.ClientResponse,
    outcome: Outcome,
    model: str | None = None,
    limit: int = ANSWER_LIMIT,
) -> bytes:
    """The whole body, at most ``limit`` bytes (``CHAT_PROXY_MAX_ANSWER_BYTES``: a clear 502
    past it); the connection goes back to the pool (it is closed instead if the body was not
    read to its end)."""
    try:
        raw = await read_capped(response, limit)
    except TooLarge:
        response.close()
        who = f"the backend of model {model!r}" if model else "the backend"
        raise BackendUnavailable(
            f"{who} answered more than {limit} bytes (CHAT_PROXY_MAX_ANSWER_BYTES)"
        ) from None
    except FAILURES as exc:
        response.close()
        raise classify(exc, response.url, "while answering", model) from exc
    except BaseException:
        response.close()
        raise
    response.release()
    outcome.first_byte_at = outcome.finished_at = time.perf_counter()
    outcome.status = response.status
    if b'"usage"' in raw:
        try:
            usage = json.loads(raw).get("usage")
        except (ValueError, AttributeError):
            usage = None
        outcome.usage = sane_usage(usage)
    return raw


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Run ``work`` in this task; if the client disconnects first, cancel it and raise
    ``ClientGone``. One watcher task per request: this is on the hot path."""
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _wait_for_disconnect(receive)
        gone = True
        current.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and current.uncancel() == 0:
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def send_error(error: ProxyError, send: Send, envelope: str = "openai") -> None:
    """The error as a JSON response in the route's envelope (``openai``, ``anthropic``),
    before anything else was sent."""
    if envelope == "anthropic":
        body, status = error.anthropic_bytes(), error.anthropic_status()
    else:
        body, status = error.to_bytes(), error.status
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class SSEResponse:
    """Relays an upstream event stream; ends it with an in-band error event if anything fails
    after the first byte.

    ``connect`` acquires the model and opens the upstream. When the model has to load first
    (``waiting_comment`` given), the client gets that SSE comment (``: loading <model> (4.2 s
    of about 11 s)``; a callable is asked afresh each time) at once and every ``keepalive_s``
    until the backend answers, which keeps proxies and clients
    from timing out; otherwise nothing is sent until the backend has answered, so that its
    refusal still reaches the client as a real HTTP status. ``on_finish(outcome)`` runs exactly
    once, whether the stream completed, failed or the client left; the upstream connection then
    goes back to the pool if the stream completed and is closed otherwise.
    """

    def __init__(
        self,
        outcome: Outcome,
        on_finish: Callable[[Outcome], None],
        *,
        connect: Callable[[], Awaitable[aiohttp.ClientResponse]],
        waiting_comment: bytes | Callable[[], bytes] | None = None,
        keepalive_s: float = 5.0,
        converter: StreamConverter | None = None,
        stream_format: StreamFormat = OPENAI,
        envelope: str = "openai",
        model: str | None = None,
        answer_limit: int = ANSWER_LIMIT,
    ) -> None:
        self.model = model  # named in errors
        self.answer_limit = answer_limit  # a whole (non-stream) answer
        self.converter = converter  # legacy function_call deltas -> tool_calls
        self.format = stream_format
        self.envelope = envelope
        self.head = b""  # the first chunk, for formats with usage in it
        self.upstream: aiohttp.ClientResponse | None = None
        self.connect = connect
        self.outcome = outcome
        self.on_finish = on_finish
        self.waiting_comment = waiting_comment
        self.keepalive_s = keepalive_s
        self.tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        self.complete = False  # [DONE] (or a whole non-stream answer) was relayed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One disconnect watch covers opening the upstream and relaying it.
        try:
            await until_disconnect(receive, self._run(send))
        except (ClientGone, OSError):  # OSError: the server saw the socket close mid-send
            self.outcome.client_gone = not self.complete
        except asyncio.CancelledError:  # the server is shutting down: say so, in the stream
            if not self.complete:
                self.outcome.error = ShuttingDown("the proxy shut down before the answer ended")
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        if self.outcome.status:
                            await self._fail(self.outcome.error, send)
                        else:
                            await send_error(self.outcome.error, send, self.envelope)
            raise
        finally:
            self.outcome.finished_at = time.perf_counter()
            self._account()
            self.on_finish(self.outcome)  # before anything that could be cancelled
            if self.upstream is not None:
                await self._let_go(self.upstream)

    async def _let_go(self, upstream: aiohttp.ClientResponse) -> None:
        """A finished stream hands its connection back to the pool (a new connection per
        stream costs ~0.3 ms of TTFT); an unfinished one is closed, which aborts the backend's
        generation. A response already read whole (``_relay_whole``) was released there, and
        releasing it again does nothing: it must not touch a connection another request may
        now be using."""
        if not self.complete:
            upstream.close()
            return
        if upstream.closed:
            return
        try:
            # Backends end the body right after [DONE]; read that last chunk terminator.
            async with asyncio.timeout(1.0):
                await upstream.content.read()
        except FAILURES:
            upstream.close()
            return
        except asyncio.CancelledError:
            upstream.close()
            raise
        upstream.release()

    async def _run(self, send: Send) -> None:
        if self.waiting_comment is None:
            try:
                self.upstream = await self.connect()
            except ProxyError as error:
                self.outcome.error = error
                await send_error(error, send, self.envelope)
                return
            if self.upstream.content_type.lower() != "text/event-stream":
                await self._relay_whole(self.upstream, send)
                return
            self.outcome.status = 200
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        else:
            self.outcome.status = 200
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            try:
                self.upstream = await self._keep_alive(self.connect(), send)
            except ProxyError as error:
                await self._fail(error, send)
                return
            if self.upstream.content_type.lower() != "text/event-stream":
                await self._relay_whole_as_event(self.upstream, send)
                return
        await self._pump(self.upstream, send)

    async def _relay_whole(self, upstream: aiohttp.ClientResponse, send: Send) -> None:
        """A backend that answered a stream request with plain JSON: pass it on as it is."""
        try:
            body = await read_body(upstream, self.outcome, self.model, self.answer_limit)
        except ProxyError as error:
            self.outcome.error = error
            await send_error(error, send, self.envelope)
            return
        if self.converter is not None:
            body = convert_answer(body)
        content_type = upstream.headers.get("content-type", "application/json").encode()
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": [(b"content-type", content_type)],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self.complete = True

    async def _relay_whole_as_event(self, upstream: aiohttp.ClientResponse, send: Send) -> None:
        """A backend that answered plain JSON after the loading comments had committed the
        response to a 200 stream: the answer goes on as one event (a ``chat.completion`` as one
        chunk), then ``[DONE]``. Relayed raw, it ran into the next event's line and a client
        saw neither the answer nor an error."""
        try:
            body = await read_body(upstream, self.outcome, self.model, self.answer_limit)
        except ProxyError as error:
            await self._fail(error, send)
            return
        if self.converter is not None:
            body = convert_answer(body)
        chunk = as_one_chunk(body) if self.format is OPENAI else None
        if chunk is None:
            not_json = BackendUnavailable(
                f"the backend ({upstream.url}) answered a stream request with "
                f"{upstream.content_type or 'no content type'} that is not JSON"
            )
            await self._fail(not_json, send)
            return
        event = b"data: " + chunk + b"\n\n" + DONE
        self.tail.append(event)
        self.complete = True
        await send({"type": "http.response.body", "body": event, "more_body": False})

    async def _keep_alive(self, work: Awaitable[T], send: Send) -> T:
        waiting = self.waiting_comment
        assert waiting is not None
        task = asyncio.ensure_future(work)
        try:
            while True:
                body = waiting() if callable(waiting) else waiting
                await send({"type": "http.response.body", "body": body, "more_body": True})
                done, _ = await asyncio.wait({task}, timeout=self.keepalive_s)
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _pump(self, upstream: aiohttp.ClientResponse, send: Send) -> None:
        outcome = self.outcome
        done, stream_format = self.format.done, self.format
        try:
            async for chunk in upstream.content.iter_any():
                if outcome.first_byte_at is None:
                    outcome.first_byte_at = time.perf_counter()
                    if stream_format.needs_head:
                        self.head = chunk
                outcome.events += chunk.count(b"data:")
                if self.converter is not None:
                    chunk = self.converter.feed(chunk)
                    if not chunk:  # an event cut in two: its end is still to come
                        continue
                self.tail.append(chunk)
                if chunk.endswith(done) if done is not None else stream_format.ends(chunk):
                    # Complete: end the response with this chunk (one write, not two). Clients
                    # hang up on [DONE]; do not wait for the backend to close its side first
                    # (and then mistake their hang-up for a disconnect).
                    self.complete = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            rest = self.converter.flush() if self.converter is not None else b""
            if rest:
                self.tail.append(rest)
                await send({"type": "http.response.body", "body": rest, "more_body": True})
            if not self._saw_done():
                raise StreamBroken("stream ended without its last event")
            self.complete = True
        except FAILURES as exc:
            await self._fail(classify(exc, upstream.url, "mid-stream", self.model), send)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _fail(self, error: ProxyError, send: Send) -> None:
        self.outcome.error = error
        event = self.format.error_event(error)
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _saw_done(self) -> bool:
        return self.format.saw_end(b"".join(list(self.tail)[-2:]))

    def _account(self) -> None:
        """Find the usage object, any in-band upstream error and (Responses) the final object
        in the first and last events."""
        tail = b"".join(self.tail)
        usage, error = self.format.account(self.head, tail)
        if self.outcome.usage is None:
            self.outcome.usage = sane_usage(usage)
        if self.outcome.error is None:
            self.outcome.error = error
        if self.outcome.status == 200 and self.format.done is None:
            self.outcome.answer = self.format.final(tail)
