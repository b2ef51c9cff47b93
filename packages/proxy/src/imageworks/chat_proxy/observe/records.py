"""The record of one request: what it asked (``RequestInfo``), what became of it (``Outcome``),
and the one builder of its JSONL line and its metrics.

The line is ``FIELDS``, in order: each field a name, how its value is read from the request's
``Facts`` (the figures derived once: the status the client got, the error code, the tokens),
and when it is written. A request refused before it was forwarded (admin, leases, unknown
routes, a wrong method) writes the same line less the fields only a forwarded request has, and
no metrics. Adding a field is one line in ``FIELDS`` (and a row in docs/api.md's record table).

The builder runs on the event loop, after the answer's last byte was sent; only the file write
goes to a thread (``requestlog``), and the metrics are only queued (``metrics.request_done``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imageworks.chat_proxy.errors import ProxyError
from imageworks.chat_proxy.observe.metrics import Finished, Metrics
from imageworks.chat_proxy.observe.requestlog import RequestLog
from imageworks.model_loader.schema import ModelEntry

if TYPE_CHECKING:
    from imageworks.chat_proxy.vision.prepare import ImageStats

# Surfaces whose answers are generations: without usage from the backend, it is estimated.
GENERATIONS = frozenset({"chat", "completions", "responses", "messages"})
MAX_TOKENS_COUNTED = 10**9  # more than any context: a count beyond it is not believed


def sane_usage(usage: Any) -> dict[str, Any] | None:
    """A backend's usage object with its token counts as believable integers: a count that is
    not an integer from 0 to ``MAX_TOKENS_COUNTED`` (``1e308``, ``-5``, ``"many"``) is left out,
    so it reaches neither the log nor the metrics as it came."""
    if not isinstance(usage, dict):
        return None

    def believable(value: Any) -> bool:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        return is_int and 0 <= value <= MAX_TOKENS_COUNTED

    return {k: v for k, v in usage.items() if not k.endswith("_tokens") or believable(v)}


def usage_in(whole: bytes) -> dict[str, Any] | None:
    """The usage object of a whole JSON answer, if it has one."""
    if b'"usage"' not in whole:
        return None
    try:
        answer = json.loads(whole)
    except (ValueError, RecursionError):
        return None
    return sane_usage(answer.get("usage")) if isinstance(answer, dict) else None


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
class Outcome:
    """What happened to one forwarded request; becomes the JSONL record and the metrics."""

    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    error: ProxyError | None = None
    client_gone: bool = False
    first_byte_at: float | None = None
    finished_at: float | None = None
    events: int = 0
    usage: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None  # the final object of a Responses answer
    # A whole answer as relayed: its usage is read when the request is recorded, after the
    # answer was sent (parsing it first kept the client waiting for the log's sake).
    whole: bytes | None = None

    def read_usage(self) -> dict[str, Any] | None:
        if self.usage is None and self.whole is not None:
            self.usage = usage_in(self.whole)
        self.whole = None
        return self.usage

    @property
    def ttft_ms(self) -> float | None:
        if self.first_byte_at is None:
            return None
        return round((self.first_byte_at - self.started) * 1000, 2)

    @property
    def total_ms(self) -> float:
        end = self.finished_at or time.perf_counter()
        return round((end - self.started) * 1000, 2)


@dataclass
class Facts:
    """One request's figures, derived once from its info and outcome."""

    info: RequestInfo
    outcome: Outcome
    forwarded: bool
    request_id: str | None = None
    status: int = 0
    code: str | None = None
    prompt_tokens: Any = None
    completion_tokens: Any = None
    estimated: bool = False
    tokens_per_s: float | None = None

    @classmethod
    def of(
        cls, info: RequestInfo, outcome: Outcome, *, forwarded: bool = True, request_id: Any = ""
    ) -> Facts:
        """``request_id``: where it differs from ``info``'s (a refusal may have none)."""
        facts = cls(info, outcome, forwarded, info.request_id if request_id == "" else request_id)
        error = outcome.error
        # The HTTP status the client got: 200 for a stream even if it ended with an error
        # event; 499 (nginx's "client closed request") when it left before any answer.
        facts.status = outcome.status or (error.status if error else 499)
        if outcome.client_gone and not error:
            facts.code = "err_client_disconnected"
        else:
            facts.code = error.log_code if error else None
        usage = outcome.read_usage() or {}
        # Normalised: Responses and Anthropic Messages say input/output tokens.
        facts.prompt_tokens = usage.get("prompt_tokens", usage.get("input_tokens"))
        facts.completion_tokens = usage.get("completion_tokens", usage.get("output_tokens"))
        if (
            (error is None or outcome.client_gone)
            and info.endpoint in GENERATIONS
            and facts.completion_tokens is None
            and info.entry is not None
        ):
            # No usage from the backend (or the client left before it came): estimate (4 bytes
            # a token; one token per streamed event, less the role, finish and [DONE] events,
            # or only the role event of a stream cut short) and say so.
            facts.estimated = True
            facts.prompt_tokens = max(1, info.prompt_bytes // 4)
            overhead = 1 if outcome.client_gone else 3
            events = max(0, outcome.events - overhead)
            facts.completion_tokens = events if info.stream else None
        gen_s = (outcome.finished_at or 0) - (outcome.first_byte_at or 0)
        if isinstance(facts.completion_tokens, int) and gen_s > 0.001:
            facts.tokens_per_s = round(facts.completion_tokens / gen_s, 2)
        return facts

    def entry_attr(self, name: str) -> Any:
        entry = self.info.entry
        return getattr(entry, name) if entry is not None else None


@dataclass(frozen=True)
class Field:
    name: str
    value: Callable[[Facts], Any]
    when: Callable[[Facts], bool] = lambda facts: True


def _forwarded(facts: Facts) -> bool:
    return facts.forwarded


def _has_images(facts: Facts) -> bool:
    return facts.info.images is not None


def _image(name: str) -> Callable[[Facts], Any]:
    return lambda facts: getattr(facts.info.images, name)


# The JSONL line of a request, in order (docs/api.md describes each field).
FIELDS: tuple[Field, ...] = (
    Field("event", lambda f: "request"),
    Field("request_id", lambda f: f.request_id),
    Field("endpoint", lambda f: f.info.endpoint),
    Field("client", lambda f: f.info.client),
    Field("key_name", lambda f: f.info.key_name),
    Field("model", lambda f: f.info.model),
    Field("logical_name", lambda f: f.entry_attr("name")),
    Field("backend", lambda f: f.entry_attr("backend")),
    Field("served_model_id", lambda f: f.entry_attr("upstream_id")),
    Field("stream", lambda f: f.info.stream),
    Field("status", lambda f: f.status),
    Field("error_code", lambda f: f.code),
    Field(
        "queue_ms",
        lambda f: f.info.admission_ms + (0.0 if f.info.loaded else f.info.wait_ms),
    ),
    Field("queue_depth", lambda f: f.info.queue_depth, _forwarded),
    Field("load_ms", lambda f: f.info.wait_ms if f.info.loaded else 0.0),
    Field("ttft_ms", lambda f: f.outcome.ttft_ms),
    Field("total_ms", lambda f: f.outcome.total_ms),
    Field("prompt_tokens", lambda f: f.prompt_tokens),
    Field("completion_tokens", lambda f: f.completion_tokens),
    Field("tokens_per_s", lambda f: f.tokens_per_s),
    Field("usage_estimated", lambda f: f.estimated),
    Field("images", _image("seen"), _has_images),
    Field("images_resized", _image("resized"), _has_images),
    Field("images_fetched", _image("fetched"), _has_images),
    Field("image_bytes_in", _image("bytes_in"), _has_images),
    Field("image_bytes_out", _image("bytes_out"), _has_images),
    Field("image_prep_ms", _image("prep_ms"), _has_images),
    Field("messages_trimmed", _image("messages_trimmed"), _has_images),
    Field(
        "error_message",
        lambda f: f.outcome.error.log_message if f.outcome.error else None,
        lambda f: f.outcome.error is not None,
    ),
)


def _runs(
    fields: tuple[Field, ...],
) -> tuple[tuple[Callable[[Facts], bool] | None, tuple[Field, ...]], ...]:
    """``fields`` in runs that share their ``when`` (None: always), each asked once per line."""
    always = Field("", lambda f: None).when
    runs = [
        (None if when is always else when, tuple(group))
        for when, group in itertools.groupby(fields, key=lambda f: f.when)
    ]
    return tuple(runs)


_RUNS = _runs(FIELDS)


def line(facts: Facts) -> dict[str, Any]:
    """The JSONL record of one request."""
    record: dict[str, Any] = {}
    for when, fields in _RUNS:
        if when is None or when(facts):
            for f in fields:
                record[f.name] = f.value(facts)
    return record


def finished(facts: Facts) -> Finished:
    """The same request as the metrics see it."""
    backend = facts.entry_attr("backend")
    outcome = facts.outcome
    return Finished(
        facts.info.endpoint,
        facts.entry_attr("name") or "-",
        backend or "-",
        facts.status,
        facts.code.removeprefix("err_") if facts.code else None,
        outcome.total_ms / 1000,
        (outcome.ttft_ms or 0) / 1000 if outcome.first_byte_at is not None and backend else None,
        facts.prompt_tokens if isinstance(facts.prompt_tokens, int) else None,
        facts.completion_tokens if isinstance(facts.completion_tokens, int) else None,
        facts.info.images,
        facts.info.key_name,
    )


class Records:
    """Where finished requests go: the request log and the metrics."""

    def __init__(self, log: RequestLog, metrics: Metrics) -> None:
        self.log = log
        self.metrics = metrics

    def request(self, info: RequestInfo, outcome: Outcome) -> None:
        """Write the JSONL record and update the metrics for one finished request."""
        facts = Facts.of(info, outcome)
        self.log.write(line(facts))
        self.metrics.request_done(finished(facts))

    def refusal(
        self, request_id: str | None, endpoint: str, client: str | None, error: ProxyError
    ) -> None:
        """The JSONL record of a request refused outside the forwarded endpoints (admin,
        leases, unknown routes)."""
        now = time.perf_counter()
        outcome = Outcome(started=now, status=error.status, error=error, finished_at=now)
        info = RequestInfo("", endpoint, client)
        facts = Facts.of(info, outcome, forwarded=False, request_id=request_id)
        self.log.write(line(facts))
