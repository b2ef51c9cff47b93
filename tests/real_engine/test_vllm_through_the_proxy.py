"""Real vLLM (SmolLM2-135M-Instruct) through the proxy and the executor: what a client sees."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from tests.real_engine.conftest import CHAT, Stack

from testkit.fake_engine import sse_events

pytestmark = [pytest.mark.real_engine, pytest.mark.subprocess, pytest.mark.timeout(600)]
QUESTION = "What is the capital of France? Answer in one word."
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


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_the_executor_launched_vllm_from_its_template_on_loopback(stack: Stack) -> None:
    state = stack.executor_state()
    assert state["status"] == "running" and state["logical_name"] == CHAT
    argv = Path(f"/proc/{state['pid']}/cmdline").read_bytes().split(b"\0")
    assert argv[0].decode() == stack.manifest["python"]  # vLLM's own environment
    assert argv[1:3] == [b"-m", b"vllm.entrypoints.openai.api_server"]
    assert argv[argv.index(b"--host") + 1] == b"127.0.0.1"
    assert argv[argv.index(b"--tool-call-parser") + 1] == b"hermes"
    assert b"--chat-template" in argv
    environ = Path(f"/proc/{state['pid']}/environ").read_bytes().split(b"\0")
    assert b"VLLM_HOST_IP=127.0.0.1" in environ and b"VLLM_NO_USAGE_STATS=1" in environ
    version = stack.client.get("/v1/models").json()
    assert CHAT in [m["id"] for m in version["data"]]


def test_chat_answers_paris(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(model=CHAT, temperature=0, messages=ask(QUESTION))
    client.close()
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_streaming_with_usage(stack: Stack) -> None:
    answer = stack.chat(messages=ask(QUESTION), stream=True, stream_options={"include_usage": True})
    assert answer.status_code == 200
    events = sse_events(answer.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop"


def test_n_2_gives_two_choices(stack: Stack) -> None:
    greedy = stack.chat(messages=ask(QUESTION), n=2, max_tokens=8)
    # vLLM's own rule: several choices need sampling (the fake vLLM says the same).
    assert greedy.status_code == 400 and "greedy" in greedy.json()["error"]["message"]
    body = stack.chat(messages=ask(QUESTION), n=2, max_tokens=8, temperature=1.0, seed=7).json()
    assert [c["index"] for c in body.get("choices", [])] == [0, 1], body
    assert all(c["message"]["content"] for c in body["choices"])


def test_logprobs(stack: Stack) -> None:
    body = stack.chat(messages=ask(QUESTION), max_tokens=4, logprobs=True, top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in content)


def test_response_format_json_schema(stack: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    body = stack.chat(
        messages=ask("Which city is the capital of France? Answer in JSON."),
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    ).json()
    parsed = json.loads(body["choices"][0]["message"]["content"])
    assert set(parsed) == {"city"} and isinstance(parsed["city"], str)


def test_a_tool_call_and_the_tool_result_turn(stack: Stack) -> None:
    question = ask("What is the weather in Paris?")
    called = stack.chat(messages=question, tools=[WEATHER], tool_choice="required").json()
    choice = called["choices"][0]
    assert choice["finish_reason"] == "tool_calls", called
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # The loop a client runs: the result goes back, the model answers in words (and the loop
    # ends: no second call).
    turn = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"},
    ]
    final = stack.chat(messages=turn, tools=[WEATHER], max_tokens=60).json()
    message = final["choices"][0]["message"]
    assert not message.get("tool_calls") and final["choices"][0]["finish_reason"] == "stop", final
    assert message["content"].strip()


def test_errors_come_in_the_clients_envelope(stack: Stack) -> None:
    too_long = stack.chat(messages=ask("hi " * 3000), max_tokens=4)
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    bad = stack.chat(messages=ask("hi"), max_tokens="many")
    assert bad.status_code == 400 and bad.json()["error"]["message"]
