"""Tool calls through a real proxy: relayed untouched, legacy function_call converted, prose
left as prose, tools refused for a model that does not declare them (issue 17)."""

from __future__ import annotations

import json

import httpx
import pytest

from imageworks.chat_proxy.request import toolcalls
from imageworks.chat_proxy.request.toolcalls import StreamConverter, convert_answer
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
    legacy = {"messages": MESSAGES, "functions": [TOOLS[0]["function"]], "model": "plain"}
    refused = proxy.client.post("/v1/chat/completions", json=legacy)
    assert refused.status_code == 409 and refused.json()["error"]["param"] == "functions"
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


# --- the conversion itself, over bytes --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "tools", "functions"),
    [
        ({}, False, False),
        ({"tools": [], "functions": []}, False, False),
        ({"tools": "x", "functions": {"name": "f"}}, False, False),
        ({"tools": TOOLS}, True, False),
        ({"functions": [TOOLS[0]["function"]]}, False, True),
    ],
)
def test_what_counts_as_declaring_tools_or_functions(
    body: dict[str, object], tools: bool, functions: bool
) -> None:
    assert toolcalls.declares_tools(body) is tools
    assert toolcalls.declares_functions(body) is functions


def answer(message: dict[str, object], finish: str = "stop", **more: object) -> bytes:
    choice = {"index": 0, "message": message, "finish_reason": finish}
    return json.dumps({"id": "x", "choices": [choice], **more}).encode()


def test_an_answer_without_a_function_call_is_returned_as_the_same_bytes() -> None:
    prose = b'{"choices": [{"message": {"content": "no function_call here"}}],   "x": 1}'
    assert convert_answer(prose) is prose
    broken = b'{"function_call": '
    assert convert_answer(broken) is broken
    listed = b'["function_call"]'
    assert convert_answer(listed) is listed
    odd = b'{"choices": "function_call"}'
    assert convert_answer(odd) is odd
    no_message = b'{"choices": [{"message": "function_call"}, 1]}'
    assert convert_answer(no_message) is no_message


def test_a_function_call_answer_is_converted_with_its_arguments_as_a_string() -> None:
    call = {"name": "f", "arguments": {"city": "Paris"}}
    got = json.loads(convert_answer(answer({"role": "assistant", "function_call": call})))
    (choice,) = got["choices"]
    (converted,) = choice["message"]["tool_calls"]
    assert converted["function"] == {"name": "f", "arguments": '{"city": "Paris"}'}
    assert converted["type"] == "function" and len(converted["id"]) == len("call_") + 24
    assert "function_call" not in choice["message"] and choice["finish_reason"] == "stop"
    bare = json.loads(convert_answer(answer({"function_call": {"name": "g"}}, "function_call")))
    assert bare["choices"][0]["message"]["tool_calls"][0]["function"] == {
        "name": "g",
        "arguments": "",
    }
    assert bare["choices"][0]["finish_reason"] == "tool_calls"


def test_an_answer_that_already_has_tool_calls_keeps_them() -> None:
    message = {"tool_calls": [{"id": "call_1"}], "function_call": {"name": "f"}}
    raw = answer(message, "tool_calls")
    assert convert_answer(raw) is raw
    only_reason = json.loads(convert_answer(answer({"content": "x"}, "function_call")))
    assert only_reason["choices"][0] == {
        "index": 0,
        "message": {"content": "x"},
        "finish_reason": "tool_calls",
    }


def event(delta: dict[str, object], index: int = 0, finish: str | None = None) -> bytes:
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


def deltas(out: bytes) -> list[dict[str, object]]:
    events = [e for e in out.split(b"\n\n") if e]
    assert all(e.startswith(b"data: {") for e in events), events
    return [json.loads(e[6:])["choices"][0] for e in events]


def test_a_stream_converts_each_choice_s_call_once_cut_anywhere() -> None:
    stream = (
        event({"content": "plain"})
        + event({"function_call": {"name": "f", "arguments": ""}})
        + event({"function_call": {"name": "g", "arguments": {"a": 1}}}, index=1)
        + event({"function_call": {"arguments": '{"x"'}})
        + event({"function_call": {"name": "f", "arguments": ": 1}"}}, finish="function_call")
        + b": keep-alive function_call\n\n"
        + b"data: {broken function_call\n\n"
        + b"data: [DONE]\n\n"
    )
    for cut in (1, 7, len(stream) // 2, len(stream)):
        converter = StreamConverter()
        out = b"".join(converter.feed(stream[at : at + cut]) for at in range(0, len(stream), cut))
        out += converter.flush()
        events = out.split(b"\n\n")
        assert events[-3:] == [b"data: {broken function_call", b"data: [DONE]", b""]
        assert events[-4] == b": keep-alive function_call"
        first, f1, g1, f2, f3 = deltas(b"\n\n".join(events[:5]))
        assert first["delta"] == {"content": "plain"}
        (piece,) = f1["delta"]["tool_calls"]
        assert piece == {
            "index": 0,
            "id": piece["id"],
            "type": "function",
            "function": {"name": "f", "arguments": ""},
        }
        (other,) = g1["delta"]["tool_calls"]
        assert other["id"] != piece["id"] and other["function"]["arguments"] == '{"a": 1}'
        assert f2["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]}
        assert f3["delta"]["tool_calls"][0]["function"] == {"name": "f", "arguments": ": 1}"}
        assert "id" not in f3["delta"]["tool_calls"][0]
        assert f3["finish_reason"] == "tool_calls"


def test_a_stream_holds_an_unfinished_event_and_passes_tool_calls_untouched() -> None:
    converter = StreamConverter()
    assert converter.feed(b"\n\n") == b"\n\n"
    assert converter.feed(b"data: {") == b""
    assert converter.flush() == b"data: {" and converter.flush() == b""
    modern = event({"tool_calls": [{"index": 0, "id": "call_1"}], "function_call": {"name": "f"}})
    assert json.loads(converter.feed(modern)[6:]) == json.loads(modern[6:])
    no_delta = b'data: {"choices": [{"delta": "function_call"}]}\n\n'
    assert converter.feed(no_delta) == no_delta


def test_a_stream_passes_other_events_byte_for_byte_wherever_it_is_cut() -> None:
    compact = b'data: {"choices":[{"index":0,"delta":{"content":"plain"}}]}\n\n'
    nameless = b'data: {"choices": [{"delta": {"function_call": {"name": "f"}}}]}\n\n'
    stream = compact + nameless + event({"function_call": {"arguments": "{}"}}) + compact
    for cut in (1, 5, 7, 50, len(stream)):
        converter = StreamConverter()
        out = b"".join(converter.feed(stream[at : at + cut]) for at in range(0, len(stream), cut))
        out += converter.flush()
        events = [e + b"\n\n" for e in out.split(b"\n\n")[:-1]]
        assert len(events) == 4 and events[0] == compact and events[3] == compact
        # A choice without an index is choice 0: its later deltas continue the same call.
        first, later = deltas(events[1] + events[2])
        assert first["delta"]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
        assert later["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
