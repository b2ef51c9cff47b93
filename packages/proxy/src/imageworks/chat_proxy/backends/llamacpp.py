from __future__ import annotations

from imageworks.chat_proxy.backends.base import Backend


class LlamaCppBackend(Backend):
    """A llama.cpp server (``llama-server`` or xllamacpp) speaking the OpenAI API."""

    kind = "llamacpp"
