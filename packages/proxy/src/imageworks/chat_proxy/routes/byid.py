"""The Responses by id (``GET/DELETE /v1/responses/{id}``, ``.../cancel``,
``.../input_items``): forwarded to the engine that made the response when it keeps responses;
answered by the proxy from what it kept for one that keeps none."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import Receive, Scope, Send

from imageworks.chat_proxy.errors import InvalidRequest, MethodNotAllowed, NotFound, ProxyError
from imageworks.chat_proxy.request.surfaces import Surface
from imageworks.chat_proxy.routes.forward import JSON, Call
from imageworks.chat_proxy.routes.relay import run, send_whole
from imageworks.chat_proxy.routes.routing import resolve
from imageworks.chat_proxy.server.state import ProxyState
from imageworks.chat_proxy.upstream.forwarding import send_error
from imageworks.model_loader.schema import ModelEntry


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
        self.to(resolve(self.state, maker))
        query = scope.get("query_string", b"")
        self.path = f"/responses/{rid}" + (f"/{action}" if action else "")
        self.path += "?" + query.decode("latin-1") if query else ""
        self.payload = raw


async def by_id(
    state: ProxyState, surface: Surface, scope: Scope, receive: Receive, send: Send
) -> None:
    call = ByIdCall(state, surface, scope)
    try:
        call.identify()
        rid, action = response_path(scope["path"])
        maker = state.responses.where(rid)
        entry = resolve(state, maker) if maker is not None else None
        if entry is not None and call.key is not None:
            call.key.require(entry)
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
