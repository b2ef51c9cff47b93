"""Prometheus metrics, one registry per app (tests and several apps in one process stay apart).

Labels are low-cardinality on purpose: logical model names (bounded by the registry), backend
kinds, endpoint names and error codes; never request ids, clients or raw model strings.

Per-request figures are not added to the counters while the request ends: ``request_done``
only queues them, and they are folded in when ``/metrics`` is scraped (or when the queue gets
long). Five labelled updates cost ~45 us of the event loop per request on a cold core; a
queued tuple costs almost nothing, and a scrape always sees every finished request.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot
    from imageworks.chat_proxy.vision.prepare import ImageStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


TallyOf = Tally[tuple[str, ...]]
_FOLD_AT = 2048  # queued requests: bounds the memory and the time one fold takes


class Finished(NamedTuple):
    """One finished request, as the metrics see it."""

    endpoint: str
    model: str
    backend: str
    status: int
    error_code: str | None
    total_s: float
    ttft_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    images: ImageStats | None = None
    key_name: str | None = None


class Metrics:
    def __init__(self) -> None:
        self._finished: deque[Finished] = deque()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "chat_proxy_requests",
            "Requests answered, by outcome",
            ["endpoint", "model", "backend", "status"],
            registry=r,
        )
        self.key_requests = Counter(
            "chat_proxy_key_requests",
            "Requests answered, by the name of their API key (never the key) and model",
            ["key", "model", "status"],
            registry=r,
        )
        self.errors = Counter(
            "chat_proxy_errors",
            "Requests that failed, by error code",
            ["endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "chat_proxy_request_seconds",
            "Time from request to the last byte",
            ["endpoint", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "chat_proxy_ttft_seconds",
            "Time to the first streamed byte from the backend",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "chat_proxy_tokens",
            "Tokens reported (or estimated) by backends",
            ["model", "kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "chat_proxy_in_flight_requests", "Requests being forwarded now", registry=r
        )
        self.model_loads = Counter(
            "chat_proxy_model_loads", "Model starts, by result", ["model", "result"], registry=r
        )
        self.model_load_seconds = Histogram(
            "chat_proxy_model_load_seconds",
            "Time for a model to become ready",
            ["model"],
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.engine_crashes = Counter(
            "chat_proxy_engine_crashes",
            "Engines that died while ready, by model",
            ["model"],
            registry=r,
        )
        self.idle_unloads = Counter(
            "chat_proxy_idle_unloads",
            "Models stopped without a request asking: idle TTL ('idle') or left the registry",
            ["model", "reason"],
            registry=r,
        )
        self.evictions = Counter(
            "chat_proxy_evictions", "Models evicted to free VRAM, by reason", ["reason"], registry=r
        )
        self.vram_total = Gauge(
            "chat_proxy_vram_total_mb", "GPU memory, as last probed", registry=r
        )
        self.vram_used = Gauge(
            "chat_proxy_vram_used_mb", "GPU memory in use, as last probed", registry=r
        )
        # Per device, as last probed: total, used, held by our engines, held by others.
        self.device_mb = Gauge(
            "chat_proxy_gpu_device_mb",
            "GPU memory per device: total, used, ours (our engines), foreign (other processes)",
            ["device", "kind"],
            registry=r,
        )
        self.gpu_telemetry = Gauge(
            "chat_proxy_gpu_telemetry",
            "Per device, as last probed: utilization (percent), temperature (celsius), "
            "power (watts); absent where the probe cannot read it",
            ["device", "kind"],
            registry=r,
        )
        self.lease_active = Gauge(
            "chat_proxy_gpu_lease_active",
            "GPU leases held now (one per device at most)",
            registry=r,
        )
        self.lease_events = Counter(
            "chat_proxy_gpu_lease_events", "Lease grants, releases, ...", ["event"], registry=r
        )
        self.queue_depth = Gauge(
            "chat_proxy_admission_queue_depth",
            "Requests waiting for a turn under a model's max_concurrency",
            ["model"],
            registry=r,
        )
        self.rejections = Counter(
            "chat_proxy_admission_rejections",
            "Requests refused with 429 at a model's concurrency limit",
            ["model"],
            registry=r,
        )
        self.log_dropped = Gauge(
            "chat_proxy_request_log_dropped_records",
            "JSONL records dropped whole (a full disk, an unwritable log)",
            registry=r,
        )
        self.images = Counter(
            "chat_proxy_images",
            "Images in chat requests: seen, resized, fetched (allow-listed remote), "
            "replaced by alt text",
            ["model", "action"],
            registry=r,
        )
        self.image_bytes = Counter(
            "chat_proxy_image_bytes",
            "Image bytes as received (in) and as forwarded (out), images the proxy looked at",
            ["model", "direction"],
            registry=r,
        )
        self.image_prep = Histogram(
            "chat_proxy_image_prep_seconds",
            "Time spent preparing a request's images (decode, resize, encode, fetch, trim)",
            ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.registry_reloads = Counter(
            "chat_proxy_registry_reloads", "Registry reloads, by result", ["result"], registry=r
        )

    def request_done(self, finished: Finished) -> None:
        self._finished.append(finished)
        if len(self._finished) >= _FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Add the queued requests to the counters and histograms: summed per label set first,
        so that each label set is looked up once per fold, not once per request."""
        requests: TallyOf = Tally()
        keys: TallyOf = Tally()
        errors: TallyOf = Tally()
        tokens: TallyOf = Tally()
        latency: dict[tuple[str, ...], list[float]] = defaultdict(list)
        ttft: dict[tuple[str, ...], list[float]] = defaultdict(list)
        while self._finished:
            f = self._finished.popleft()
            requests[f.endpoint, f.model, f.backend, str(f.status)] += 1
            if f.key_name is not None:
                keys[f.key_name, f.model, str(f.status)] += 1
            latency[f.endpoint, f.backend].append(f.total_s)
            if f.error_code:
                errors[f.endpoint, f.error_code] += 1
            if f.ttft_s is not None:
                ttft[(f.backend,)].append(f.ttft_s)
            if f.prompt_tokens is not None:
                tokens[f.model, "prompt"] += f.prompt_tokens
            if f.completion_tokens is not None:
                tokens[f.model, "completion"] += f.completion_tokens
            if f.images is not None:
                self._fold_images(f.model, f.images)
        for counter, tally in (
            (self.requests, requests),
            (self.key_requests, keys),
            (self.errors, errors),
            (self.tokens, tokens),
        ):
            for labels, amount in tally.items():
                counter.labels(*labels).inc(amount)
        for histogram, samples in ((self.latency, latency), (self.ttft, ttft)):
            for labels, values in samples.items():
                child = histogram.labels(*labels)
                for value in values:
                    child.observe(value)

    def _fold_images(self, model: str, stats: ImageStats) -> None:
        for action, count in (
            ("seen", stats.seen),
            ("resized", stats.resized),
            ("fetched", stats.fetched),
            ("alt_text", stats.alt_texts),
        ):
            if count:
                self.images.labels(model, action).inc(count)
        if stats.bytes_in:
            self.image_bytes.labels(model, "in").inc(stats.bytes_in)
            self.image_bytes.labels(model, "out").inc(stats.bytes_out)
        self.image_prep.labels(model).observe(stats.prep_ms / 1000)

    def render(self) -> bytes:
        self.fold()
        return generate_latest(self.registry)

    def gpu_read(self, devices: Sequence[GpuSnapshot]) -> None:
        """A probe read: device 0 keeps the one-GPU gauges; every device its own."""
        if devices:
            self.vram_total.set(devices[0].total_mb)
            self.vram_used.set(devices[0].used_mb)
        for snap in devices:
            self.device_mb.labels(str(snap.index), "total").set(snap.total_mb)
            self.device_mb.labels(str(snap.index), "used").set(snap.used_mb)
            for kind, value in (
                ("utilization_pct", snap.utilization_pct),
                ("temperature_c", snap.temperature_c),
                ("power_w", snap.power_w),
            ):
                if value is not None:
                    self.gpu_telemetry.labels(str(snap.index), kind).set(value)

    def gpu_ledger(self, devices: Sequence[dict[str, Any]]) -> None:
        """The ledger's split of each device (``/v1/gpu/status`` ``devices``)."""
        for row in devices:
            self.device_mb.labels(str(row["index"]), "ours").set(row["ours_mb"])
            self.device_mb.labels(str(row["index"]), "foreign").set(row["foreign_mb"])
