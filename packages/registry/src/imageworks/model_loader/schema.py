"""The typed view of one registry entry.

The registry keeps each entry's raw JSON object as the source of truth (so unknown fields and key
order survive a save); these models only validate it and give callers typed access.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Backends the proxy can serve, and legacy values from the existing ImageWorks registry that load
# without error but are never listed or routed (DESIGN.md §3; seed inventory §3.2).
SERVABLE_BACKENDS = ("vllm", "ollama", "llamacpp", "openai", "ray")
LEGACY_BACKENDS = ("lmdeploy", "triton", "gguf", "unassigned")


PROTOCOL = Literal[
    "chat", "completions", "embeddings", "responses", "messages", "rerank", "audio", "speech"
]
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "content-type", "x-request-id"}
)


class _Open(BaseModel):
    """Nested objects accept fields we do not know yet."""

    model_config = ConfigDict(extra="allow", frozen=True)


class BackendConfig(_Open):
    host: str | None = None
    port: int | None = Field(default=None, ge=0, le=65535)
    base_url: str | None = None
    model_path: str | None = None
    extra_args: list[str] = Field(default_factory=list)
    # vLLM: the share of its GPU this model may take (--gpu-memory-utilization); absent, the
    # proxy derives it from the entry's need on the card, else the executor's default.
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    # An upstream elsewhere: the *name* of an environment variable holding its API key (sent as
    # ``Authorization: Bearer``; the key itself never enters the registry), fixed extra
    # headers, and a CA bundle to verify an https:// base_url against.
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    headers: dict[str, str] = Field(default_factory=dict)
    ca_file: str | None = None
    # vLLM with capabilities.tools: the parser that turns the model's tool-call text into
    # OpenAI tool_calls (--tool-call-parser: hermes, llama3_json, mistral, ...). One argv token
    # starting with a letter or digit: "--x" or "-x" would read as a flag of its own.
    tool_parser: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # vLLM: may the arbiter put this model to sleep (weights parked in host RAM, VRAM freed,
    # woken in a fraction of a cold start) instead of stopping it? The executor then runs it
    # with --enable-sleep-mode and vLLM's dev mode, bound to loopback only.
    sleep_mode: bool = False

    @field_validator("headers")
    @classmethod
    def _headers_are_http(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN.match(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP token")
            if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text):
                raise ValueError(f"header {name!r} has a control character in its value")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the proxy itself")
        return value


class Capabilities(_Open):
    text: bool = True
    vision: bool = False
    tools: bool = False
    reasoning: bool = False
    embedding: bool = False
    rerank: bool = False  # /v1/rerank (vLLM, llama.cpp --reranking)
    audio: bool = False  # /v1/audio/transcriptions and /translations (speech to text)
    speech: bool = False  # /v1/audio/speech (text to speech)


class ChatTemplate(_Open):
    # embedded: the weights carry one; external/extracted: a Jinja file at ``path``;
    # builtin: an engine's named template (llama.cpp's "gemma", "chatml", ...) given in ``name``.
    source: Literal["embedded", "external", "extracted", "builtin"] = "embedded"
    path: str | None = None
    name: str | None = None

    @property
    def usable(self) -> bool:
        if self.source in ("external", "extracted"):
            return bool(self.path)
        if self.source == "builtin":
            return bool(self.name)
        return True


class GenerationDefaults(_Open):
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None


class RemoteImages(_Open):
    """Opt-in: the proxy fetches http(s) image URLs from these hosts (and only these) and sends
    them inline. Without it the proxy never fetches an image."""

    # Exact host names, or "*.example.com" for its subdomains.
    allow_hosts: list[str] = Field(min_length=1)
    max_bytes: int = Field(default=10_000_000, ge=1)
    timeout_s: float = Field(default=10.0, gt=0)


class VisionSettings(_Open):
    """How images are prepared for this model. Unset numbers fall back to the proxy's
    ``CHAT_PROXY_VISION_*`` defaults."""

    # Inline images whose long edge exceeds this are resized to it (0: never resize).
    target_long_edge: int | None = Field(default=None, ge=0)
    jpeg_quality: int | None = Field(default=None, ge=1, le=95)
    # Most images one request may carry (0: no limit); largest image, in bytes, as sent.
    max_images: int | None = Field(default=None, ge=0)
    max_image_bytes: int | None = Field(default=None, ge=1)
    remote_images: RemoteImages | None = None
    # A model without the vision capability: replace each image by "[image: <alt text>]"
    # instead of refusing the request (an image without alt text is still refused).
    alt_text: bool = False
    # Vision models, opt-in: keep the system messages and the last N turns (a turn starts at
    # a user message), carrying the images of dropped user turns onto the last user message.
    keep_last_turns: int | None = Field(default=None, ge=1)


class ModelEntry(_Open):
    """One model as the registry describes it. Only ``name`` and ``backend`` are required."""

    name: str = Field(min_length=1)
    backend: str
    display_name: str | None = None
    served_model_id: str | None = None
    model_aliases: list[str] = Field(default_factory=list)
    backend_config: BackendConfig = Field(default_factory=BackendConfig)
    capabilities: Capabilities = Field(default_factory=Capabilities)
    generation_defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    chat_template: ChatTemplate | None = None
    vision: VisionSettings = Field(default_factory=VisionSettings)
    vram_estimate_mb: int | None = Field(default=None, ge=0)
    # What the proxy does when the engine dies while ready: start it again on the next request
    # (with backoff, until a crash loop), or leave it crashed until activated by hand.
    restart: Literal["on-failure", "never"] = "on-failure"
    # Idle unload: seconds without a request before the proxy stops the model (None: the global
    # CHAT_PROXY_IDLE_TTL_S; 0: never); a pinned model is never unloaded for being idle, and a
    # preloaded one is started with the proxy.
    ttl_s: float | None = Field(default=None, ge=0)
    pinned: bool = False
    preload: bool = False
    # Eviction: when memory must be freed, lower priorities go first; among equal ones, the
    # model cheapest to bring back (measured wake or load time), then the least recently used.
    # ``pinned`` (above) is never evicted at all.
    priority: int = Field(default=0, ge=-100, le=100)
    # Placement on a box with several GPUs: pin to these device indexes (``gpus: [1]``), or span
    # ``tensor_parallel`` devices (vLLM's --tensor-parallel-size); neither: the arbiter picks
    # the device where the model fits with the least eviction.
    gpus: list[int] | None = Field(default=None, min_length=1)
    tensor_parallel: int | None = Field(default=None, ge=1)
    # Requests forwarded at once; beyond it requests wait in a bounded queue, then get 429.
    max_concurrency: int | None = Field(default=None, ge=1)
    profiles: list[str] | None = None
    deprecated: bool = False
    quantization: str | None = None
    family: str | None = None
    roles: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Engine-control request fields (chat_template, chat_template_kwargs, ...) the proxy
    # forwards for this model; by default it refuses them. "tools" here forwards tool
    # definitions to a model without capabilities.tools (otherwise 409).
    allow_request_fields: list[str] = Field(default_factory=list)
    # The surfaces the engine speaks, for an external server that speaks other ones than its
    # backend kind does (chat, completions, embeddings, responses, messages, rerank, audio,
    # speech); None: the kind's own list (docs/api.md).
    protocols: list[PROTOCOL] | None = None
    # The engine keeps Responses itself (OpenAI; vLLM with VLLM_ENABLE_RESPONSES_API_STORE=1):
    # requests by id, previous_response_id and background go to it. False: the proxy chains
    # previous_response_id and answers requests by id from its own bounded store.
    responses_stored: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_trimmed(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError("must not start or end with whitespace")
        return value

    @field_validator("backend")
    @classmethod
    def _backend_is_known(cls, value: str) -> str:
        if value not in SERVABLE_BACKENDS + LEGACY_BACKENDS:
            known = ", ".join(SERVABLE_BACKENDS + LEGACY_BACKENDS)
            raise ValueError(f"unknown backend {value!r} (known: {known})")
        return value

    @field_validator("gpus")
    @classmethod
    def _gpus_are_indexes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError("must be distinct device indexes (0, 1, ...)")
        return value

    @property
    def gpu_span(self) -> int:
        """How many devices the model occupies at once."""
        return len(self.gpus) if self.gpus else (self.tensor_parallel or 1)

    @field_validator("served_model_id")
    @classmethod
    def _none_string_is_null(cls, value: str | None) -> str | None:
        # The old registry wrote the string "None" for a missing served id.
        return None if value in (None, "", "None") else value

    @cached_property
    def request_defaults(self) -> dict[str, Any]:
        """``generation_defaults`` as request fields, nulls dropped. Computed once: entries are
        immutable, and the proxy needs this on every request."""
        return self.generation_defaults.model_dump(exclude_none=True)

    @property
    def label(self) -> str:
        """What people see: the display name, else the logical name."""
        return self.display_name or self.name

    @property
    def upstream_id(self) -> str:
        """The model id sent to the backend (vLLM --served-model-name, the Ollama tag, ...)."""
        return self.served_model_id or self.name

    @property
    def servable(self) -> bool:
        return self.backend in SERVABLE_BACKENDS

    def visible_in(self, profile: str) -> bool:
        return self.profiles is None or profile in self.profiles
