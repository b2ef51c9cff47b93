"""Per-model lifecycle: which models are in use, and where to send a model's requests.

The proxy core forwards to backends that are already running; starting and stopping engines
hooks in at ``acquire`` (the only way a request gets a base URL), so callers never
check-then-act on model state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from imageworks.chat_proxy.backends import Backend
from imageworks.model_loader.schema import ModelEntry

# The state of a model the proxy does not manage: it only knows what the last request saw.
UNKNOWN, READY, UNREACHABLE = "unknown", "ready", "unreachable"


@dataclass
class Ticket:
    """One request's hold on a model; ``release`` exactly once when the response is done."""

    lifecycle: Lifecycle
    name: str
    base_url: str
    released: bool = field(default=False)

    def release(self, *, reached: bool | None = None) -> None:
        if self.released:
            return
        self.released = True
        self.lifecycle._release(self.name, reached)


class Lifecycle:
    def __init__(self, backends: dict[str, Backend]) -> None:
        self.backends = backends
        self.in_flight: Counter[str] = Counter()
        self.states: dict[str, str] = {}
        # Bumped on every state change so cached views (the model list) know to refresh.
        self.version = 0

    def backend(self, entry: ModelEntry) -> Backend:
        return self.backends[entry.backend]

    async def acquire(self, entry: ModelEntry) -> Ticket:
        base_url = self.backend(entry).base_url(entry)
        self.in_flight[entry.name] += 1
        return Ticket(self, entry.name, base_url)

    def state(self, name: str) -> str:
        return self.states.get(name, UNKNOWN)

    def _release(self, name: str, reached: bool | None) -> None:
        self.in_flight[name] -= 1
        if self.in_flight[name] <= 0:
            del self.in_flight[name]
        if reached is not None:
            state = READY if reached else UNREACHABLE
            if self.states.get(name) != state:
                self.states[name] = state
                self.version += 1
