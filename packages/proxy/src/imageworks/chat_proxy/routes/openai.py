"""The model list (``/v1/models``, ``/models``); the forwarded surfaces are ``forward.py``."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imageworks.chat_proxy.auth import NamedKey, identify
from imageworks.chat_proxy.engines.modelstate import (
    FAILED,
    READY,
    SLEEPING,
    STARTING,
    UNREACHABLE,
    WAKING,
)
from imageworks.chat_proxy.routes.routing import loading_progress, resolve, route
from imageworks.chat_proxy.server.state import ProxyState
from imageworks.chat_proxy.upstream.peers import FORWARDED_HEADER, Listed
from imageworks.model_loader.schema import ModelEntry

__all__ = ["JSON", "ROUTES", "loading_progress", "proxy_state", "resolve", "route"]

JSON = "application/json"


# A model's state as llama.cpp's router reports it (``status.value``).
LOAD_STATUS = {READY: "loaded", STARTING: "loading", FAILED: "failed", UNREACHABLE: "failed"}
LOAD_STATUS |= {SLEEPING: "sleeping", WAKING: "loading"}


def proxy_state(request: Request) -> ProxyState:
    state: ProxyState = request.app.state.proxy
    return state


# --- models ----------------------------------------------------------------------------------


def model_object(state: ProxyState, entry: ModelEntry) -> dict[str, Any]:
    return {
        "id": entry.name,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "imageworks",
        "imageworks": {
            "logical_name": entry.name,
            "display_name": entry.label,
            "backend": entry.backend,
            "served_model_id": entry.upstream_id,
            "aliases": entry.model_aliases,
            "capabilities": entry.capabilities.model_dump(),
            "state": state.lifecycle.state(entry),
        },
        # llama.cpp's router shape, which Open WebUI reads.
        "status": {"value": LOAD_STATUS.get(state.lifecycle.state(entry), "unloaded")},
    }


def peer_object(state: ProxyState, listed: Listed) -> dict[str, Any]:
    return {
        "id": listed.id,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "imageworks",
        "imageworks": {**listed.model.info, "peer": listed.model.peer, "boxes": listed.boxes},
    }


def models_data(state: ProxyState, local_only: bool) -> list[dict[str, Any]]:
    data = [model_object(state, e) for e in state.registry if state.visible(e)]
    if state.peers and not local_only:
        local = {item["id"] for item in data}
        data += [peer_object(state, listed) for listed in state.peers.listed(local)]
    return data


def models_body(state: ProxyState, local_only: bool = False) -> bytes:
    """The /v1/models body, cached until the registry, the profile, a model state or what the
    peers serve changes. ``local_only``: for a peer asking (it never lists our peers)."""
    key = (state.registry.version, state.profile.name, state.lifecycle.version, state.peers.version)
    cached = state._models_cache
    if not local_only and cached is not None and cached[0] == key:
        return cached[1]
    body = json.dumps({"object": "list", "data": models_data(state, local_only)}).encode()
    if not local_only:
        state._models_cache = (key, body)
    return body


class _Listed:
    """A model of the list as a key's rules see it: a peer's model is judged by its name (this
    box's profiles say nothing about it)."""

    def __init__(self, state: ProxyState, item: dict[str, Any]) -> None:
        self.name: str = item["id"]
        self.entry = None if "peer" in item["imageworks"] else state.registry.find(self.name)

    def visible_in(self, profile: str) -> bool:
        return self.entry is not None and self.entry.visible_in(profile)


def restricted(key: NamedKey | None) -> bool:
    return key is not None and (key.models is not None or key.profiles is not None)


async def list_models(request: Request) -> Response:
    """Every model this box offers, or only those the request's API key may use."""
    state = proxy_state(request)
    key = identify(request.headers, state.config.named_keys)
    local_only = FORWARDED_HEADER in request.headers
    if key is None or not restricted(key):
        return Response(models_body(state, local_only), media_type=JSON)
    data = [i for i in models_data(state, local_only) if key.may_use(_Listed(state, i))]
    return Response(json.dumps({"object": "list", "data": data}).encode(), media_type=JSON)


async def get_model(request: Request) -> Response:
    state = proxy_state(request)
    key = identify(request.headers, state.config.named_keys)
    name = request.path_params["model_id"]
    if state.peers and FORWARDED_HEADER not in request.headers:
        for item in models_data(state, local_only=False):
            if item["id"] == name:
                if key is not None:
                    key.require(_Listed(state, item))
                return Response(json.dumps(item).encode(), media_type=JSON)
    entry = resolve(state, name)
    if key is not None:
        key.require(entry)
    return Response(json.dumps(model_object(state, entry)).encode(), media_type=JSON)


ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/models/{model_id:path}", get_model, methods=["GET"]),
]
