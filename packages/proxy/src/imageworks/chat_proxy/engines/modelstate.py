"""A model's state as the proxy reports it, and the restart accounting behind ``failed``.

    stopped -> starting -> ready -> stopping -> stopped
    starting -> failed (any exception during a start; retried after a backoff)
    ready -> crashed (the engine died; the next request restarts it)
    crashed, crashed, ... -> failed (a crash loop: only a manual activation restarts it)
    ready -> sleeping (vLLM sleep mode: evicted by sleep) -> waking (a request) -> ready

``Restarts`` is plain data and pure arithmetic over the clock it is given, so the backoff and the
crash-loop rule have table-driven tests of their own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

STOPPED, STARTING, READY, STOPPING = "stopped", "starting", "ready", "stopping"
FAILED, CRASHED = "failed", "crashed"
SLEEPING, WAKING = "sleeping", "waking"
# States of unmanaged models: what the last request (or the reconcile loop) saw.
UNKNOWN, UNREACHABLE = "unknown", "unreachable"


@dataclass
class ModelStatus:
    state: str = STOPPED
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    load_ms: float | None = None
    # vLLM sleep mode: the last wake and sleep (measured by the executor), host RAM held asleep.
    wake_ms: float | None = None
    sleep_ms: float | None = None
    host_mb: int | None = None

    def public(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": self.since,
            "last_error": self.last_error,
            "load_ms": self.load_ms,
            "wake_ms": self.wake_ms,
            "sleep_ms": self.sleep_ms,
            "host_mb": self.host_mb if self.state == SLEEPING else None,
        }


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
