"""The official OpenAI Python SDK as a real client of the running proxy."""

from __future__ import annotations

import openai
import pytest

from testkit.fake_engine import entry_for

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


@pytest.fixture
def sdk(proxy_factory, fake_vllm, fake_ollama):
    proxy = proxy_factory(
        [
            entry_for("qwen", fake_vllm.url, served="served-qwen"),
            entry_for(
                "vision",
                fake_ollama.url,
                "ollama",
                "qwen2.5vl:7b",
                capabilities={"vision": True, "tools": True},
            ),
            entry_for("broken", fake_vllm.url, served="fail-500"),
        ]
    )
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


def test_models_list(sdk) -> None:
    assert [m.id for m in sdk.models.list()] == ["broken", "qwen", "vision"]
    assert sdk.models.retrieve("qwen").id == "qwen"


def test_chat_without_streaming(sdk) -> None:
    completion = sdk.chat.completions.create(model="qwen", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello from vllm!"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert completion._request_id  # the SDK exposes our x-request-id


def test_chat_streaming_with_tool_calls_and_usage(sdk) -> None:
    stream = sdk.chat.completions.create(
        model="vision",
        messages=MESSAGES,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert arguments == '{"city": "Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_chat_streaming_text(sdk) -> None:
    text = "".join(
        c.choices[0].delta.content or ""
        for c in sdk.chat.completions.create(model="qwen", messages=MESSAGES, stream=True)
        if c.choices
    )
    assert text == "Hello from vllm!"


def test_sdk_exceptions_carry_our_codes(sdk) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.code == "model_not_found" and missing.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="qwen", messages=[])
    assert bad.value.code == "invalid_request" and bad.value.param == "messages"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.ConflictError) as conflict:
        sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": [image]}])
    assert conflict.value.code == "capability_mismatch"
    with pytest.raises(openai.InternalServerError) as down:
        sdk.chat.completions.create(model="broken", messages=MESSAGES)
    assert down.value.status_code == 502 and down.value.code == "backend_unavailable"


def test_a_mid_stream_failure_raises_in_the_sdk(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("dies", fake_vllm.url, served="die")])
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    received = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        for chunk in client.chat.completions.create(model="dies", messages=MESSAGES, stream=True):
            received.append(chunk)
    assert received  # the chunks before the failure were delivered
