"""Forwarding through a real proxy to real fake engines, streaming and not."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from testkit.entries import eventually
from testkit.fake_engine import entry_for, sse_events

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def strip_created(events: list[str]) -> list[object]:
    parsed: list[object] = []
    for event in events:
        if event == "[DONE]":
            parsed.append(event)
            continue
        data = json.loads(event)
        data.pop("created", None)
        parsed.append(data)
    return parsed


@pytest.mark.parametrize("flavour", ["vllm", "ollama", "llamacpp"])
@pytest.mark.parametrize("tools", [False, True])
def test_stream_relays_every_event_unchanged_and_in_order(
    request: pytest.FixtureRequest, proxy_factory, flavour: str, tools: bool
) -> None:
    engine = request.getfixturevalue(f"fake_{flavour}")
    backend = flavour
    served = "qwen2.5vl:7b" if flavour == "ollama" else "served"
    caps = {"tools": True}
    proxy = proxy_factory([entry_for("m", engine.url, backend, served, capabilities=caps)])
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    if tools:
        body["tools"] = TOOLS
    direct = httpx.post(engine.url + "/v1/chat/completions", json={**body, "model": served})
    via = proxy.client.post("/v1/chat/completions", json={**body, "model": "m"})
    assert via.status_code == 200
    assert via.headers["content-type"].startswith("text/event-stream")
    assert via.headers["cache-control"] == "no-cache"
    assert via.headers["x-accel-buffering"] == "no"
    events = sse_events(via.text)
    assert strip_created(events) == strip_created(sse_events(direct.text))
    kinds = [json.loads(e) for e in events[:-1]]
    assert kinds[0]["choices"][0]["delta"]["role"] == "assistant"
    assert kinds[-1]["choices"] == [] and kinds[-1]["usage"]["completion_tokens"] > 0
    finish = "tool_calls" if tools else "stop"
    assert kinds[-2]["choices"][0]["finish_reason"] == finish
    if tools:
        assert kinds[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("backend", ["vllm", "openai"])
def test_non_stream_answer_is_the_backends_bytes(proxy_factory, fake_vllm, backend: str) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, backend, "served")])
    via = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert via.status_code == 200
    assert via.headers["content-type"].startswith("application/json")
    assert via.json()["choices"][0]["message"]["content"] == "Hello from vllm!"
    assert via.json()["model"] == "served"


def test_the_served_id_and_generation_defaults_go_upstream(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory(
        [
            entry_for(
                "logical",
                fake_vllm.url,
                served="served-id",
                generation_defaults={"temperature": 0.1, "max_tokens": 9},
            )
        ]
    )
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "logical", "temperature": 0.9})
    sent = fake_vllm.engine.requests[-1].body
    assert sent == {**CHAT, "model": "served-id", "temperature": 0.9, "max_tokens": 9}


def test_request_ids_are_returned_and_forwarded(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    mine = proxy.client.post(
        "/v1/chat/completions",
        json={**CHAT, "model": "m"},
        headers={"x-request-id": "client-chosen-42"},
    )
    assert mine.headers["x-request-id"] == "client-chosen-42"
    assert fake_vllm.engine.requests[-1].headers["x-request-id"] == "client-chosen-42"
    generated = proxy.client.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32
    bad = proxy.client.get("/v1/models", headers={"x-request-id": "has space"})
    assert bad.headers["x-request-id"] != "has space"
    assert proxy.client.get("/nope").headers["x-request-id"]


def test_completions_and_embeddings(proxy_factory, fake_vllm, fake_ollama) -> None:
    proxy = proxy_factory(
        [
            entry_for("m", fake_vllm.url),
            entry_for(
                "embed",
                fake_ollama.url,
                "ollama",
                "nomic",
                capabilities={"text": False, "embedding": True},
            ),
        ]
    )
    done = proxy.client.post("/v1/completions", json={"model": "m", "prompt": "Once"})
    assert done.json()["choices"][0]["text"] == "completion from vllm"
    streamed = proxy.client.post(
        "/v1/completions", json={"model": "m", "prompt": "Once", "stream": True}
    )
    assert sse_events(streamed.text)[-1] == "[DONE]" and len(sse_events(streamed.text)) == 4
    vectors = proxy.client.post("/v1/embeddings", json={"model": "embed", "input": ["a", "b"]})
    assert [d["index"] for d in vectors.json()["data"]] == [0, 1]
    assert fake_ollama.engine.requests[-1].path == "/v1/embeddings"


def test_a_backend_that_answers_a_stream_with_json_is_relayed(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="json-for-stream")])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    assert answer.status_code == 200 and answer.json()["object"] == "chat.completion"


@pytest.mark.subprocess
@pytest.mark.parametrize("tools", [False, True])
def test_a_json_answer_to_a_stream_after_loading_comments_arrives_as_one_chunk(
    proxy_factory, tools: bool
) -> None:
    """A model that had to load first: the loading comment already made the answer a 200
    stream, so a backend answering JSON has its answer sent as one chunk then [DONE]. It was
    relayed raw, run into the next line with a 'stream ended without [DONE]' error, and an
    SSE client saw neither."""
    entry = {
        "name": "m",
        "backend": "llamacpp",
        "served_model_id": "json-for-stream",
        "backend_config": {"model_path": "none"},
        "capabilities": {"text": True, "tools": True},
    }
    launch = ["{python}", "-m", "testkit.fake_engine", "--port", "{port}", "--flavour", "llamacpp"]
    proxy = proxy_factory([entry], gpu_probe="none", llamacpp_launch_template=json.dumps(launch))
    body: dict[str, Any] = {**CHAT, "model": "m", "stream": True}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    answer = proxy.client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200
    assert re.match(r": loading m \(\d+\.\d s\)\n\n", answer.text), answer.text[:80]
    events = sse_events(answer.text)
    assert events[-1] == "[DONE]" and len(events) == 2
    chunk = json.loads(events[0])
    assert chunk["object"] == "chat.completion.chunk"
    (choice,) = chunk["choices"]
    assert "message" not in choice
    if tools:  # the engine called the tool
        assert choice["delta"]["tool_calls"][0]["type"] == "function"
    else:
        assert choice["delta"]["content"] == "Hello from llamacpp!"
    (record,) = proxy.records()
    assert record["status"] == 200 and record.get("error_code") is None, record


def test_each_request_is_logged_with_timings_and_tokens(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory(
        [
            entry_for("m", fake_vllm.url, served="served"),
            entry_for("quiet", fake_vllm.url, served="no-usage"),
        ]
    )
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    proxy.client.post(
        "/v1/chat/completions",
        json={**CHAT, "model": "m", "stream": True, "stream_options": {"include_usage": True}},
    )
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "quiet", "stream": True})
    proxy.server.stop()  # flushes the log
    plain, streamed, estimated = proxy.records()
    for record in (plain, streamed, estimated):
        assert record["status"] == 200 and record["error_code"] is None
        assert record["ttft_ms"] >= 0 and record["total_ms"] >= record["ttft_ms"]
        assert record["logical_name"] in ("m", "quiet") and record["backend"] == "vllm"
        assert record["ts"].endswith("Z")
    assert plain["stream"] is False and streamed["stream"] is True
    assert plain["completion_tokens"] == 4 and plain["usage_estimated"] is False
    assert streamed["completion_tokens"] == 4 and streamed["prompt_tokens"] > 0
    assert estimated["usage_estimated"] is True and estimated["completion_tokens"] == 4
    assert estimated["served_model_id"] == "no-usage"
    assert "messages" not in json.dumps(plain)  # prompts are not logged


def test_a_finished_stream_hands_its_backend_connection_back(proxy_factory, fake_vllm) -> None:
    # A new connection per stream costs TTFT; only an unfinished stream must be cut off.
    proxy = proxy_factory(
        [entry_for("m", fake_vllm.url, served="hang-stream"), entry_for("n", fake_vllm.url)]
    )

    def idle_connections() -> int:  # aiohttp's pool of kept-alive backend connections
        connector = proxy.state.egress.session.connector
        return sum(len(idle) for idle in connector._conns.values())

    for _ in range(3):
        proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "n", "stream": True})
        # The fake ends its body 5 ms after [DONE]: the connection is back once that is read.
        assert eventually(lambda: idle_connections() == 1)
    peers = [r.peer for r in fake_vllm.engine.requests]
    assert peers[0] == peers[1] == peers[2]
    with httpx.Client(base_url=proxy.url, timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/chat/completions",
            json={**CHAT, "model": "m", "stream": True},
            headers={"x-request-id": "abandoned"},
        )
    assert eventually(lambda: "abandoned" in fake_vllm.engine.cancelled)
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "n", "stream": True})
    # The abandoned stream's connection was closed (that is what stops the generation), so
    # the next request needed a new one.
    assert fake_vllm.engine.requests[-1].peer not in (peers[0], fake_vllm.engine.requests[-2].peer)
