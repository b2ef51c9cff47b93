"""A client that goes away cancels the upstream request (real sockets on both sides)."""

from __future__ import annotations

import json

import httpx
import pytest

from testkit.entries import eventually
from testkit.fake_engine import entry_for, sse_events

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
    # Only the role chunk was relayed: an estimate of nothing generated, and said so.
    assert record["usage_estimated"] is True and record["completion_tokens"] == 0
    assert record["prompt_tokens"] > 0


def test_a_stream_cut_short_is_logged_with_estimated_usage(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="slow")])  # 10 chunks, 50 ms
    with (
        httpx.Client(base_url=proxy.url) as client,
        client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True}
        ) as response,
    ):
        events = response.iter_lines()
        seen: list[str] = []
        for line in events:
            if line.startswith("data: "):
                seen.append(line)
            if len(seen) == 4:  # the role and three words, then the client leaves
                break
    assert eventually(
        lambda: proxy.client.get("/admin/state").json()["models"][0]["in_flight"] == 0
    )
    proxy.server.stop()
    (record,) = proxy.records()
    assert record["error_code"] == "err_client_disconnected"
    assert record["usage_estimated"] is True
    assert 3 <= record["completion_tokens"] < 10
    assert record["prompt_tokens"] > 0


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
    streamed = proxy.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True}
    )
    assert streamed.status_code == 200
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "Hello from vllm!"
    plain = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert plain.status_code == 200
    assert plain.json()["choices"][0]["message"]["content"] == "Hello from vllm!"
    proxy.server.stop()
    assert fake_vllm.engine.cancelled == []
    records = proxy.records()
    assert [(r["stream"], r["status"], r["error_code"]) for r in records] == [
        (True, 200, None),
        (False, 200, None),
    ]
