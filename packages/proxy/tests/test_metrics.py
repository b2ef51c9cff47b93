"""Request figures are queued and folded into the Prometheus metrics on a scrape."""

from __future__ import annotations

from imageworks.chat_proxy.observe.metrics import _FOLD_AT, Finished, Metrics


def finished(status: int = 200, code: str | None = None) -> Finished:
    return Finished("chat", "m", "vllm", status, code, 0.2, 0.05, 10, 3)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_scrape_sees_every_finished_request() -> None:
    metrics = Metrics()
    metrics.request_done(finished())
    metrics.request_done(finished(502, "backend_unavailable"))
    text = metrics.render().decode()
    assert (
        'chat_proxy_requests_total{backend="vllm",endpoint="chat",model="m",status="200"} 1.0'
        in text
    )
    assert (
        sample(metrics, "chat_proxy_errors_total", endpoint="chat", code="backend_unavailable") == 1
    )
    assert sample(metrics, "chat_proxy_tokens_total", model="m", kind="completion") == 6
    assert sample(metrics, "chat_proxy_ttft_seconds_count", backend="vllm") == 2


def test_the_queue_is_folded_when_it_gets_long_even_without_a_scrape() -> None:
    metrics = Metrics()
    for _ in range(_FOLD_AT - 1):
        metrics.request_done(finished())
    assert (
        sample(metrics, "chat_proxy_request_seconds_count", endpoint="chat", backend="vllm") is None
    )
    metrics.request_done(finished())
    assert (
        sample(metrics, "chat_proxy_request_seconds_count", endpoint="chat", backend="vllm")
        == _FOLD_AT
    )
