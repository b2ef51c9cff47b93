from __future__ import annotations

from imageworks.chat_proxy.backends.base import Backend


class VllmBackend(Backend):
    """A vLLM OpenAI server. The executor launches it on 24001 (DESIGN.md §6)."""

    kind = "vllm"
    default_port = 24001
    requires_template = True
