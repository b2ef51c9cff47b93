"""The admin API (/admin/*): state, recent requests, profile, autostart, registry reload."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imageworks.chat_proxy.auth import require_admin
from imageworks.chat_proxy.errors import InvalidRequest, RegistryInvalid
from imageworks.chat_proxy.payloads import parse_body
from imageworks.chat_proxy.routes.openai import JSON, proxy_state
from imageworks.chat_proxy.state import ProxyState
from imageworks.model_loader.errors import RegistryError, UnknownProfileError


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data).encode(), status_code=status, media_type=JSON)


async def _admin(request: Request) -> ProxyState:
    state = proxy_state(request)
    require_admin(request, state.config.admin_token)
    return state


async def _body(request: Request) -> dict[str, Any]:
    return parse_body(await request.body())


async def admin_state(request: Request) -> Response:
    state = await _admin(request)
    models = []
    for entry in state.registry:
        models.append(
            {
                "name": entry.name,
                "backend": entry.backend,
                "visible": state.visible(entry),
                "state": state.lifecycle.state(entry.name),
                "in_flight": state.lifecycle.in_flight.get(entry.name, 0),
            }
        )
    return _json(
        {
            "registry": {
                "version": state.registry.version,
                "entries": len(state.registry),
                "last_error": state.watcher.last_error,
                "directory": str(state.registry.directory),
            },
            "profile": state.profile.name,
            "autostart": state.autostart,
            "models": models,
            "config": state.config.public(),
            "request_log": {"path": str(state.log.path), "dropped": state.log.dropped},
        }
    )


async def admin_requests(request: Request) -> Response:
    state = await _admin(request)
    raw = request.query_params.get("limit", "50")
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidRequest("'limit' must be a positive integer", param="limit")
    recent = list(state.log.recent)[-int(raw) :]
    return _json({"object": "list", "data": recent[::-1]})


async def admin_profile(request: Request) -> Response:
    state = await _admin(request)
    if request.method == "PUT":
        name = (await _body(request)).get("name")
        if not isinstance(name, str):
            raise InvalidRequest("'name' must be a profile name", param="name")
        previous = state.profile.name
        try:
            state.profiles.use(name)
        except UnknownProfileError as exc:
            raise InvalidRequest(str(exc), param="name") from None
        if previous != name:
            state.log.event("profile_change", "profiles", previous=previous, profile=name)
    return _json(
        {"name": state.profile.name, "profiles": [p.model_dump() for p in state.profiles.profiles]}
    )


async def admin_autostart(request: Request) -> Response:
    state = await _admin(request)
    if request.method == "PUT":
        enabled = (await _body(request)).get("enabled")
        if not isinstance(enabled, bool):
            raise InvalidRequest("'enabled' must be true or false", param="enabled")
        state.autostart = enabled
    return _json({"enabled": state.autostart})


async def registry_reload(request: Request) -> Response:
    state = await _admin(request)
    try:
        registry = state.watcher.reload()
    except RegistryError as exc:
        state.metrics.registry_reloads.labels("error").inc()
        raise RegistryInvalid(
            f"registry not reloaded, version {state.registry.version} stays in service: {exc}"
        ) from None
    state.metrics.registry_reloads.labels("ok").inc()
    return _json({"version": registry.version, "entries": len(registry)})


ROUTES = [
    Route("/admin/state", admin_state, methods=["GET"]),
    Route("/admin/requests", admin_requests, methods=["GET"]),
    Route("/admin/profile", admin_profile, methods=["GET", "PUT"]),
    Route("/admin/autostart", admin_autostart, methods=["GET", "PUT"]),
    Route("/admin/registry/reload", registry_reload, methods=["POST"]),
]
