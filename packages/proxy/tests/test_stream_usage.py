"""Usage read from the tail of an OpenAI-style stream, in both shapes vLLM has sent: 0.32 leaves
``usage`` out of every chunk but the last (the fake vLLM does the same); older releases put
``"usage": null`` on every chunk, which must not hide the real counts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imageworks.chat_proxy.request.streams import OPENAI

USAGE = {"prompt_tokens": 31, "completion_tokens": 8, "total_tokens": 39}


def stream(null_usage: bool) -> bytes:
    chunks: list[dict[str, Any]] = [
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}}]}
        for w in ("Paris", ".")
    ]
    if null_usage:
        for chunk in chunks:
            chunk["usage"] = None
    chunks.append({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    if null_usage:  # a chunk after it with "usage": null must not win either
        chunks.append({"object": "chat.completion.chunk", "choices": [], "usage": None})
    lines = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    return b"".join(lines) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("null_usage", [False, True], ids=["vllm-0.32", "older-vllm"])
def test_the_usage_chunk_is_found(null_usage: bool) -> None:
    usage, error = OPENAI.account(b"", stream(null_usage))
    assert usage == USAGE and error is None


def test_no_usage_chunk_is_no_usage() -> None:
    body = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": null}\n\n'
    assert OPENAI.account(b"", body + b"data: [DONE]\n\n") == (None, None)
