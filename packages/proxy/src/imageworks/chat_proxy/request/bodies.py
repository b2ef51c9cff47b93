"""Reading what a client sends: bodies streamed and counted against a limit (never buffered
whole before the check), with an idle limit for clients that stop sending; query strings
validated like bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imageworks.chat_proxy.config import BODY_COST
from imageworks.chat_proxy.errors import (
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
    UnsupportedMediaType,
)
from imageworks.chat_proxy.request.payloads import parse_body

ADMIN_BODY_LIMIT = 64 * 1024  # admin and lease bodies are a few small fields
Q = TypeVar("Q", bound=BaseModel)


class BodyBudget:
    """The memory the request bodies of all requests in flight cost together, at most
    ``total`` bytes; each body counts ``BODY_COST`` times its size."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def check(self, size: int) -> None:
        """503 unless ``size`` more would fit now (nothing is taken)."""
        if self.used + size > self.total:
            raise ServerBusy(
                f"the request bodies in flight cost {self.used} bytes of memory, and their "
                f"budget is {self.total} (CHAT_PROXY_BODY_BUDGET_BYTES, each body counted "
                f"{BODY_COST} times its size); retry shortly",
                headers={"Retry-After": "1"},
            )

    def take(self, size: int) -> None:
        self.check(size)
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


class BodyClock:
    """The two time limits of one request's body, kept on one timer: nothing may arrive for
    ``idle_s`` while the app waits for it (``CHAT_PROXY_BODY_TIMEOUT_S``), and the whole body
    must have come within ``deadline_s`` of its first read (``CHAT_PROXY_BODY_DEADLINE_S``).
    Past either, the read waiting for the body fails with a 408. (Two ``asyncio.timeout``
    blocks around every read, one per limit, were two timers set and cancelled per request.)"""

    def __init__(self, idle_s: float, deadline_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.idle_s, self.deadline_s = idle_s, deadline_s
        self.deadline = now + deadline_s
        self.waiting_since: float | None = None  # None: the app is not waiting for the body
        self.reader: asyncio.Task[Any] | None = None
        self.expired: RequestTimeout | None = None
        self.timer: asyncio.TimerHandle | None = self.loop.call_at(
            min(self.deadline, now + idle_s), self._look
        )

    async def read(self, receive: Receive) -> Message:
        """``receive()``, within the limits."""
        self.reader = asyncio.current_task()  # the task waiting now is the one to fail
        self.waiting_since = self.loop.time()
        try:
            return await receive()
        except asyncio.CancelledError:
            if self.expired is not None and self.reader is not None and self.reader.uncancel() == 0:
                raise self.expired from None
            raise
        finally:
            self.waiting_since = None

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _look(self) -> None:
        self.timer = None
        now, since = self.loop.time(), self.waiting_since
        if since is not None and self.reader is not None:
            if now >= self.deadline:
                self.expired = RequestTimeout(
                    f"the request body did not arrive within {self.deadline_s:g} s "
                    "(CHAT_PROXY_BODY_DEADLINE_S)"
                )
            elif now - since >= self.idle_s:
                self.expired = RequestTimeout(
                    f"the request body stopped arriving for {self.idle_s:g} s "
                    "(CHAT_PROXY_BODY_TIMEOUT_S)"
                )
            if self.expired is not None:
                self.reader.cancel()
                return
        idle_ends = (since if since is not None else now) + self.idle_s
        self.timer = self.loop.call_at(min(self.deadline, idle_ends), self._look)


class BodyGuard:
    """ASGI middleware: every request body is counted (at ``BODY_COST`` times its size) against
    the shared ``BodyBudget`` and given back when the request is answered; over the budget, the
    read fails at once with a 503 and ``Retry-After``, so nothing half-read stays in memory. A
    ``Content-Length`` that would not fit now is refused before a byte is read; one that fits is
    taken whole when the body's first bytes arrive (a body once begun is not refused half-way
    for others begun after it), not with the head: connections that declared big bodies and
    sent nothing held the budget for free (three of 28 MiB, against the default). Nothing may
    arrive for ``idle_s`` while the app waits for the body (408), and the whole body must have
    arrived within ``deadline_s`` of its first read: a client trickling a byte every few
    seconds passes the idle limit but not this (408); ``BodyClock``."""

    def __init__(self, app: ASGIApp, budget: BodyBudget, deadline_s: float, idle_s: float) -> None:
        self.app = app
        self.budget = budget
        self.deadline_s = deadline_s
        self.idle_s = idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        budget = self.budget
        declared = 0
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                declared = int(value)
        # What a declared body costs, when the budget could ever hold it (a larger one is the
        # body limit's 413, not a 503).
        reserve = declared * BODY_COST if declared * BODY_COST <= budget.total else 0
        taken = received = 0
        clock: BodyClock | None = None
        complete = False

        async def counted() -> Message:
            nonlocal taken, received, clock, complete
            if complete:
                return await receive()
            first = clock is None
            if clock is None:
                if reserve:
                    budget.check(reserve)  # refused before a byte is read
                clock = BodyClock(self.idle_s, self.deadline_s)
            message = await clock.read(receive)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if first and reserve:
                    budget.take(reserve)  # the whole body, once it is coming
                    taken = reserve
                if received * BODY_COST > taken:
                    budget.take(received * BODY_COST - taken)
                    taken = received * BODY_COST
                complete = not message.get("more_body", False)
            else:
                complete = True
            if complete:
                clock.stop()
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            if clock is not None:
                clock.stop()
            budget.give(taken)


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


async def read_limited(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes. Its time
    limits are the ``BodyGuard``'s, which every request passes."""
    if declared:
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidRequest("the content-length header is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def request_body(request: Request, limit: int) -> bytes:
    try:
        return await read_limited(request.receive, request.headers.get("content-length"), limit)
    except ClientGone:
        raise InvalidRequest("the client disconnected while sending the body") from None


async def json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """A small JSON object body (admin, leases); ``optional``: an empty body is ``{}``.
    A body must say it is ``application/json``: a web page can send ``text/plain`` (or a form)
    to any address without the browser asking first, but not JSON (request/browser.py)."""
    require_json_body(request.headers)
    raw = await request_body(request, ADMIN_BODY_LIMIT)
    if optional and not raw.strip():
        return {}
    return parse_body(raw)


def require_json_body(headers: Mapping[str, str]) -> None:
    """415 for a request with a body that is not ``application/json`` (any parameters); a
    request without a body passes."""
    declared = headers.get("content-length")
    if declared == "0" or not (declared or "transfer-encoding" in headers):
        return
    media = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType(
            f"the body must be application/json, not {media or 'untyped'} "
            "(send 'Content-Type: application/json')"
        )


def query(request: Request, model: type[Q]) -> Q:
    """The query string validated by ``model``; a bad value is a 400 naming the parameter."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else None
        raise InvalidRequest(
            f"query parameter {name!r}: {error['msg']}" if name else error["msg"], param=name
        ) from None
