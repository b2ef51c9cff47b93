"""Reading what a client sends: bodies streamed and counted against a limit (never buffered
whole before the check), with an idle limit for clients that stop sending; query strings
validated like bodies."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import Receive

from imageworks.chat_proxy.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from imageworks.chat_proxy.request.payloads import parse_body

ADMIN_BODY_LIMIT = 64 * 1024  # admin and lease bodies are a few small fields
Q = TypeVar("Q", bound=BaseModel)


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


async def read_limited(
    receive: Receive, declared: str | None, limit: int, *, idle_timeout: float = 30.0
) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes, or when
    nothing arrives for ``idle_timeout`` seconds."""
    if declared:
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidRequest("the content-length header is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body stopped arriving for {idle_timeout:g} s "
                "(CHAT_PROXY_BODY_TIMEOUT_S)"
            ) from None
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


async def request_body(request: Request, limit: int, idle_timeout: float) -> bytes:
    try:
        return await read_limited(
            request.receive, request.headers.get("content-length"), limit, idle_timeout=idle_timeout
        )
    except ClientGone:
        raise InvalidRequest("the client disconnected while sending the body") from None


async def json_object(
    request: Request, idle_timeout: float, *, optional: bool = False
) -> dict[str, Any]:
    """A small JSON object body (admin, leases); ``optional``: an empty body is ``{}``."""
    raw = await request_body(request, ADMIN_BODY_LIMIT, idle_timeout)
    if optional and not raw.strip():
        return {}
    return parse_body(raw)


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
