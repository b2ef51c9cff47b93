from __future__ import annotations

from imageworks.chat_proxy.engines.backends.base import Backend


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server at ``backend_config.base_url``."""

    kind = "openai"
