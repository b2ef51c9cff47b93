"""A model's state, the one table of the moves between states, and the restart accounting
behind ``failed``.

Every model has one ``State``, kept in the lifecycle's ``StatusBook``: the slot of a managed
model moves it as the engine starts, serves, crashes and stops (the book is the slot's state,
not a copy of it); an unmanaged model's state is what the last request or reconcile saw.
``MOVES`` lists every move the book accepts; anything else is a bug and raises.

    stopped -> starting -> ready -> stopping -> stopped
    starting -> failed (any exception during a start; retried after a backoff)
    starting -> stopped (a start abandoned at shutdown)
    ready -> crashed (the engine died; the next request restarts it)
    ready -> failed (a crash that makes a crash loop: only a manual activation restarts it)
    crashed, failed -> starting (the next start); crashed -> stopped (an operator's activate)
    starting, crashed, failed -> stopping (shutdown, after a cancelled start or reap)
    ready -> sleeping (vLLM sleep mode: evicted by sleep, weights to host RAM) -> waking (a
    request for it) -> ready; sleeping -> stopping (evicted for good, a failed sleep, shutdown);
    sleeping -> crashed or failed (its engine died asleep); waking -> failed (no room, or the
    wake failed), waking -> stopping (shutdown during a wake)
    unmanaged: unknown, ready, stopped, unreachable, in any order (and -> starting once the
    registry makes the model a managed one)

Adding a state is one member of ``State`` and its rows in ``MOVES`` (and, where it holds the
GPU or counts as loaded, ``LOADED``).

``Restarts`` is plain data and pure arithmetic over the clock it is given, so the backoff and the
crash-loop rule have table-driven tests of their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ModelBackoff,
    ModelStartFailed,
    ProxyError,
)
from imageworks.chat_proxy.redact import redact_text
from imageworks.model_loader.schema import ModelEntry


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"
    CRASHED = "crashed"
    # vLLM sleep mode: resident (its weights in host RAM, its engine alive), not on the GPU.
    SLEEPING = "sleeping"
    WAKING = "waking"
    # States of unmanaged models: what the last request (or the reconcile loop) saw.
    UNKNOWN = "unknown"
    UNREACHABLE = "unreachable"


STOPPED, STARTING, READY, STOPPING = State.STOPPED, State.STARTING, State.READY, State.STOPPING
FAILED, CRASHED, UNKNOWN, UNREACHABLE = (
    State.FAILED,
    State.CRASHED,
    State.UNKNOWN,
    State.UNREACHABLE,
)
SLEEPING, WAKING = State.SLEEPING, State.WAKING

_PASSIVE = frozenset({UNKNOWN, READY, STOPPED, UNREACHABLE})

# Every move the book accepts: from -> the states it may go to (staying put is always allowed).
# An unmanaged model's state may also go to STARTING: the registry made it a managed one. Any
# state with an engine may go to STOPPING: shutdown stops whatever a cancelled task left.
MOVES: dict[State, frozenset[State]] = {
    STOPPED: frozenset({STARTING}) | _PASSIVE,  # READY: an engine adopted at start-up
    STARTING: frozenset({READY, FAILED, STOPPED, STOPPING}),
    READY: frozenset({STARTING, STOPPING, CRASHED, FAILED, SLEEPING}) | _PASSIVE,
    STOPPING: frozenset({STOPPED}),
    FAILED: frozenset({STARTING, STOPPED, STOPPING}),
    CRASHED: frozenset({STARTING, STOPPED, STOPPING}),
    SLEEPING: frozenset({WAKING, STOPPING, CRASHED, FAILED}),
    WAKING: frozenset({READY, FAILED, STOPPING}),
    UNKNOWN: frozenset({STARTING}) | _PASSIVE,
    UNREACHABLE: frozenset({STARTING}) | _PASSIVE,
}

# The states in which a model has (or is getting) an engine: where it runs is worth showing.
LOADED = frozenset({READY, STARTING, STOPPING, SLEEPING, WAKING})


class IllegalMove(RuntimeError):
    """A move ``MOVES`` does not list: a bug in whoever asked for it."""


@dataclass
class ModelStatus:
    state: State = STOPPED
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    load_ms: float | None = None
    # vLLM sleep mode: the last wake and sleep (measured by the executor), host RAM held asleep.
    wake_ms: float | None = None
    sleep_ms: float | None = None
    host_mb: int | None = None

    def public(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "since": self.since,
            "last_error": None if self.last_error is None else redact_text(self.last_error),
            "load_ms": self.load_ms,
            "wake_ms": self.wake_ms,
            "sleep_ms": self.sleep_ms,
            "host_mb": self.host_mb if self.state == SLEEPING else None,
        }


_KEEP: Any = object()
_FIGURES = ("load_ms", "wake_ms", "sleep_ms", "host_mb")


class StatusBook:
    """The state of every model, changed only through ``move``; ``version`` counts the changes
    (cached views such as the model list refresh when it moves on)."""

    def __init__(self, on_change: Callable[[str, State], None] | None = None) -> None:
        self.statuses: dict[str, ModelStatus] = {}
        self.version = 0
        self.on_change = on_change  # told of every change of state (not of the figures)

    def get(self, name: str) -> ModelStatus | None:
        return self.statuses.get(name)

    def state(self, name: str, default: State = STOPPED) -> State:
        status = self.statuses.get(name)
        return status.state if status is not None else default

    def move(
        self,
        name: str,
        to: State,
        *,
        error: str | None = _KEEP,
        load_ms: float | None = None,
        **measured: float | int | None,
    ) -> None:
        """Move ``name`` to ``to``. ``error``: the new last error (None clears it; left out, the
        old one stays); ``load_ms`` (how long the start took) and ``measured`` (``wake_ms``,
        ``sleep_ms``, ``host_mb``): new figures (left out or None: the old ones stay)."""
        if not set(measured) <= set(_FIGURES):
            raise TypeError(f"unknown figures: {sorted(set(measured) - set(_FIGURES))}")
        current = self.statuses.get(name)
        figures = {k: v for k, v in {"load_ms": load_ms, **measured}.items() if v is not None}
        if current is not None and current.state == to and error is _KEEP and not figures:
            return
        if current is not None and to != current.state and to not in MOVES[current.state]:
            raise IllegalMove(f"{name}: {current.state} -> {to}")
        status = ModelStatus(
            state=to,
            last_error=(current.last_error if current else None) if error is _KEEP else error,
        )
        for key in _FIGURES:
            value = figures.get(key, getattr(current, key) if current else None)
            setattr(status, key, value)
        self.statuses[name] = status
        self.version += 1
        if self.on_change is not None and (current is None or current.state != to):
            self.on_change(name, to)


@dataclass
class Restarts:
    """When a model may be started again. Times are monotonic seconds."""

    base_s: float = 1.0
    max_s: float = 60.0
    loop_limit: int = 5
    window_s: float = 600.0
    failures: int = 0  # consecutive failed starts
    retry_at: float = 0.0
    crashes: list[float] = field(default_factory=list)
    halted: str | None = None  # a crash loop: no automatic start until reset by hand

    def _delay(self, n: int) -> float:
        return float(min(self.max_s, self.base_s * 2 ** max(0, n - 1)))

    def start_failed(self, now: float) -> None:
        self.failures += 1
        self.retry_at = now + self._delay(self.failures)

    def started(self) -> None:
        self.failures, self.retry_at = 0, 0.0

    def crashed(self, now: float) -> bool:
        """Count a crash; True when it makes a crash loop. The first crash in the window is
        restarted at once, later ones after a growing backoff."""
        self.crashes = [t for t in self.crashes if now - t < self.window_s] + [now]
        if len(self.crashes) >= self.loop_limit:
            self.halted = (
                f"crash loop: {len(self.crashes)} crashes within {self.window_s:.0f} s; "
                "not restarted automatically until activated by hand"
            )
            return True
        if len(self.crashes) > 1:
            self.retry_at = now + self._delay(len(self.crashes) - 1)
        return False

    def wait_s(self, now: float) -> float:
        return max(0.0, self.retry_at - now)

    def retry_after(self, now: float) -> str:
        return str(max(1, math.ceil(self.wait_s(now))))

    def reset(self) -> None:
        self.failures, self.retry_at, self.crashes, self.halted = 0, 0.0, [], None

    def public(self, now: float) -> dict[str, Any]:
        return {
            "consecutive_failures": self.failures,
            "recent_crashes": len([t for t in self.crashes if now - t < self.window_s]),
            "retry_in_s": round(self.wait_s(now), 2),
            "halted": self.halted,
        }


def start_refusal(
    entry: ModelEntry, restarts: Restarts, status: ModelStatus | None
) -> ProxyError | None:
    """Why ``entry`` must not be started automatically now (None: it may): a crash loop, a
    crash under ``restart: never``, or a backoff that has not run out."""
    name, now = entry.name, time.monotonic()
    last = status.last_error if status else None
    if restarts.halted:
        return ModelStartFailed(
            f"model {name!r} is failed ({restarts.halted}; last crash: {last}); start it "
            f"with 'imageworks-models activate-model {name}' or POST /admin/activate"
        )
    crashed = status is not None and status.state == CRASHED
    if crashed and entry.restart == "never":
        return BackendUnavailable(
            f"model {name!r} crashed ({last}) and its restart policy is 'never'; start it "
            f"with 'imageworks-models activate-model {name}' or POST /admin/activate"
        )
    wait = restarts.wait_s(now)
    if wait > 0:
        return ModelBackoff(
            f"model {name!r} is not restarted for another {wait:.1f} s after "
            f"{'a crash' if crashed else 'a failed start'} (last error: {last})",
            headers={"Retry-After": restarts.retry_after(now)},
        )
    return None
