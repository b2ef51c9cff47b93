"""Everything one running proxy owns. Created and closed by the app's lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from imageworks.chat_proxy.arbiter.arbiter import VramArbiter
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends import Backend
from imageworks.chat_proxy.engines.lifecycle import Lifecycle
from imageworks.chat_proxy.errors import ProxyError
from imageworks.chat_proxy.observe.metrics import Finished, Metrics
from imageworks.chat_proxy.observe.requestlog import RequestLog
from imageworks.chat_proxy.request.admission import Admission
from imageworks.chat_proxy.server.staging import StagingLock
from imageworks.chat_proxy.upstream.egress import Egress
from imageworks.chat_proxy.upstream.forwarding import Outcome
from imageworks.chat_proxy.upstream.peers import Peers
from imageworks.chat_proxy.upstream.responses import ResponseBook
from imageworks.chat_proxy.vision.prepare import ImagePrep, ImageStats
from imageworks.model_loader.profiles import DeploymentProfile, ProfileManager
from imageworks.model_loader.registry import Registry
from imageworks.model_loader.schema import ModelEntry
from imageworks.model_loader.watch import RegistryWatcher

# Surfaces whose answers are generations: without usage from the backend, it is estimated.
GENERATIONS = frozenset({"chat", "completions", "responses", "messages"})


@dataclass
class RequestInfo:
    """What the log needs to know about a request before it is forwarded."""

    request_id: str
    endpoint: str
    client: str | None
    model: str | None = None
    entry: ModelEntry | None = None
    stream: bool = False
    prompt_bytes: int = 0
    wait_ms: float = 0.0  # waiting for the model: for its turn, and for it to load
    loaded: bool = False  # whether the model was (re)started while this request waited
    lease_token: str | None = None
    admission_ms: float = 0.0  # waiting for a turn under the model's max_concurrency
    queue_depth: int = 0  # this request's place in that wait queue, 0 if it did not wait
    images: ImageStats | None = None  # what image preparation did (requests with images)
    tools: bool = False  # the request declared tools: legacy function_call answers converted
    key_name: str | None = None  # the name of its API key (never the key), when keys are set


@dataclass
class ProxyState:
    config: ProxyConfig
    watcher: RegistryWatcher
    profiles: ProfileManager
    egress: Egress  # the one HTTP client to backends
    log: RequestLog
    metrics: Metrics
    lifecycle: Lifecycle
    backends: dict[str, Backend]
    arbiter: VramArbiter
    autostart: bool
    admission: Admission
    staging_lock: StagingLock
    peers: Peers
    images: ImagePrep
    responses: ResponseBook  # where each Responses id lives
    started_at: float = field(default_factory=time.time)
    _models_cache: tuple[tuple[str, str, int, int], bytes] | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        return self.egress.session

    @property
    def registry(self) -> Registry:
        return self.watcher.current

    @property
    def profile(self) -> DeploymentProfile:
        return self.profiles.active

    def visible(self, entry: ModelEntry) -> bool:
        return entry.servable and not entry.deprecated and self.profile.admits(entry)

    def record_refusal(
        self, request_id: str | None, endpoint: str, client: str | None, error: ProxyError
    ) -> None:
        """The JSONL record of a request refused outside the forwarded endpoints (admin,
        leases, unknown routes)."""
        self.log.write(
            {
                "event": "request",
                "request_id": request_id,
                "endpoint": endpoint,
                "client": client,
                **dict.fromkeys(("model", "logical_name", "backend", "served_model_id")),
                "stream": False,
                "status": error.status,
                "error_code": error.log_code,
                "queue_ms": 0.0,
                "load_ms": 0.0,
                "ttft_ms": None,
                "total_ms": 0.0,
                **dict.fromkeys(("prompt_tokens", "completion_tokens", "tokens_per_s")),
                "usage_estimated": False,
                "error_message": error.log_message,
            }
        )

    def record(self, info: RequestInfo, outcome: Outcome) -> None:
        """Write the JSONL record and update the metrics for one finished request."""
        error = outcome.error
        entry = info.entry
        backend = entry.backend if entry else None
        # The HTTP status the client got: 200 for a stream even if it ended with an error
        # event; 499 (nginx's "client closed request") when it left before any answer.
        status = outcome.status or (error.status if error else 499)
        if outcome.client_gone and not error:
            code: str | None = "err_client_disconnected"
        else:
            code = error.log_code if error else None
        usage = outcome.usage or {}
        # Normalised: Responses and Anthropic Messages say input/output tokens.
        prompt_tokens = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion_tokens = usage.get("completion_tokens", usage.get("output_tokens"))
        estimated = False
        if (
            (error is None or outcome.client_gone)
            and info.endpoint in GENERATIONS
            and completion_tokens is None
            and info.entry is not None
        ):
            # No usage from the backend (or the client left before it came): estimate (4 bytes
            # a token; one token per streamed event, less the role, finish and [DONE] events,
            # or only the role event of a stream cut short) and say so.
            estimated = True
            prompt_tokens = max(1, info.prompt_bytes // 4)
            overhead = 1 if outcome.client_gone else 3
            completion_tokens = max(0, outcome.events - overhead) if info.stream else None
        total_s = outcome.total_ms / 1000
        gen_s = (outcome.finished_at or 0) - (outcome.first_byte_at or 0)
        tokens_per_s = (
            round(completion_tokens / gen_s, 2)
            if isinstance(completion_tokens, int) and gen_s > 0.001
            else None
        )
        record: dict[str, Any] = {
            "event": "request",
            "request_id": info.request_id,
            "endpoint": info.endpoint,
            "client": info.client,
            "key_name": info.key_name,
            "model": info.model,
            "logical_name": entry.name if entry else None,
            "backend": backend,
            "served_model_id": entry.upstream_id if entry else None,
            "stream": info.stream,
            "status": status,
            "error_code": code,
            "queue_ms": info.admission_ms + (0.0 if info.loaded else info.wait_ms),
            "queue_depth": info.queue_depth,
            "load_ms": info.wait_ms if info.loaded else 0.0,
            "ttft_ms": outcome.ttft_ms,
            "total_ms": outcome.total_ms,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "tokens_per_s": tokens_per_s,
            "usage_estimated": estimated,
        }
        images = info.images
        if images is not None:
            record.update(
                images=images.seen,
                images_resized=images.resized,
                images_fetched=images.fetched,
                image_bytes_in=images.bytes_in,
                image_bytes_out=images.bytes_out,
                image_prep_ms=images.prep_ms,
                messages_trimmed=images.messages_trimmed,
            )
        if error is not None:
            record["error_message"] = error.log_message
        self.log.write(record)
        self.metrics.request_done(
            Finished(
                info.endpoint,
                entry.name if entry else "-",
                backend or "-",
                status,
                code.removeprefix("err_") if code else None,
                total_s,
                (outcome.ttft_ms or 0) / 1000
                if outcome.first_byte_at is not None and backend
                else None,
                prompt_tokens if isinstance(prompt_tokens, int) else None,
                completion_tokens if isinstance(completion_tokens, int) else None,
                images,
                info.key_name,
            )
        )
