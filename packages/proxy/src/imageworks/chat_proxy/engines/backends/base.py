"""What differs between engine kinds, behind one interface: where their OpenAI-compatible API
lives, whether they use the GPU, whether the proxy starts them and how, how their processes are
watched and reconciled, what they hold on the GPU, and what shutdown does to them.

``base_url`` is always the OpenAI-compatible base, ending in ``/v1``. An entry's
``backend_config.base_url`` wins; then ``host``/``port``; then the kind's default. An entry
with an explicit address is *external*: the proxy forwards to it but never starts or stops it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from imageworks.chat_proxy.arbiter.seams import Holding
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.model_loader.schema import ModelEntry

# How a backend learns what the lifecycle knows of a model: (last used, requests in flight).
Usage = Callable[[str], tuple[float, int]]
MakeRoom = Callable[[ModelEntry], Awaitable[None]]


@dataclass(frozen=True)
class StartRequest:
    """What a start needs: the entry, where the engine's log goes, how long it may take to
    answer; ``gpu_share``: the fraction of the GPU the ledger budgets for it (engines that
    reserve a fraction, like vLLM, use it); ``devices``: the GPUs the arbiter placed it on (its
    ``CUDA_VISIBLE_DEVICES``), None: not placed."""

    entry: ModelEntry
    log_path: Path
    timeout: float
    gpu_share: float | None = None
    devices: tuple[int, ...] | None = None


def cuda_env(devices: tuple[int, ...] | None) -> dict[str, str] | None:
    """The environment of an engine placed on ``devices`` (None: the proxy's own)."""
    if not devices:
        return None
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in devices)}


def has_explicit_address(entry: ModelEntry) -> bool:
    bc = entry.backend_config
    return bool(bc.base_url or bc.host or bc.port)


class Backend:
    kind: ClassVar[str]
    default_port: ClassVar[int | None] = None
    # vLLM refuses to guess a chat template (newer transformers), so the entry must name one.
    requires_template: ClassVar[bool] = False
    # Image formats the engine takes inline, when it takes only some (None: any), and whether
    # it can take an image by URL at all (else the proxy must inline it or refuse it).
    image_formats: ClassVar[frozenset[str] | None] = None
    takes_image_urls: ClassVar[bool] = True
    # The name of this kind's step in the shutdown record; None: it has nothing to do then.
    shutdown_step: ClassVar[str | None] = None
    # Set where the kind's GPUs are budgeted by someone else (``/v1/gpu/status`` says by whom).
    budgeted_elsewhere: ClassVar[str | None] = None

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def attach(self, session: aiohttp.ClientSession) -> None:
        """Give the backend the app's HTTP pool (owned by the lifespan)."""
        self._session = session

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "backend used before the app started"
        return self._session

    def base_url(self, entry: ModelEntry) -> str:
        bc = entry.backend_config
        if bc.base_url:
            return bc.base_url.rstrip("/")
        if bc.host and bc.host.startswith(("http://", "https://")):
            return bc.host.rstrip("/") + "/v1"
        port = bc.port or self.default_port
        if bc.host or bc.port:
            if not port:
                raise BackendUnavailable(f"model {entry.name!r} has a host but no port")
            return f"http://{bc.host or '127.0.0.1'}:{port}/v1"
        return self.default_base_url(entry)

    def default_base_url(self, entry: ModelEntry) -> str:
        raise BackendUnavailable(
            f"model {entry.name!r} ({self.kind}) has no backend_config.base_url, host or port"
        )

    def location(self, entry: ModelEntry) -> dict[str, Any]:
        """Where ``entry`` runs, as ``/admin/state`` and ``imageworks-models list`` show it."""
        return {"kind": "local"}

    def uses_gpu(self, entry: ModelEntry) -> bool:
        """Does serving ``entry`` take GPU memory (and so wait while the GPU is lent)? Engines
        other than vLLM do when the entry declares a need (the embedded CPU model declares 0
        and keeps working while the GPU is lent out)."""
        return (entry.vram_estimate_mb or 0) > 0

    # --- lifecycle: only kinds the proxy starts override these --------------------------------

    def slot_key(self, entry: ModelEntry) -> str | None:
        """Models with the same key cannot run at once; None: the proxy does not manage it."""
        return None

    def configure(self, *, budgeted: bool) -> None:
        """Told once at start-up whether the GPU has a budget to enforce (a measured or a
        declared total); a kind that runs several models at once only where the budget says
        they fit (vLLM) decides here."""

    async def start(self, request: StartRequest) -> str:
        """Start ``request.entry`` and return its OpenAI base URL once it answers. On any
        failure nothing it spawned may be left running."""
        raise NotImplementedError(f"{self.kind} models are not started by the proxy")

    async def stop(self, name: str) -> None:
        """Stop ``name`` and wait until it is gone (a no-op for one that is not running)."""

    def sleepable(self, entry: ModelEntry) -> bool:
        """Can ``entry`` leave the GPU by sleeping rather than stopping (vLLM sleep mode)?"""
        return False

    async def sleep(self, name: str) -> dict[str, Any]:
        """Put ``name`` to sleep: ``{"sleep_ms", "host_mb"}`` as measured."""
        raise NotImplementedError(f"{self.kind} models do not sleep")

    async def wake(self, name: str) -> float:
        """Wake ``name``; returns the measured wake time, ms."""
        raise NotImplementedError(f"{self.kind} models do not sleep")

    def supervise(self, name: str, on_exit: Callable[[str], None]) -> None:
        """Arrange for ``on_exit(why)`` to be called as soon as ``name``'s engine dies. Kinds
        whose process the proxy does not parent rely on ``reconcile`` instead."""

    async def reconcile(self, entry: ModelEntry) -> bool | None:
        """Is the engine the proxy believes ready for ``entry`` still there? None: cannot tell
        now (e.g. its supervisor is unreachable), so nothing changes."""
        return None

    async def recover(self, entries: Iterable[ModelEntry]) -> dict[str, str]:
        """After a restart: engines an earlier proxy started that are still ours, adopted and
        healthy, as {model name: base URL}; anything else it left behind is stopped."""
        return {}

    def pid_of(self, name: str) -> int | None:
        """The process serving ``name`` on this host, if known (to learn its VRAM footprint)."""
        return None

    # --- models the proxy does not start but that hold the GPU (Ollama) -----------------------

    async def prepare(self, entry: ModelEntry, make_room: MakeRoom) -> None:
        """Before forwarding to an unmanaged model (e.g. make room before Ollama loads it)."""

    async def load(self, entry: ModelEntry) -> None:
        """Load an unmanaged model again (after a lease that evicted it ended)."""

    async def holdings(self, entries: list[ModelEntry], usage: Usage) -> list[Holding]:
        """What this kind holds on the GPU beyond the proxy's slots (and foreign models)."""
        return []

    async def observed(self, entries: list[ModelEntry]) -> dict[str, str]:
        """States of unmanaged models seen from the engine itself (reconcile loop)."""
        return {}

    async def shutdown(self, entries: list[ModelEntry]) -> str | None:
        """At proxy shutdown, after the slots were stopped: release what this kind still holds
        for us (never what others loaded). Returns a note for the shutdown record."""
        return None

    async def close(self) -> None:
        """Release whatever the backend still holds (processes) at shutdown."""
