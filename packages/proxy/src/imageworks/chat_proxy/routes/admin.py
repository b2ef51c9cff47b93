"""The admin API (/admin/*): state, recent requests, profile, autostart, registry reload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from imageworks.chat_proxy.engines.modelstate import STARTING, WAKING
from imageworks.chat_proxy.errors import InvalidRequest, RegistryInvalid
from imageworks.chat_proxy.observe.events import sse
from imageworks.chat_proxy.request.bodies import query
from imageworks.chat_proxy.routes.guard import admin, admin_body
from imageworks.chat_proxy.routes.openai import JSON, loading_progress, resolve
from imageworks.chat_proxy.server.state import ProxyState
from imageworks.chat_proxy.upstream.peers import Listed
from imageworks.model_loader.errors import RegistryError, UnknownProfileError
from imageworks.model_loader.schema import ModelEntry


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data).encode(), status_code=status, media_type=JSON)


class RequestsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=100_000, strict=False)

    @field_validator("limit", mode="before")
    @classmethod
    def _ascii_digits(cls, value: Any) -> Any:
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError("must be a positive integer")
        return value


async def admin_state(request: Request) -> Response:
    state = admin(request)
    for entry in state.registry:  # a model never run here shows what its files say
        lifecycle = state.lifecycle
        if entry.servable and lifecycle.managed(entry) and lifecycle.backend(entry).uses_gpu(entry):
            await state.arbiter.estimate_now(entry)
    models = [model_state(state, entry) for entry in state.registry]
    models += [peer_state(listed) for listed in state.peers.listed(set(state.registry.names))]
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
            "peers": state.peers.public(),
            "request_log": {"path": str(state.log.path), "dropped": state.log.dropped},
            "events": state.log.bus.public() if state.log.bus is not None else None,
        }
    )


def model_state(state: ProxyState, entry: ModelEntry) -> dict[str, Any]:
    lifecycle = state.lifecycle
    return (
        {
            "name": entry.name,
            "backend": entry.backend,
            "visible": state.visible(entry),
            "managed": entry.servable and lifecycle.managed(entry),
            "location": lifecycle.backend(entry).location(entry),
            **lifecycle.describe(entry),
            "in_flight": lifecycle.in_flight.get(entry.name, 0),
            # While it loads: seconds so far, of about how many (its learned load time).
            "loading": loading_progress(state, entry).public()
            if lifecycle.state(entry) in (STARTING, WAKING)
            else None,
            # Its size: declared, estimated from its files, learned; and which one is used.
            "vram": state.arbiter.sizing(entry)
            if lifecycle.backend(entry).uses_gpu(entry)
            else None,
        }
        if entry.servable
        else {
            "name": entry.name,
            "backend": entry.backend,
            "visible": False,
            "managed": False,
            "state": "unsupported",
            "in_flight": 0,
        }
    )


def peer_state(listed: Listed) -> dict[str, Any]:
    """A model another box serves: its state is that box's word (never managed from here)."""
    info = listed.model.info
    return {
        "name": listed.id,
        "backend": info.get("backend"),
        "visible": True,
        "managed": False,
        "location": {"kind": "peer", "peer": listed.model.peer},
        "state": info.get("state", "unknown"),
        "last_error": None,
        "in_flight": 0,
    }


def _managed_entry(state: ProxyState, name: Any) -> ModelEntry:
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'model' must be a model name", param="model")
    entry = resolve(state, name)
    if not state.lifecycle.managed(entry):
        raise InvalidRequest(
            f"model {entry.name!r} is not started by the proxy ({entry.backend} with its own "
            "address, or a server the proxy only forwards to)",
            param="model",
        )
    return entry


async def admin_activate(request: Request) -> Response:
    """Start a model (swapping out another if they share a slot); answers once it is ready."""
    state = admin(request)
    entry = _managed_entry(state, (await admin_body(request)).get("model"))
    await state.lifecycle.activate(entry)
    return _json(model_state(state, entry))


async def admin_deactivate(request: Request) -> Response:
    """Stop one model (``{"model": ...}``) or every model the proxy started (no body)."""
    state = admin(request)
    name = (await admin_body(request, optional=True)).get("model")
    entry = _managed_entry(state, name) if name is not None else None
    stopped = await state.lifecycle.deactivate(entry)
    return _json({"stopped": stopped})


async def admin_requests(request: Request) -> Response:
    state = admin(request)
    limit = query(request, RequestsQuery).limit
    recent = list(state.log.recent)[-limit:]
    return _json({"object": "list", "data": recent[::-1]})


async def admin_profile(request: Request) -> Response:
    state = admin(request)
    if request.method == "PUT":
        name = (await admin_body(request)).get("name")
        if not isinstance(name, str):
            raise InvalidRequest("'name' must be a profile name", param="name")
        previous = state.profile.name
        try:
            await asyncio.to_thread(state.profiles.use, name)  # an fsync'd write
        except UnknownProfileError as exc:
            raise InvalidRequest(str(exc), param="name") from None
        if previous != name:
            state.log.event("profile_change", "profiles", previous=previous, profile=name)
    return _json(
        {"name": state.profile.name, "profiles": [p.model_dump() for p in state.profiles.profiles]}
    )


async def admin_autostart(request: Request) -> Response:
    state = admin(request)
    if request.method == "PUT":
        enabled = (await admin_body(request)).get("enabled")
        if not isinstance(enabled, bool):
            raise InvalidRequest("'enabled' must be true or false", param="enabled")
        state.autostart = enabled
    return _json({"enabled": state.autostart})


async def registry_reload(request: Request) -> Response:
    state = admin(request)
    try:
        registry = await asyncio.to_thread(state.watcher.reload)  # parses and writes files
    except RegistryError as exc:
        state.metrics.registry_reloads.labels("error").inc()
        raise RegistryInvalid(
            f"registry not reloaded, version {state.registry.version} stays in service: {exc}"
        ) from None
    state.metrics.registry_reloads.labels("ok").inc()
    return _json({"version": registry.version, "entries": len(registry)})


EVENTS_KEEPALIVE_S = 15.0


async def admin_events(request: Request) -> Response:
    """``GET /admin/events``: the event bus as server-sent events, from now on (with
    ``Last-Event-ID``: also what the bus still holds after that id). A comment every 15 s keeps
    idle connections open; a slow reader misses events (a ``dropped`` event says how many)
    rather than slowing anyone down."""
    state = admin(request)
    bus = state.log.bus
    if bus is None:
        raise InvalidRequest("this proxy has no event stream")
    last = request.headers.get("last-event-id", "")
    after = int(last) if last.isascii() and last.isdigit() else None

    async def stream() -> AsyncIterator[bytes]:
        yield b": events\n\n"  # the headers and a first byte now, before any event
        subscriber = bus.open(after)
        try:
            while True:
                try:  # Queue.get is safe to time out: no event is lost
                    event = await asyncio.wait_for(subscriber.queue.get(), EVENTS_KEEPALIVE_S)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                yield sse(event)
        finally:
            bus.close(subscriber)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


ROUTES = [
    Route("/admin/events", admin_events, methods=["GET"]),
    Route("/admin/state", admin_state, methods=["GET"]),
    Route("/admin/requests", admin_requests, methods=["GET"]),
    Route("/admin/profile", admin_profile, methods=["GET", "PUT"]),
    Route("/admin/autostart", admin_autostart, methods=["GET", "PUT"]),
    Route("/admin/registry/reload", registry_reload, methods=["POST"]),
    Route("/admin/activate", admin_activate, methods=["POST"]),
    Route("/admin/deactivate", admin_deactivate, methods=["POST"]),
]
