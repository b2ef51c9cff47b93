"""Backend kinds, chosen by the registry entry's ``backend`` through this name table."""

from __future__ import annotations

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends.base import Backend, StartRequest
from imageworks.chat_proxy.engines.backends.llamacpp import LlamaCppBackend
from imageworks.chat_proxy.engines.backends.ollama import OllamaBackend
from imageworks.chat_proxy.engines.backends.openai import OpenAIBackend
from imageworks.chat_proxy.engines.backends.ray import RayBackend
from imageworks.chat_proxy.engines.backends.vllm import VllmBackend

BACKEND_KINDS: dict[str, type[Backend]] = {
    cls.kind: cls
    for cls in (VllmBackend, OllamaBackend, LlamaCppBackend, OpenAIBackend, RayBackend)
}


def build_backends(config: ProxyConfig) -> dict[str, Backend]:
    return {kind: cls(config) for kind, cls in BACKEND_KINDS.items()}


__all__ = ["BACKEND_KINDS", "Backend", "StartRequest", "build_backends"]
