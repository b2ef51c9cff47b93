"""Read-only admin views for the console: the tail of a model's engine log, and the merged
registry with the layer each field came from.

The log file is never named by the request: the model name is resolved through the registry and
the path is built from the staging dir and the entry's own (percent-encoded) name, so no request
can read any other file. A link planted at that path is not followed, and only the tail of a
regular file is read, so neither a link to a secret nor a FIFO nor a multi-GB log gets through.

The registry view leaves credentials out (``observe.redact``): header values, secret-named
fields and engine flags, environment values (Ray's ``runtime_env.env_vars`` too), the user
info and query values of URLs are replaced by ``<hidden>``.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imageworks.chat_proxy.errors import ModelNotFound
from imageworks.chat_proxy.redact import redact
from imageworks.chat_proxy.request.bodies import query
from imageworks.chat_proxy.routes.admin import _json
from imageworks.chat_proxy.routes.guard import admin
from imageworks.chat_proxy.server.state import ProxyState
from imageworks.chat_proxy.supervision.process import safe_name
from imageworks.model_loader.errors import UnknownModelError

MAX_LOG_BYTES = 256 * 1024


class LogQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    source: Literal["engine", "executor"] = "engine"
    lines: int = Field(default=200, ge=1, le=2000)

    @field_validator("lines", mode="before")
    @classmethod
    def _ascii_digits(cls, value: Any) -> Any:
        # Plain digits only: pydantic would also take ' 5', '+5', '1_000' and '5.0'.
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError("must be a positive integer")
        return value


def log_path(state: ProxyState, name: str, source: str) -> Path:
    """``engine``: what the proxy's start of the model wrote (the engine's own output for
    llama.cpp, the proxy's notes for a vLLM started through the executor); ``executor``: the
    vLLM executor's log of it, readable when the executor shares this staging dir."""
    if source == "engine":
        return state.lifecycle.start_log(name)
    return state.config.staging_dir / "vllm" / f"{safe_name(name)}.log"


def read_tail(path: Path, lines: int, max_bytes: int) -> str | None:
    """The last ``lines`` within the last ``max_bytes`` of the regular file at ``path``; None
    when there is none. A symlink is not followed (O_NOFOLLOW) and a FIFO or device is not
    waited on (O_NONBLOCK, then fstat); at most ``max_bytes`` are read even while it grows."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            return None
        start = max(0, info.st_size - max_bytes)
        handle.seek(start)
        data = handle.read(max_bytes)
    if start:  # the first line read is cut: leave it out rather than show half of it
        data = data.partition(b"\n")[2]
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


async def admin_logs(request: Request) -> Response:
    state = admin(request)
    asked = query(request, LogQuery)
    try:
        entry = state.registry.resolve(asked.model)
    except UnknownModelError:
        raise ModelNotFound(f"The model '{asked.model}' does not exist", param="model") from None
    path = log_path(state, entry.name, asked.source)
    text = await asyncio.to_thread(read_tail, path, asked.lines, MAX_LOG_BYTES)
    return _json(
        {
            "model": entry.name,
            "source": asked.source,
            "exists": text is not None,
            "lines": (text or "").splitlines(),
        }
    )


async def admin_registry(request: Request) -> Response:
    state = admin(request)
    registry = state.registry
    entries = [
        {
            "name": entry.name,
            "visible": state.visible(entry),
            "entry": redact(registry.raw(entry.name)),
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
