"""The other protocols against real vLLM 0.32 through the proxy (issue 25's vLLM arm), with the
real client libraries: the openai SDK's Responses (stream, not, a previous_response_id
follow-up and a retrieval by id), the anthropic SDK's messages (create, stream, count_tokens,
an engine's own error in Anthropic's envelope), langchain-openai on the Responses API.

vLLM 0.32 serves ``/v1/responses`` and ``/v1/messages`` (and ``count_tokens``) itself. It keeps
no responses unless started with ``VLLM_ENABLE_RESPONSES_API_STORE=1`` (checked here: a
retrieval by id from the engine is a 404), so the entry has no ``responses_stored`` and the
proxy chains the follow-up itself. The session's vLLM is warm here; the cold anthropic SDK
(autostart with loading comments) runs in ``test_zz_lifecycle.py``, on a start that test makes
anyway.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from tests.real_engine.conftest import CHAT, Stack

pytestmark = [pytest.mark.real_engine, pytest.mark.subprocess, pytest.mark.timeout(600)]


@pytest.fixture
def warm(stack: Stack) -> Stack:
    stack.activate(CHAT)
    return stack


def test_vllm_keeps_no_responses_of_its_own(warm: Stack) -> None:
    """What the entry's missing ``responses_stored`` rests on: straight at the engine, a made
    response cannot be retrieved."""
    engine = warm.engine_url()
    made = httpx.post(
        engine + "/v1/responses",
        json={"model": CHAT, "input": "Hi", "max_output_tokens": 4},
        timeout=120,
    )
    assert made.status_code == 200, made.text
    again = httpx.get(f"{engine}/v1/responses/{made.json()['id']}", timeout=30)
    assert again.status_code == 404 and "not found" in again.json()["error"]["message"]


def test_openai_responses_stream_not_and_a_follow_up(warm: Stack) -> None:
    client = openai.OpenAI(base_url=warm.url + "/v1", api_key="none", max_retries=0, timeout=300)
    events = list(
        client.responses.create(
            model=CHAT, input="What is the capital of France?", max_output_tokens=16, stream=True
        )
    )
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "Paris" in streamed
    first = client.responses.create(
        model=CHAT, input="My name is Ada.", max_output_tokens=16, temperature=0
    )
    assert first.output_text.strip() and first.usage is not None
    follow = client.responses.create(
        model=CHAT,
        input="What is my name?",
        max_output_tokens=16,
        temperature=0,
        previous_response_id=first.id,
    )
    assert follow.status in ("completed", "incomplete") and follow.output_text.strip()
    # The proxy kept the conversation (vLLM did not): it answers by id itself.
    assert client.responses.retrieve(follow.id).id == follow.id
    items = client.responses.input_items.list(follow.id)
    assert items.data
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nobody_made_this")
    client.close()
    # The follow-up reached vLLM with the conversation in place of previous_response_id.
    records = [r for r in warm.records() if r["endpoint"] == "responses"]
    assert [r["status"] for r in records[-3:]] == [200, 200, 200]
    assert all(r["completion_tokens"] and not r["usage_estimated"] for r in records[-3:])
    chained = records[-1]
    assert chained["prompt_tokens"] > records[-2]["prompt_tokens"], records[-2:]


def test_anthropic_sdk_create_stream_count_tokens(warm: Stack) -> None:
    client = anthropic.Anthropic(base_url=warm.url, api_key="none", max_retries=0, timeout=300)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = {"temperature": 0}  # the SDK (2.15) has no temperature argument; the API does
    message = client.messages.create(
        model=CHAT,
        max_tokens=16,
        messages=question,  # type: ignore[arg-type]
        extra_body=greedy,
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    assert "Paris" in text and message.usage.input_tokens > 0
    assert message.stop_reason in ("end_turn", "max_tokens")
    with client.messages.stream(
        model=CHAT,
        max_tokens=16,
        messages=question,  # type: ignore[arg-type]
        extra_body=greedy,
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed.strip() and final.usage.output_tokens > 0
    counted = client.messages.count_tokens(model=CHAT, messages=question)
    assert counted.input_tokens == message.usage.input_tokens  # the same prompt, vLLM's count
    # vLLM's own refusal (more tokens than the model's context) in Anthropic's envelope.
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=CHAT, max_tokens=5000, messages=question)
    assert refused.value.body["type"] == "error"  # type: ignore[index]
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "2048" in refused.value.body["error"]["message"]  # type: ignore[index]
    client.close()
    records = [r for r in warm.records() if r["endpoint"] in ("messages", "count_tokens")]
    usage = {(r["endpoint"], r["stream"]): r for r in records if r["status"] == 200}
    assert usage[("messages", True)]["completion_tokens"] > 0
    assert usage[("messages", False)]["prompt_tokens"] == message.usage.input_tokens
    assert not usage[("messages", True)]["usage_estimated"]
    assert ("count_tokens", False) in usage
    assert records[-1]["status"] == 400


def test_langchain_on_the_responses_api(warm: Stack) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=CHAT,
        base_url=warm.url + "/v1",
        api_key="none",  # type: ignore[arg-type]
        use_responses_api=True,
        max_tokens=16,  # type: ignore[call-arg]
        temperature=0,
        max_retries=0,
        timeout=300,
    )
    answer = chat.invoke("What is the capital of France?")
    assert "Paris" in answer.text
    assert warm.records()[-1]["endpoint"] == "responses"
