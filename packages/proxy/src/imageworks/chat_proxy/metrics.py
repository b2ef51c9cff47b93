"""Prometheus metrics, one registry per app (tests and several apps in one process stay apart).

Labels are low-cardinality on purpose: logical model names (bounded by the registry), backend
kinds, endpoint names and error codes; never request ids, clients or raw model strings.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "chat_proxy_requests",
            "Requests answered, by outcome",
            ["endpoint", "model", "backend", "status"],
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
        self.evictions = Counter(
            "chat_proxy_evictions", "Models evicted to free VRAM, by reason", ["reason"], registry=r
        )
        self.vram_total = Gauge(
            "chat_proxy_vram_total_mb", "GPU memory, as last probed", registry=r
        )
        self.vram_used = Gauge(
            "chat_proxy_vram_used_mb", "GPU memory in use, as last probed", registry=r
        )
        self.lease_active = Gauge(
            "chat_proxy_gpu_lease_active", "1 while the GPU is leased", registry=r
        )
        self.lease_events = Counter(
            "chat_proxy_gpu_lease_events", "Lease grants, releases, ...", ["event"], registry=r
        )
        self.registry_reloads = Counter(
            "chat_proxy_registry_reloads", "Registry reloads, by result", ["result"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
