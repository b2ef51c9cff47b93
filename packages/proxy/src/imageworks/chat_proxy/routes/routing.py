"""Resolve and route: the entry a model name reaches (this box's, or a peer's), and how far its
load has come (the ``: loading <model> (4.2 s of about 11 s)`` comments of a stream that waits).
"""

from __future__ import annotations

from imageworks.chat_proxy.engines.modelstate import READY, STARTING, WAKING
from imageworks.chat_proxy.errors import ModelNotFound
from imageworks.chat_proxy.observe.progress import Progress, comment, progress
from imageworks.chat_proxy.server.state import ProxyState
from imageworks.model_loader.errors import UnknownModelError
from imageworks.model_loader.schema import ModelEntry


def route(state: ProxyState, name: str, forwarded: bool) -> ModelEntry:
    """The entry a request for ``name`` goes to: this box's, or a peer's (never for a request a
    peer forwarded: one hop at most)."""
    if forwarded or not state.peers:
        return resolve(state, name)
    try:
        local: ModelEntry | None = resolve(state, name)
    except ModelNotFound as exc:
        local, missing = None, exc
    warm = local is not None and state.lifecycle.state(local) == READY
    elsewhere = state.peers.route(name, local, warm)
    if elsewhere is not None:
        return elsewhere
    if local is None:
        raise missing
    return local


def resolve(state: ProxyState, name: str) -> ModelEntry:
    try:
        entry = state.registry.resolve(name)
    except UnknownModelError as exc:
        hint = f"; did you mean {', '.join(map(repr, exc.suggestions))}?" if exc.suggestions else ""
        raise ModelNotFound(
            f"The model '{name}' does not exist{hint} (see GET /v1/models)", param="model"
        ) from None
    if not state.visible(entry):
        why = (
            f"is not offered in deployment profile '{state.profile.name}'"
            if entry.servable and not entry.deprecated
            else "is deprecated"
            if entry.deprecated
            else f"uses backend '{entry.backend}', which this proxy does not serve"
        )
        raise ModelNotFound(f"The model '{name}' {why} (see GET /v1/models)", param="model")
    return entry


def loading_comment(state: ProxyState, entry: ModelEntry, asked: float) -> bytes:
    """``: loading <model> (4.2 s of about 11 s)``: time since its start began (since the
    request began waiting, while it waits for its turn), of its learned load time."""
    return comment(entry.name, loading_progress(state, entry, asked))


def loading_progress(state: ProxyState, entry: ModelEntry, asked: float | None = None) -> Progress:
    status = state.lifecycle.status(entry)
    if status.state == WAKING:  # a wake, of about its learned wake time
        return progress(status.since, status.wake_ms, kind="wake")
    starting = status.state == STARTING
    since = status.since if starting or asked is None else asked
    return progress(since, status.load_ms)
