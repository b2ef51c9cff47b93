"""Opening the upstream and reading its answer: the request sent to a backend (one retry on a
stale kept-alive connection), a backend's error status as ours, a whole answer read within its
cap, the client's disconnect watched, and an error sent in the surface's envelope.

Bodies travel as bytes through aiohttp's client (the app's one ``ClientSession``, see
``egress``); a whole answer is relayed unchanged, its usage object read for the log. The SSE
relay of a streamed answer is ``sse.py``.

A client that goes away cancels the upstream request, whether it was streaming or still
waiting for a non-streaming answer: the proxy's own server tells the request (``departure``);
under another, a task watches ``receive()`` for ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Coroutine
from typing import TypeVar

import aiohttp
from starlette.types import Receive, Send

from imageworks.chat_proxy.departure import CONNECTION
from imageworks.chat_proxy.errors import BackendUnavailable, ProxyError, upstream_error
from imageworks.chat_proxy.observe.records import Outcome
from imageworks.chat_proxy.request.bodies import ClientGone
from imageworks.chat_proxy.upstream.egress import JSON, Egress, Target
from imageworks.chat_proxy.upstream.failures import FAILURES, STALE, classify
from imageworks.chat_proxy.upstream.reading import TooLarge, read_capped

__all__ = ["ClientGone", "open_upstream", "read_body", "send_error", "until_disconnect"]

T = TypeVar("T")

_CHUNKED_ABOVE = 1024 * 1024
ERROR_BODY_LIMIT = 64 * 1024  # a backend's error answer: its message is in the first bytes
ANSWER_LIMIT = 64 * 1024 * 1024  # a non-stream answer (CHAT_PROXY_MAX_ANSWER_BYTES)


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
    outcome.whole = raw  # its usage is read when it is recorded, after it was sent
    return raw


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Run ``work`` in this task; if the client disconnects first, cancel it and raise
    ``ClientGone``. Told by the proxy's own server (``departure.py``); under another, one
    watcher task per request."""
    current = asyncio.current_task()
    assert current is not None
    departure = CONNECTION.get()
    gone = False

    def leave() -> None:
        nonlocal gone
        gone = True
        current.cancel()

    async def watch() -> None:
        await _wait_for_disconnect(receive)
        leave()

    if departure is not None and departure.lost:
        if isinstance(work, Coroutine):
            work.close()
        raise ClientGone()
    told = departure.watch(leave) if departure is not None else None
    watcher = asyncio.ensure_future(watch()) if departure is None else None
    try:
        return await work
    except asyncio.CancelledError:
        if gone and current.uncancel() == 0:
            raise ClientGone() from None
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
        elif departure is not None:
            departure.watch(told)


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
