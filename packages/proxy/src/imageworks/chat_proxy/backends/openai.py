from __future__ import annotations

from imageworks.chat_proxy.backends.base import Backend


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server at ``backend_config.base_url``."""

    kind = "openai"
