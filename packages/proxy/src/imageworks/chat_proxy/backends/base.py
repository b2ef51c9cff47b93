"""What differs between engine kinds: where their OpenAI-compatible API lives, whether the
proxy starts them, and how.

``base_url`` is always the OpenAI-compatible base, ending in ``/v1``. An entry's
``backend_config.base_url`` wins; then ``host``/``port``; then the kind's default. An entry
with an explicit address is *external*: the proxy forwards to it but never starts or stops it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import aiohttp

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.model_loader.schema import ModelEntry


def has_explicit_address(entry: ModelEntry) -> bool:
    bc = entry.backend_config
    return bool(bc.base_url or bc.host or bc.port)


class Backend:
    kind: ClassVar[str]
    default_port: ClassVar[int | None] = None
    # vLLM refuses to guess a chat template (newer transformers), so the entry must name one.
    requires_template: ClassVar[bool] = False

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

    # --- lifecycle: only kinds the proxy starts override these --------------------------------

    def slot_key(self, entry: ModelEntry) -> str | None:
        """Models with the same key cannot run at once; None: the proxy does not manage it."""
        return None

    async def start(self, entry: ModelEntry, log_path: Path, timeout: float) -> str:
        """Start ``entry`` and return its OpenAI base URL once it answers."""
        raise NotImplementedError(f"{self.kind} models are not started by the proxy")

    async def stop(self, name: str) -> None:
        """Stop ``name`` and wait until it is gone."""

    def pid_of(self, name: str) -> int | None:
        """The process serving ``name`` on this host, if known (to learn its VRAM footprint)."""
        return None

    async def close(self) -> None:
        """Release whatever the backend still holds (processes) at shutdown."""
