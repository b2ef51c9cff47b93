"""The SSE relay: an upstream event stream passed on to the client chunk by chunk, in the
surface's stream format (``request/streams.py``), with loading comments while the model starts
and an in-band error event for a failure after the first byte.

Each chunk is one network read of the backend's socket (``iter_any``: no re-chunking, no
coalescing, no decompression). What is looked at: where the first byte came, how many events
passed, the usage object in the first and last events; and, for a request that declared
``tools``, the legacy ``function_call`` answers that ``toolcalls`` converts (events are then
passed on whole). Opening the upstream and reading a whole answer are ``forwarding.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
from starlette.types import Receive, Scope, Send

from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ProxyError,
    ShuttingDown,
    internal_error,
)
from imageworks.chat_proxy.observe.records import Outcome, sane_usage
from imageworks.chat_proxy.request.bodies import ClientGone
from imageworks.chat_proxy.request.streams import DONE, OPENAI, StreamFormat
from imageworks.chat_proxy.request.toolcalls import StreamConverter, convert_answer
from imageworks.chat_proxy.upstream.failures import FAILURES, StreamBroken, classify
from imageworks.chat_proxy.upstream.forwarding import (
    ANSWER_LIMIT,
    read_body,
    send_error,
    until_disconnect,
)
from imageworks.chat_proxy.upstream.idle import IdleLimit

T = TypeVar("T")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_TAIL_CHUNKS = 8  # the usage chunk and [DONE] are in the last few network reads


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
        except Exception as exc:  # a bug: recorded as the 500 it is (the RequestIdMiddleware)
            if self.outcome.error is None:
                self.outcome.error = internal_error(exc)
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
        idle = IdleLimit.take_over(upstream)
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
                        if idle is not None:
                            idle.waiting()  # its piece came: the backend is not silent
                        continue
                self.tail.append(chunk)
                if chunk.endswith(done) if done is not None else stream_format.ends(chunk):
                    # Complete: end the response with this chunk (one write, not two). Clients
                    # hang up on [DONE]; do not wait for the backend to close its side first
                    # (and then mistake their hang-up for a disconnect).
                    self.complete = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                if idle is not None:
                    idle.got()  # sending to a slow client is not the backend's idle time
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if idle is not None:
                    idle.waiting()
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
        finally:
            if idle is not None:
                idle.stop()
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
