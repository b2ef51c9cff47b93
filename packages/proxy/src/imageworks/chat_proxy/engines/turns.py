"""A slot's queue, the parts that need no slot: a request's hold on a model (``Ticket``), a
request waiting for its turn (``Waiter``), the collation rule (``Collation``) and the error
of a wait that ran out (``wait_error``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from imageworks.chat_proxy.errors import ModelStartTimeout, ProxyError, QueueFull


@dataclass
class Ticket:
    """One request's hold on a model; ``release`` exactly once when its response is done."""

    name: str
    base_url: str
    wait_ms: float
    loaded: bool
    _on_release: Any = None
    released: bool = False

    def release(self, *, reached: bool | None = None) -> None:
        if not self.released:
            self.released = True
            self._on_release(reached)


@dataclass(eq=False)
class Waiter:
    name: str
    since: float = 0.0  # monotonic: when it began waiting


@dataclass(frozen=True)
class Collation:
    """Collation in a shared slot (ABAB -> AABB): once another model has claimed the slot's
    next turn, a request for the model that runs now may still go first, up to ``most`` of them
    per claim, and only while no request for the claiming model has waited ``wait_s``
    (``CHAT_PROXY_COLLATE_MAX``, ``CHAT_PROXY_COLLATE_WAIT_S``). ``most`` 0: off, strict turns."""

    most: int = 0
    wait_s: float = 0.0

    def allows(self, admitted: int, claimants_since: Iterable[float], now: float) -> bool:
        """May one more go first, ``admitted`` having gone first already since the claim?"""
        if admitted >= self.most:
            return False
        oldest = min(claimants_since, default=None)
        return oldest is None or now - oldest < self.wait_s


STRICT_TURNS = Collation()  # collation off


def exception_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def wait_error(
    name: str, queue_timeout: float, *, loading: bool, active: str | None, in_flight: int
) -> ProxyError:
    """The answer to a request whose wait ran out: its model is still loading (504), or
    another model still holds the slot (503)."""
    if loading:
        return ModelStartTimeout(
            f"model {name!r} is still loading; try again shortly", headers={"Retry-After": "10"}
        )
    busy = (
        f"{active!r} is still serving {in_flight} request(s)"
        if active and in_flight
        else "the backend is busy switching models"
    )
    return QueueFull(
        f"model {name!r} waited {queue_timeout:.0f} s for its turn: {busy}",
        headers={"Retry-After": "10"},
    )
