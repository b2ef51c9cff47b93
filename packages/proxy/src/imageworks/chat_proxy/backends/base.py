"""What differs between engine kinds: where their OpenAI-compatible API lives and what they need.

``base_url`` is always the OpenAI-compatible base, ending in ``/v1``. An entry's
``backend_config.base_url`` wins; then ``host``/``port``; then the kind's default.
"""

from __future__ import annotations

from typing import ClassVar

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.model_loader.schema import ModelEntry


class Backend:
    kind: ClassVar[str]
    default_port: ClassVar[int | None] = None
    # vLLM refuses to guess a chat template (newer transformers), so the entry must name one.
    requires_template: ClassVar[bool] = False

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config

    def base_url(self, entry: ModelEntry) -> str:
        bc = entry.backend_config
        if bc.base_url:
            return bc.base_url.rstrip("/")
        if bc.host and bc.host.startswith(("http://", "https://")):
            return bc.host.rstrip("/") + "/v1"
        port = bc.port or self.default_port
        if bc.host or port:
            if not port:
                raise BackendUnavailable(f"model {entry.name!r} has a host but no port")
            return f"http://{bc.host or '127.0.0.1'}:{port}/v1"
        return self.default_base_url(entry)

    def default_base_url(self, entry: ModelEntry) -> str:
        raise BackendUnavailable(
            f"model {entry.name!r} ({self.kind}) has no backend_config.base_url, host or port"
        )
