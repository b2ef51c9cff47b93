"""Read-only admin views for the console: the tail of a model's engine log, and the merged
registry with the layer each field came from.

The log file is never named by the request: the model name is resolved through the registry and
the path is built from the staging dir and the entry's own (percent-encoded) name, so no request
can read any other file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imageworks.chat_proxy.bodies import query
from imageworks.chat_proxy.errors import ModelNotFound
from imageworks.chat_proxy.process import safe_name, tail
from imageworks.chat_proxy.routes.admin import _admin, _json
from imageworks.chat_proxy.state import ProxyState
from imageworks.model_loader.errors import UnknownModelError

MAX_LOG_BYTES = 256 * 1024
HIDDEN = "<hidden>"


class LogQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    source: Literal["engine", "executor"] = "engine"
    lines: int = Field(default=200, ge=1, le=2000)


def log_path(state: ProxyState, name: str, source: str) -> Path:
    """``engine``: what the proxy's start of the model wrote (the engine's own output for
    llama.cpp, the proxy's notes for a vLLM started through the executor); ``executor``: the
    vLLM executor's log of it, readable when the executor shares this staging dir."""
    if source == "engine":
        return state.lifecycle.start_log(name)
    return state.config.staging_dir / "vllm" / f"{safe_name(name)}.log"


async def admin_logs(request: Request) -> Response:
    state = await _admin(request)
    asked = query(request, LogQuery)
    try:
        entry = state.registry.resolve(asked.model)
    except UnknownModelError:
        raise ModelNotFound(f"The model '{asked.model}' does not exist", param="model") from None
    path = log_path(state, entry.name, asked.source)
    exists = await asyncio.to_thread(path.is_file)
    text = await asyncio.to_thread(tail, path, asked.lines, MAX_LOG_BYTES) if exists else ""
    return _json(
        {
            "model": entry.name,
            "source": asked.source,
            "exists": exists,
            "lines": text.splitlines(),
        }
    )


def _hide_header_values(raw: dict[str, Any]) -> dict[str, Any]:
    """Header values may hold credentials: the console shows which headers are set, not them."""
    config = raw.get("backend_config")
    if isinstance(config, dict) and isinstance(config.get("headers"), dict):
        headers = dict.fromkeys(config["headers"], HIDDEN)
        raw = {**raw, "backend_config": {**config, "headers": headers}}
    return raw


async def admin_registry(request: Request) -> Response:
    state = await _admin(request)
    registry = state.registry
    entries = [
        {
            "name": entry.name,
            "visible": state.visible(entry),
            "entry": _hide_header_values(registry.raw(entry.name)),
            "origins": registry.origins(entry.name),
            "sources": [
                {"layer": layer, "file": file, "index": index}
                for layer, file, index in registry.sources(entry.name)
            ],
        }
        for entry in registry
    ]
    return _json(
        {
            "version": registry.version,
            "directory": str(registry.directory),
            "last_error": state.watcher.last_error,
            "profile": state.profile.name,
            "entries": entries,
        }
    )


ROUTES = [
    Route("/admin/logs", admin_logs, methods=["GET"]),
    Route("/admin/registry", admin_registry, methods=["GET"]),
]
