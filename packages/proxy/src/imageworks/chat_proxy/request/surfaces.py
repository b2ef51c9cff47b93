"""The endpoint table: one row per surface the proxy forwards, and what differs between them.

A row says the surface's paths, how its body is read (``json``, ``multipart``, ``raw``), where
the model name is (``body``, ``form``, ``path``), how the body is checked, the error envelope
(``openai``, ``anthropic``), the stream format (``request/streams.py``; None: never streamed),
the capability a model needs, the protocol a backend must speak (``PROTOCOLS`` per backend
kind; an entry's ``protocols`` for an external server says its own) and the path under the
engine's OpenAI base. Usage is read from the answer's ``usage`` (streamed: by the format) and
normalised to prompt/completion tokens in the record. Adding a surface is a row here, its
checks and its tests (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imageworks.chat_proxy.errors import InvalidRequest
from imageworks.chat_proxy.request import payloads
from imageworks.chat_proxy.request.payloads import CHAT, COMPLETIONS, EMBEDDINGS
from imageworks.chat_proxy.request.streams import ANTHROPIC, OPENAI, RESPONSES, StreamFormat
from imageworks.model_loader.schema import ModelEntry

RESPONSES_NAME, MESSAGES, COUNT_TOKENS = "responses", "messages", "count_tokens"
RERANK, TRANSCRIBE, SPEECH, UPSTREAM = "rerank", "audio", "speech", "upstream"


@dataclass(frozen=True, slots=True)
class Surface:
    name: str  # the endpoint label in the JSONL record and /metrics
    paths: tuple[str, ...]
    upstream: str  # the path under the engine's OpenAI base (.../v1)
    validate: Callable[[dict[str, Any]], str]  # the body's checks; returns the model name
    body: str = "json"  # json | multipart | raw
    model_at: str = "body"  # body | form | path
    envelope: str = "openai"  # openai | anthropic
    stream: StreamFormat | None = OPENAI  # None: the answer is never a stream
    capability: str | None = None  # a capabilities flag the model's entry must set
    protocol: str = ""  # what the backend must speak; "" is the surface's name
    model_checks: bool = False  # a generation: no embedding-only model; usage estimated if absent

    @property
    def speaks(self) -> str:
        return self.protocol or self.name


def _model(body: dict[str, Any]) -> str:
    return payloads.validate_common(body)


def _generation(body: dict[str, Any]) -> str:
    model = payloads.validate_common(body)
    payloads.validate_sampling(body)
    return model


def _optional(body: dict[str, Any], name: str, kind: type) -> None:
    value = body.get(name)
    if value is not None and (
        not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)
    ):
        raise InvalidRequest(f"'{name}' must be a {kind.__name__}", param=name)


def _responses(body: dict[str, Any]) -> str:
    model = _generation(body)
    _optional(body, "previous_response_id", str)
    _optional(body, "background", bool)
    _optional(body, "max_output_tokens", int)
    value = body.get("input")
    if value is not None and not isinstance(value, str | list):
        raise InvalidRequest("'input' must be a string or a list of items", param="input")
    return model


def _messages(body: dict[str, Any], *, counting: bool = False) -> str:
    model = _generation(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"'messages[{index}]' must be an object with a 'role'", param=f"messages.{index}"
            )
    tokens = body.get("max_tokens")
    if not counting and not (isinstance(tokens, int) and not isinstance(tokens, bool)):
        raise InvalidRequest("'max_tokens' is required (an integer)", param="max_tokens")
    return model


def _rerank(body: dict[str, Any]) -> str:
    model = _model(body)
    if not isinstance(body.get("query"), str):
        raise InvalidRequest("'query' is required (a string)", param="query")
    if not isinstance(body.get("documents"), list):
        raise InvalidRequest("'documents' is required (a list)", param="documents")
    return model


def _speech(body: dict[str, Any]) -> str:
    model = _model(body)
    if not isinstance(body.get("input"), str):
        raise InvalidRequest("'input' is required (the text to speak)", param="input")
    return model


SURFACES = (
    Surface(
        CHAT,
        ("/v1/chat/completions", "/chat/completions"),
        "/chat/completions",
        lambda body: payloads.validate(CHAT, body),
        model_checks=True,
    ),
    Surface(
        COMPLETIONS,
        ("/v1/completions", "/completions"),
        "/completions",
        lambda body: payloads.validate(COMPLETIONS, body),
        model_checks=True,
    ),
    Surface(
        EMBEDDINGS,
        ("/v1/embeddings", "/embeddings"),
        "/embeddings",
        lambda body: payloads.validate(EMBEDDINGS, body),
        stream=None,
        capability="embedding",
        model_checks=True,  # the embedding check itself
    ),
    Surface(
        RESPONSES_NAME,
        ("/v1/responses", "/responses"),
        "/responses",
        _responses,
        stream=RESPONSES,
        model_checks=True,
    ),
    Surface(
        MESSAGES,
        ("/v1/messages",),
        "/messages",
        _messages,
        envelope="anthropic",
        stream=ANTHROPIC,
        model_checks=True,
    ),
    Surface(
        COUNT_TOKENS,
        ("/v1/messages/count_tokens",),
        "/messages/count_tokens",
        lambda body: _messages(body, counting=True),
        envelope="anthropic",
        stream=None,
        protocol=MESSAGES,
    ),
    Surface(
        RERANK,
        ("/v1/rerank", "/rerank", "/v2/rerank"),
        "/rerank",
        _rerank,
        stream=None,
        capability="rerank",
    ),
    Surface(
        TRANSCRIBE,
        ("/v1/audio/transcriptions",),
        "/audio/transcriptions",
        _model,
        body="multipart",
        model_at="form",
        capability="audio",
    ),
    Surface(
        "audio_translation",
        ("/v1/audio/translations",),
        "/audio/translations",
        _model,
        body="multipart",
        model_at="form",
        capability="audio",
        protocol=TRANSCRIBE,
    ),
    Surface(
        SPEECH, ("/v1/audio/speech",), "/audio/speech", _speech, stream=None, capability="speech"
    ),
)
BY_PATH = {path: surface for surface in SURFACES for path in surface.paths}
# The raw engine routes (/upstream/{model}/{path}): the body as it came, the model in the path.
RAW = Surface(UPSTREAM, (), "", _model, body="raw", model_at="path", stream=None)
# GET/DELETE /v1/responses/{id}, .../cancel, .../input_items: the model is the one that made it.
RESPONSE_BY_ID = Surface(
    "response_by_id", (), "", _model, body="raw", model_at="response", stream=None
)

# What each backend kind speaks (an entry's ``protocols`` overrides it: an external server).
_GENERATION = frozenset({CHAT, COMPLETIONS, EMBEDDINGS})
PROTOCOLS: dict[str, frozenset[str]] = {
    "llamacpp": _GENERATION | {RESPONSES_NAME, MESSAGES, RERANK},
    "vllm": _GENERATION | {RESPONSES_NAME, MESSAGES, RERANK, TRANSCRIBE},
    "ollama": _GENERATION | {RESPONSES_NAME, MESSAGES},
    "openai": _GENERATION | {RESPONSES_NAME, TRANSCRIBE, SPEECH},
    "ray": _GENERATION,
}
# A peer is another ImageWorks proxy: it speaks every surface and judges for itself.
_EVERY = frozenset(s.speaks for s in SURFACES)


def speaks(entry: ModelEntry) -> frozenset[str]:
    if entry.protocols is not None:
        return frozenset(entry.protocols)
    if entry.metadata.get("peer"):
        return _EVERY
    return PROTOCOLS.get(entry.backend, _GENERATION)


# --- raw engine routes -----------------------------------------------------------------------
# (method, path) an engine kind answers without changing its state; ``ADMIN_RAW``: the ones
# that do, for the admin token only. Paths are under the engine's root (not its /v1).
RAW_ALLOWED: dict[str, frozenset[tuple[str, str]]] = {
    "llamacpp": frozenset(
        {
            ("POST", "/tokenize"),
            ("POST", "/detokenize"),
            ("POST", "/apply-template"),
            ("GET", "/props"),
            ("GET", "/slots"),
            ("GET", "/health"),
        }
    ),
    "vllm": frozenset(
        {
            ("POST", "/tokenize"),
            ("POST", "/detokenize"),
            ("POST", "/score"),
            ("POST", "/v1/score"),
            ("POST", "/pooling"),
            ("POST", "/classify"),
            ("GET", "/version"),
            ("GET", "/health"),
        }
    ),
    "ollama": frozenset({("POST", "/api/show"), ("GET", "/api/version"), ("GET", "/api/ps")}),
}
ADMIN_RAW: dict[str, frozenset[tuple[str, str]]] = {
    "llamacpp": frozenset({("POST", "/props"), ("POST", "/slots")}),
}
# Never forwarded, whoever asks: vLLM's development and control endpoints.
RAW_NEVER = (
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
    "/reset_prefix_cache",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/start_profile",
    "/stop_profile",
)


def raw_access(entry: ModelEntry, method: str, path: str) -> str:
    """``open``, ``admin`` (the admin token needed) or ``never`` for a raw engine route."""
    if path.startswith(RAW_NEVER) or ".." in path:
        return "never"
    kinds = [entry.backend] if not entry.metadata.get("peer") else list(RAW_ALLOWED)
    for kind in kinds:
        if (method, path) in RAW_ALLOWED.get(kind, ()):
            return "open"
    for kind in kinds:
        for allowed_method, prefix in ADMIN_RAW.get(kind, ()):
            if method == allowed_method and (path == prefix or path.startswith(prefix + "/")):
                return "admin"
    return "never"
