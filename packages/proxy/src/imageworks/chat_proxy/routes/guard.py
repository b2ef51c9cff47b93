"""The one guard of every admin and lease route: who may call (``auth.require_admin``) and
what body it may send (a small ``application/json`` object, ``bodies.json_object``). The Host
and Origin rules ran before any route (request/browser.py)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from imageworks.chat_proxy.auth import require_admin
from imageworks.chat_proxy.request.bodies import json_object, require_json_body
from imageworks.chat_proxy.routes.openai import proxy_state
from imageworks.chat_proxy.server.state import ProxyState


def admin(request: Request) -> ProxyState:
    """The proxy's state, once the caller is known to be an administrator."""
    state = proxy_state(request)
    require_admin(
        request.headers,
        state.config.admin_token,
        peer=request.client.host if request.client else None,
        api_keys=state.config.api_keys,
    )
    require_json_body(request.headers)  # also for routes that read no body
    return state


async def admin_body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object (``optional``: an empty body is ``{}``)."""
    return await json_object(request, optional=optional)
