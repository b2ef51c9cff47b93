"""Loading that tells the truth: how long a model has been loading, and how long it usually takes.

The expectation is what this model took last time (its learned ``load_ms``, or ``wake_ms`` when
it wakes from sleep rather than starting cold); before its first load there is none, and the
text says only the time so far. A load past twice its expectation says so.

    : loading qwen (4.2 s of about 11 s)
    : loading qwen (25.0 s, slower than its usual 11 s)
    : loading qwen (1.3 s)
    : loading qwen (0.1 s of about 0.3 s, waking from sleep)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

SLOW_FACTOR = 2.0


@dataclass(frozen=True)
class Progress:
    elapsed_s: float
    expected_s: float | None  # None: never loaded before
    kind: str = "load"  # or "wake"

    @property
    def slow(self) -> bool:
        return self.expected_s is not None and self.elapsed_s > SLOW_FACTOR * self.expected_s

    @property
    def left_s(self) -> float | None:
        if self.expected_s is None:
            return None
        return max(0.0, self.expected_s - self.elapsed_s)

    def text(self) -> str:
        """What goes in the brackets: ``4.2 s of about 11 s``."""
        so_far = f"{self.elapsed_s:.1f} s"
        waking = ", waking from sleep" if self.kind == "wake" else ""
        if self.expected_s is None:
            return f"{so_far}{waking}"
        usual = _seconds(self.expected_s)
        if self.slow:
            return f"{so_far}, slower than its usual {usual}{waking}"
        return f"{so_far} of about {usual}{waking}"

    def public(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "elapsed_s": round(self.elapsed_s, 1),
            "expected_s": None if self.expected_s is None else round(self.expected_s, 1),
            "left_s": None if self.left_s is None else round(self.left_s, 1),
            "slow": self.slow,
        }


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def progress(
    since: float, expected_ms: float | None, *, now: float | None = None, kind: str = "load"
) -> Progress:
    """``since``: wall-clock seconds when the load began; ``expected_ms``: the learned time."""
    elapsed = max(0.0, (time.time() if now is None else now) - since)
    return Progress(elapsed, None if not expected_ms else expected_ms / 1000, kind)


def comment(name: str, state: Progress) -> bytes:
    """The SSE comment a waiting client gets (a line starting with ``:`` is ignored by SSE
    parsers, so it is safe for any client)."""
    return f": loading {name} ({state.text()})\n\n".encode()
