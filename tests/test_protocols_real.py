"""The other protocols against the real embedded llama.cpp, with the real client libraries:
the openai SDK's Responses (stream, not, and a previous_response_id follow-up), the anthropic
SDK's messages (create, stream, count_tokens, on a cold model: autostart with loading
comments), langchain-openai on the Responses API, litellm's responses().

Written for whichever chat model the shipped registry provides (``shipped_chat_model``). The
``ENGINES`` parameter is the hook for the real_engine tier: a vLLM arm joins it there.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anthropic
import openai
import pytest

from testkit.entries import shipped_chat_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess  # a real llama.cpp server
ENGINES = ["llamacpp-embedded"]


@pytest.fixture(params=ENGINES)
def shipped(request: pytest.FixtureRequest, proxy_factory):
    """A proxy over the registry exactly as shipped, and its chat model's name."""
    entries = json.loads((REPO / "configs" / "model_registry.curated.json").read_text())
    proxy = proxy_factory(entries)
    shutil.copytree(REPO / "configs" / "chat_templates", proxy.root / "configs" / "chat_templates")
    return proxy, shipped_chat_model(entries)


def test_anthropic_sdk_on_a_cold_model(shipped) -> None:
    proxy, model = shipped
    client = anthropic.Anthropic(base_url=proxy.url, api_key="none", max_retries=0, timeout=120)
    # Cold: the stream opens with loading comments while the model starts; the SDK skips them.
    with client.messages.stream(
        model=model, max_tokens=12, messages=[{"role": "user", "content": "Say hello."}]
    ) as stream:
        text = "".join(stream.text_stream)
        try:
            final = stream.get_final_message()
        except AssertionError:  # no message_start came (once in CI, under load): say what did
            raise AssertionError(
                f"no message in the stream; the proxy's records: {proxy.records()}"
            ) from None
    assert text.strip() and final.usage.output_tokens > 0
    message = client.messages.create(
        model=model, max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.content and message.usage.input_tokens > 0
    counted = client.messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "How many tokens is this?"}]
    )
    assert counted.input_tokens > 0
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
        )
    client.close()
    records = {(r["endpoint"], r["stream"]): r for r in proxy.records() if r["status"] == 200}
    cold, warm = records[("messages", True)], records[("messages", False)]
    assert cold["load_ms"] > 0 and warm["load_ms"] == 0
    assert cold["completion_tokens"] > 0 and cold["usage_estimated"] is False
    assert warm["prompt_tokens"] > 0 and warm["usage_estimated"] is False


def test_cold_count_tokens_autostarts(shipped) -> None:
    proxy, model = shipped
    client = anthropic.Anthropic(base_url=proxy.url, api_key="none", max_retries=0, timeout=120)
    counted = client.messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "Count me."}]
    )
    assert counted.input_tokens > 0
    client.close()


def test_openai_responses_and_a_follow_up(shipped) -> None:
    proxy, model = shipped
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0, timeout=120)
    events = list(
        client.responses.create(model=model, input="Say hello.", max_output_tokens=12, stream=True)
    )
    assert events[-1].type == "response.completed"
    first = client.responses.create(model=model, input="My name is Ada.", max_output_tokens=12)
    assert first.output_text.strip()
    follow = client.responses.create(
        model=model, input="What is my name?", max_output_tokens=12, previous_response_id=first.id
    )
    assert follow.status == "completed" and follow.output_text is not None
    assert client.responses.retrieve(follow.id).id == follow.id
    client.close()
    records = [r for r in proxy.records() if r["endpoint"] == "responses"]
    assert len(records) == 3 and all(r["status"] == 200 for r in records)
    assert all(r["completion_tokens"] and not r["usage_estimated"] for r in records)
    by_id = [r for r in proxy.records() if r["endpoint"] == "response_by_id"]
    assert [r["status"] for r in by_id] == [200]


def test_langchain_on_the_responses_api(shipped) -> None:
    from langchain_openai import ChatOpenAI

    proxy, model = shipped
    chat = ChatOpenAI(
        model=model,
        base_url=proxy.url + "/v1",
        api_key="none",  # type: ignore[arg-type]
        use_responses_api=True,
        max_tokens=12,  # type: ignore[call-arg]
        max_retries=0,
        timeout=120,
    )
    answer = chat.invoke("Say hello.")
    assert answer.text.strip()
    assert any(r["endpoint"] == "responses" for r in proxy.records())


def test_litellm_responses_stream_and_a_follow_up(shipped, monkeypatch) -> None:
    """litellm's ``responses()`` with an ``openai/`` model and the proxy as its base: the
    Responses API passed through (not litellm's chat bridge), streamed and not, and a
    ``previous_response_id`` follow-up that reaches the engine that made the first."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub
    with warnings.catch_warnings():  # its import warns of its own deprecations
        warnings.simplefilter("ignore")
        import litellm

    proxy, model = shipped
    # litellm fakes a stream (one non-stream request) for a model it has no facts about; a
    # user who names the model's facts gets the real one.
    litellm.register_model(
        {f"openai/{model}": {"litellm_provider": "openai", "supports_native_streaming": True}}
    )
    common = {
        "model": f"openai/{model}",
        "api_base": proxy.url + "/v1",
        "api_key": "none",
        "max_output_tokens": 12,
        "timeout": 120,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = litellm.responses(input="My name is Ada.", **common)
        follow = litellm.responses(
            input="What is my name?", previous_response_id=first.id, **common
        )
        events = list(litellm.responses(input="Say hello.", stream=True, **common))
    assert first.status == "completed" and first.output
    assert follow.status == "completed"
    assert [e.type for e in events][-1] == "response.completed"
    records = [r for r in proxy.records() if r["endpoint"] == "responses"]
    assert [r["status"] for r in records] == [200, 200, 200], records
    assert [r["stream"] for r in records] == [False, False, True]
    assert all(r["completion_tokens"] and not r["usage_estimated"] for r in records)
