"""GPU leases, compatible with the existing ImageWorks clients (Judge Vision):
status, lease, renew, release, force_release under /v1/gpu. A lease may name a ``device`` or
give ``need_mb`` and get the device where it fits; neither: device 0, "the GPU"."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imageworks.chat_proxy.auth import require_admin, require_api_key
from imageworks.chat_proxy.errors import InvalidRequest
from imageworks.chat_proxy.request.bodies import json_object
from imageworks.chat_proxy.routes.openai import JSON, proxy_state
from imageworks.chat_proxy.server.state import ProxyState


def _json(data: Any) -> Response:
    return Response(json.dumps(data).encode(), media_type=JSON)


async def _mutation(request: Request) -> tuple[ProxyState, dict[str, Any]]:
    state = proxy_state(request)
    require_admin(
        request.headers,
        state.config.admin_token,
        peer=request.client.host if request.client else None,
        api_keys=state.config.api_keys,
    )
    return state, await json_object(request, state.config.body_timeout_s, optional=True)


def _optional(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], check: Any = None
) -> Any:
    value = body.get(name)
    if value is None:
        return None
    wrong_type = not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
    if wrong_type or (check is not None and not check(value)):
        raise InvalidRequest(f"'{name}' has an invalid value", param=name)
    return value


def _token(body: dict[str, Any]) -> str:
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise InvalidRequest("'token' is required", param="token")
    return token


async def gpu_status(request: Request) -> Response:
    state = proxy_state(request)
    require_api_key(request.headers, state.config.api_keys)
    await state.arbiter.snapshot()
    await state.arbiter.holdings()
    status = state.arbiter.status()
    # Models whose GPUs are someone else's to budget (Ray places its applications itself).
    status["not_budgeted"] = [
        {"name": entry.name, "backend": entry.backend, "why": why}
        for entry in state.registry
        if state.visible(entry) and (why := state.backends[entry.backend].budgeted_elsewhere)
    ]
    return _json(status)


async def gpu_lease(request: Request) -> Response:
    state, body = await _mutation(request)
    owner = body.get("owner")
    if not isinstance(owner, str) or not 1 <= len(owner) <= 64:
        raise InvalidRequest("'owner' is required (1 to 64 characters)", param="owner")
    reason = _optional(body, "reason", str, lambda v: len(v) <= 512) or ""
    restart = _optional(body, "restart_model", bool)
    ttl = _optional(body, "ttl_s", (int, float), lambda v: 0 < v <= 86400)
    need = _optional(body, "need_mb", int, lambda v: v > 0)
    device = _optional(body, "device", int, lambda v: 0 <= v < 64)
    lease = await state.arbiter.leases.grant(
        owner, reason, restart_model=restart is not False, ttl_s=ttl, need_mb=need, device=device
    )
    return _json({"token": lease.token, "lease": lease.public()})


async def gpu_renew(request: Request) -> Response:
    state, body = await _mutation(request)
    return _json({"lease": (await state.arbiter.leases.renew(_token(body))).public()})


async def gpu_release(request: Request) -> Response:
    state, body = await _mutation(request)
    restoring = await state.arbiter.leases.release(
        _token(body), restart_model=_optional(body, "restart_model", bool)
    )
    return _json({"status": "released", "restoring": restoring})


async def gpu_force_release(request: Request) -> Response:
    state, body = await _mutation(request)
    restoring = await state.arbiter.leases.force_release(
        owner=_optional(body, "owner", str),
        max_age_s=_optional(body, "max_age_s", (int, float), lambda v: v >= 0),
        restart_model=_optional(body, "restart_model", bool),
        device=_optional(body, "device", int, lambda v: v >= 0),
    )
    if restoring is None:
        return _json({"status": "idle", "restoring": []})
    return _json({"status": "released", "restoring": restoring})


ROUTES = [
    Route("/v1/gpu/status", gpu_status, methods=["GET"]),
    Route("/v1/gpu/lease", gpu_lease, methods=["POST"]),
    Route("/v1/gpu/renew", gpu_renew, methods=["POST"]),
    Route("/v1/gpu/release", gpu_release, methods=["POST"]),
    Route("/v1/gpu/force_release", gpu_force_release, methods=["POST"]),
]
