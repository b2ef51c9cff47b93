"""GPU leases, compatible with the existing ImageWorks clients (Judge Vision):
status, lease, renew, release, force_release under /v1/gpu. A lease may name a ``device`` or
give ``need_mb`` and get the device where it fits; neither: device 0, "the GPU"."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imageworks.chat_proxy.auth import require_api_key
from imageworks.chat_proxy.errors import InvalidRequest
from imageworks.chat_proxy.routes.guard import admin, admin_body
from imageworks.chat_proxy.routes.openai import JSON, proxy_state
from imageworks.chat_proxy.server.state import ProxyState


def _json(data: Any) -> Response:
    return Response(json.dumps(data).encode(), media_type=JSON)


async def _mutation(request: Request) -> tuple[ProxyState, dict[str, Any]]:
    state = admin(request)
    return state, await admin_body(request, optional=True)


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


async def _device(state: ProxyState, body: dict[str, Any]) -> int | None:
    """The ``device`` asked for: a device this box has (when it can tell)."""
    device: int | None = _optional(body, "device", int, lambda v: 0 <= v < 64)
    if device is not None:
        known = [snap.index for snap in await state.arbiter.snapshot()]
        if known and device not in known:
            raise InvalidRequest(
                f"there is no GPU device {device} here (devices: {known})", param="device"
            )
    return device


def _printable(body: dict[str, Any], name: str, most: int) -> str | None:
    """A text field that goes into logs: printable (no NUL, CR, LF), at most ``most`` long."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.isprintable() or len(value) > most:
        raise InvalidRequest(
            f"'{name}' must be printable text (no control characters) of at most {most} characters",
            param=name,
        )
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
        if state.visible(entry)
        and (why := state.lifecycle.backends[entry.backend].budgeted_elsewhere)
    ]
    return _json(status)


async def gpu_lease(request: Request) -> Response:
    state, body = await _mutation(request)
    owner = _printable(body, "owner", 64)
    if not owner:
        raise InvalidRequest("'owner' is required (1 to 64 characters)", param="owner")
    reason = _printable(body, "reason", 512) or ""
    restart = _optional(body, "restart_model", bool)
    ttl = _optional(body, "ttl_s", (int, float), lambda v: 0 < v <= 86400)
    need = _optional(body, "need_mb", int, lambda v: v > 0)
    device = await _device(state, body)
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
        owner=_printable(body, "owner", 64),
        max_age_s=_optional(body, "max_age_s", (int, float), lambda v: v >= 0),
        restart_model=_optional(body, "restart_model", bool),
        device=await _device(state, body),
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
