from __future__ import annotations

import json

import pytest

from imageworks.chat_proxy.errors import CapabilityMismatch, InvalidRequest, TemplateRequired
from imageworks.chat_proxy.payloads import (
    CHAT,
    EMBEDDINGS,
    ENGINE_CONTROL_FIELDS,
    check_capabilities,
    check_engine_fields,
    check_template,
    parse_body,
    prepare,
    validate,
)
from imageworks.model_loader.schema import ModelEntry

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": 3, "messages": MESSAGES}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": [7]}]}, "messages[0].content[0]"),
        ({"model": "m", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": MESSAGES, "temperature": True}, "temperature"),
        ({"model": "m", "messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "messages": MESSAGES, "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "messages": MESSAGES, "stop": [1]}, "stop"),
        ({"model": "m", "messages": MESSAGES, "stream_options": True}, "stream_options"),
    ],
)
def test_invalid_chat_bodies_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate(CHAT, body)
    assert caught.value.param == param and caught.value.status == 400


@pytest.mark.parametrize("raw", [b"", b"  ", b"{", b"[1]", b'"text"', b"\xff\xfe"])
def test_bodies_that_are_not_json_objects_are_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_body(raw)


def entry(**fields: object) -> ModelEntry:
    return ModelEntry.model_validate({"name": "m", "backend": "vllm", **fields})


def test_generation_defaults_fill_only_what_the_request_omits() -> None:
    model = entry(
        served_model_id="served",
        generation_defaults={
            "temperature": 0.2,
            "top_p": 0.9,
            "max_tokens": 64,
            "context_window": 8192,
        },
    )
    body = {"model": "m", "messages": MESSAGES, "temperature": 1.0}
    sent = json.loads(prepare(CHAT, model, body, b"ignored"))
    assert sent == {
        "model": "served",
        "messages": MESSAGES,
        "temperature": 1.0,
        "top_p": 0.9,
        "max_tokens": 64,
    }


def test_max_completion_tokens_counts_as_a_max_tokens_choice() -> None:
    model = entry(generation_defaults={"max_tokens": 64})
    body = {"model": "m", "messages": MESSAGES, "max_completion_tokens": 5}
    assert "max_tokens" not in json.loads(prepare(CHAT, model, body, json.dumps(body).encode()))


def test_an_unchanged_body_is_forwarded_as_the_same_bytes() -> None:
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}]}'
    assert prepare(CHAT, entry(), json.loads(raw), raw) is raw


def test_embeddings_get_no_generation_defaults() -> None:
    model = entry(generation_defaults={"temperature": 0.2})
    raw = b'{"model": "m", "input": "x"}'
    assert prepare(EMBEDDINGS, model, json.loads(raw), raw) is raw


def test_images_need_a_vision_model() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ],
    }
    with pytest.raises(CapabilityMismatch, match=r"does not accept images \(1 sent\)"):
        check_capabilities(CHAT, entry(), body)
    check_capabilities(CHAT, entry(capabilities={"vision": True}), body)


def test_embeddings_need_an_embedding_model_and_chat_a_text_model() -> None:
    with pytest.raises(CapabilityMismatch):
        check_capabilities(EMBEDDINGS, entry(), {"input": "x"})
    embedder = entry(capabilities={"text": False, "embedding": True})
    with pytest.raises(CapabilityMismatch, match="use /v1/embeddings"):
        check_capabilities(CHAT, embedder, {"messages": MESSAGES})


def test_template_requirement() -> None:
    with pytest.raises(TemplateRequired, match="CHAT_PROXY_REQUIRE_TEMPLATE=0"):
        check_template(entry(), required=True, template_needed=True)
    with pytest.raises(TemplateRequired):
        check_template(entry(chat_template={"source": "external"}), True, True)
    check_template(entry(chat_template={"source": "external", "path": "t.jinja"}), True, True)
    check_template(entry(), required=False, template_needed=True)
    check_template(entry(), required=True, template_needed=False)


@pytest.mark.parametrize("raw", [b'{"t": NaN}', b'{"t": Infinity}', b'{"t": [-Infinity]}'])
def test_nan_and_infinity_are_not_json(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="not a JSON number"):
        parse_body(raw)


def test_a_json_object_parses_with_numbers_as_they_are() -> None:
    assert parse_body(b' {"t": 1e400, "n": -0.5} ') == {"t": float("inf"), "n": -0.5}


@pytest.mark.parametrize("name", ["m\x00", "\x1fm", "m\x7f", "m\x9f", "m\n"])
def test_control_characters_in_the_model_name(name: str) -> None:
    with pytest.raises(InvalidRequest, match="control characters") as caught:
        validate(CHAT, {"model": name, "messages": MESSAGES})
    assert caught.value.param == "model"


@pytest.mark.parametrize("name", ["m", "org/model-7b", "Qwen2 7B (AWQ)", "m\xa0x", "模型"])
def test_printable_model_names_pass(name: str) -> None:
    assert validate(CHAT, {"model": name, "messages": MESSAGES}) == name


@pytest.mark.parametrize("field", ENGINE_CONTROL_FIELDS)
def test_engine_control_fields_need_the_entry_s_permission(field: str) -> None:
    body = {"model": "m", "messages": MESSAGES, field: {}}
    with pytest.raises(InvalidRequest) as caught:
        check_engine_fields(entry(), body)
    assert caught.value.param == field and caught.value.status == 400
    check_engine_fields(entry(allow_request_fields=[field]), body)
    others = [f for f in ENGINE_CONTROL_FIELDS if f != field]
    with pytest.raises(InvalidRequest):
        check_engine_fields(entry(allow_request_fields=others), body)
    check_engine_fields(entry(), {"model": "m", "messages": MESSAGES})
