"""What a slot may ask of the lifecycle that owns it, and nothing more: the slot never sees
the whole ``Lifecycle`` (which owns the slots, and so would make a circle of imports)."""

from __future__ import annotations

from typing import Any, Protocol

from imageworks.chat_proxy.engines.backends import StartRequest
from imageworks.chat_proxy.engines.turns import Collation
from imageworks.chat_proxy.errors import ProxyError
from imageworks.model_loader.schema import ModelEntry


class SlotOwner(Protocol):
    """What a slot may ask of the lifecycle that owns it."""

    start_timeout: float
    collation: Collation  # in a shared slot: who may go before a claimed swap

    def may_start(self, entry: ModelEntry) -> None:
        """Raise if ``entry`` must not be started automatically now (backoff, crash loop)."""
        ...

    async def room_for(self, entry: ModelEntry) -> StartRequest:
        """Make room on the GPU for ``entry`` (raise if there is none) and say how to start it."""
        ...

    async def learn(self, entry: ModelEntry, pid: int | None) -> None:
        """``entry`` is ready: learn what its process holds on the GPU."""
        ...

    def started(self, entry: ModelEntry, load_ms: float) -> None: ...

    def start_failed(self, entry: ModelEntry, error: ProxyError, *, backoff: bool) -> None: ...

    def slept(self, entry: ModelEntry, found: dict[str, Any]) -> None:
        """``entry`` sleeps (vLLM sleep mode); ``found``: the executor's sleep_ms, host_mb."""
        ...

    def woke(self, entry: ModelEntry, wake_ms: float) -> None:
        """``entry`` woke from sleep in ``wake_ms`` (measured): it serves again."""
        ...

    def crashed(self, name: str, why: str) -> bool:
        """Count a crash of ``name``'s engine; True when it makes a crash loop."""
        ...

    def touch(self, name: str) -> None:
        """``name`` served a request: its idle time starts again."""
        ...

    def event(self, event: str, **fields: Any) -> None:
        """A lifecycle event for the request log."""
        ...
