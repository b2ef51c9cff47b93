"""A client that goes away cancels the upstream request (real sockets on both sides)."""

from __future__ import annotations

import httpx
import pytest

from testkit.entries import eventually
from testkit.fake_engine import entry_for

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_closing_a_stream_cancels_the_upstream_request(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="hang-stream")])
    with (
        httpx.Client(base_url=proxy.url) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={**CHAT, "model": "m", "stream": True},
            headers={"x-request-id": "leaving-stream"},
        ) as response,
    ):
        first = next(response.iter_lines())
        assert first.startswith("data: ")  # the role chunk arrived, then the client leaves
    assert eventually(lambda: "leaving-stream" in fake_vllm.engine.cancelled)
    assert eventually(
        lambda: proxy.client.get("/admin/state").json()["models"][0]["in_flight"] == 0
    )
    proxy.server.stop()
    (record,) = proxy.records()
    assert record["error_code"] == "err_client_disconnected" and record["stream"] is True


def test_a_client_giving_up_on_a_non_stream_request_cancels_upstream(
    proxy_factory, fake_vllm
) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="hang")])
    with httpx.Client(base_url=proxy.url, timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/chat/completions",
            json={**CHAT, "model": "m"},
            headers={"x-request-id": "leaving-wait"},
        )
    assert eventually(lambda: "leaving-wait" in fake_vllm.engine.cancelled)
    proxy.server.stop()
    (record,) = proxy.records()
    assert record["error_code"] == "err_client_disconnected" and record["status"] == 499


def test_a_completed_request_is_not_reported_as_cancelled(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert fake_vllm.engine.cancelled == []
