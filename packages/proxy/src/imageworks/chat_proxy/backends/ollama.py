from __future__ import annotations

from imageworks.chat_proxy.backends.base import Backend
from imageworks.model_loader.schema import ModelEntry


class OllamaBackend(Backend):
    """Ollama, through its OpenAI-compatible ``/v1`` API; the shared server by default."""

    kind = "ollama"

    def default_base_url(self, entry: ModelEntry) -> str:
        return self.config.ollama_base_url + "/v1"
