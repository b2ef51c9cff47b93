"""Tool calls through a real proxy: relayed untouched, legacy function_call converted, prose
left as prose, tools refused for a model that does not declare them (issue 17)."""

from __future__ import annotations

import json

import httpx
import pytest

from testkit.fake_engine import entry_for, sse_events

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
TOOL_CAPS = {"text": True, "tools": True}


def test_tool_calls_are_relayed_untouched_without_streaming(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, capabilities=TOOL_CAPS)])
    body = {"messages": MESSAGES, "tools": TOOLS}
    direct = httpx.post(fake_vllm.url + "/v1/chat/completions", json={**body, "model": "m"})
    via = proxy.client.post("/v1/chat/completions", json={**body, "model": "m"})
    assert via.status_code == 200
    expected, got = direct.json(), via.json()
    expected.pop("created"), got.pop("created")
    assert got == expected
    assert got["choices"][0]["message"]["tool_calls"][0]["id"] == "call_1"
    assert got["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_a_legacy_function_call_becomes_tool_calls(proxy_factory, fake_vllm, stream: bool) -> None:
    proxy = proxy_factory(
        [entry_for("m", fake_vllm.url, served="function-call", capabilities=TOOL_CAPS)]
    )
    body = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "stream": stream}
    response = proxy.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if not stream:
        (choice,) = response.json()["choices"]
        assert "function_call" not in choice["message"]
        (call,) = choice["message"]["tool_calls"]
        assert choice["finish_reason"] == "tool_calls"
    else:
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("function_call" in c["choices"][0]["delta"] for c in chunks)
        pieces = [
            c["choices"][0]["delta"]["tool_calls"][0]
            for c in chunks
            if "tool_calls" in c["choices"][0]["delta"]
        ]
        assert len(pieces) == 3
        assert all(p["index"] == 0 for p in pieces)
        assert "id" not in pieces[1] and "name" not in pieces[1]["function"]
        call = {
            "id": pieces[0]["id"],
            "type": pieces[0]["type"],
            "function": {
                "name": pieces[0]["function"]["name"],
                "arguments": "".join(p["function"]["arguments"] for p in pieces),
            },
        }
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert call["id"].startswith("call_") and len(call["id"]) > len("call_")
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_a_client_that_sent_legacy_functions_gets_function_call_back(
    proxy_factory, fake_vllm
) -> None:
    proxy = proxy_factory(
        [entry_for("m", fake_vllm.url, served="function-call", capabilities=TOOL_CAPS)]
    )
    functions = [TOOLS[0]["function"]]
    response = proxy.client.post(
        "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "functions": functions}
    )
    (choice,) = response.json()["choices"]
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert choice["finish_reason"] == "function_call"


@pytest.mark.parametrize("stream", [False, True])
def test_prose_containing_json_stays_prose(proxy_factory, fake_vllm, stream: bool) -> None:
    proxy = proxy_factory(
        [entry_for("m", fake_vllm.url, served="json-prose", capabilities=TOOL_CAPS)]
    )
    # Tools declared, but the model answered in prose: nothing is promoted to a tool call.
    body = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "stream": stream}
    response = proxy.client.post("/v1/chat/completions", json=body)
    text = 'Here is the record: {"name": "Alice", "age": 30} as asked.'
    if stream:
        chunks = [json.loads(e) for e in sse_events(response.text)[:-1]]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert "".join(d.get("content") or "" for d in deltas) == text
        assert not any("tool_calls" in d for d in deltas)
    else:
        message = response.json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": text}


def test_tools_for_a_model_without_the_capability_are_refused_before_the_engine(
    proxy_factory, fake_vllm
) -> None:
    proxy = proxy_factory(
        [
            entry_for("plain", fake_vllm.url),
            entry_for("forwards", fake_vllm.url, allow_request_fields=["tools"]),
        ]
    )
    body = {"messages": MESSAGES, "tools": TOOLS}
    refused = proxy.client.post("/v1/chat/completions", json={**body, "model": "plain"})
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "capability_mismatch" and error["param"] == "tools"
    assert "capabilities.tools" in error["message"]
    assert fake_vllm.engine.requests == []
    forwarded = proxy.client.post("/v1/chat/completions", json={**body, "model": "forwards"})
    assert forwarded.status_code == 200
    assert fake_vllm.engine.requests[0].body["tools"] == TOOLS


@pytest.mark.parametrize("field", ["tools", "functions"])
@pytest.mark.parametrize("value", ["get_weather", {"type": "function"}, 3, True, ["get_weather"]])
def test_tools_that_are_not_a_list_of_objects_are_a_400_before_the_engine(
    proxy_factory, fake_vllm, field: str, value: object
) -> None:
    """Not a list (of objects): refused as OpenAI does. It used to slip past the capability
    check (a model without tools got it forwarded) and reach the engine as it was."""
    proxy = proxy_factory(
        [entry_for("plain", fake_vllm.url), entry_for("m", fake_vllm.url, capabilities=TOOL_CAPS)]
    )
    for model in ("plain", "m"):
        body = {"model": model, "messages": MESSAGES, field: value}
        response = proxy.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == field
    assert fake_vllm.engine.requests == []
