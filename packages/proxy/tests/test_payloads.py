from __future__ import annotations

import json

import pytest

from imageworks.chat_proxy.errors import CapabilityMismatch, InvalidRequest, TemplateRequired
from imageworks.chat_proxy.request.payloads import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    ENGINE_CONTROL_FIELDS,
    check_capabilities,
    check_engine_fields,
    check_template,
    count_images,
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
    model = entry(generation_defaults={"max_tokens": 64, "stop": ["</s>"], "seed": 7})
    body = {"model": "m", "messages": MESSAGES, "max_completion_tokens": 5}
    sent = json.loads(prepare(CHAT, model, body, json.dumps(body).encode()))
    assert "max_tokens" not in sent
    assert sent["stop"] == ["</s>"] and sent["seed"] == 7  # the defaults after it still apply


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


# Every refusal, with the exact message a client sees (they name the field and what is wanted).
M = MESSAGES


@pytest.mark.parametrize(
    ("endpoint", "body", "param", "message"),
    [
        (CHAT, {"messages": M}, "model", "you must provide a model parameter (a non-empty string)"),
        (
            CHAT,
            {"model": " ", "messages": M},
            "model",
            "you must provide a model parameter (a non-empty string)",
        ),
        (CHAT, {"model": "m\x00"}, "model", "the model name contains control characters"),
        (CHAT, {"model": "m", "messages": M, "stream": 1}, "stream", "'stream' must be a boolean"),
        (
            CHAT,
            {"model": "m", "messages": M, "stream_options": []},
            "stream_options",
            "'stream_options' must be an object",
        ),
        (CHAT, {"model": "m", "messages": M, "top_p": "1"}, "top_p", "'top_p' must be a number"),
        (CHAT, {"model": "m", "messages": M, "min_p": False}, "min_p", "'min_p' must be a number"),
        (CHAT, {"model": "m", "messages": M, "n": True}, "n", "'n' must be a non-negative integer"),
        (
            CHAT,
            {"model": "m", "messages": M, "seed": -1},
            "seed",
            "'seed' must be a non-negative integer",
        ),
        (
            CHAT,
            {"model": "m", "messages": M, "top_k": "5"},
            "top_k",
            "'top_k' must be a non-negative integer",
        ),
        (
            CHAT,
            {"model": "m", "messages": M, "stop": 5},
            "stop",
            "'stop' must be a string or a list of strings",
        ),
        (
            CHAT,
            {"model": "m", "messages": M, "stop": ["a", None]},
            "stop",
            "'stop' must be a string or a list of strings",
        ),
        (CHAT, {"model": "m"}, "messages", "'messages' must be a non-empty list"),
        (CHAT, {"model": "m", "messages": {}}, "messages", "'messages' must be a non-empty list"),
        (
            CHAT,
            {"model": "m", "messages": [M[0], 3]},
            "messages[1]",
            "'messages[1]' must be an object",
        ),
        (
            CHAT,
            {"model": "m", "messages": [{"role": 1}]},
            "messages[0].role",
            "'messages[0].role' must be a string",
        ),
        (
            CHAT,
            {"model": "m", "messages": [{"role": "user", "content": {}}]},
            "messages[0].content",
            "'messages[0].content' must be a string, a list of parts or null",
        ),
        (
            CHAT,
            {"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages[0].content[0]",
            "'messages[0].content[0]' must be an object with a 'type'",
        ),
        (
            CHAT,
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text"}, {"type": 3}]}],
            },
            "messages[0].content[1]",
            "'messages[0].content[1]' must be an object with a 'type'",
        ),
        (COMPLETIONS, {"model": "m"}, "prompt", "'prompt' is required (a string or a list)"),
        (
            COMPLETIONS,
            {"model": "m", "prompt": 3, "messages": M},
            "prompt",
            "'prompt' is required (a string or a list)",
        ),
        (EMBEDDINGS, {"model": "m"}, "input", "'input' is required (a string or a list)"),
        (
            EMBEDDINGS,
            {"model": "m", "input": {}, "prompt": "x"},
            "input",
            "'input' is required (a string or a list)",
        ),
    ],
)
def test_every_refusal_names_its_field_and_says_what_is_wanted(
    endpoint: str, body: dict[str, object], param: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate(endpoint, body)
    assert (caught.value.param, caught.value.message) == (param, message)


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (CHAT, {"model": "m", "messages": M, "stream": True, "stream_options": {}}),
        (CHAT, {"model": "m", "messages": M, "stream": None, "temperature": None}),
        (CHAT, {"model": "m", "messages": M, "temperature": 0, "top_p": 1, "min_p": 0.5}),
        (CHAT, {"model": "m", "messages": M, "max_tokens": 0, "n": 0, "seed": 0, "top_k": 0}),
        (CHAT, {"model": "m", "messages": M, "max_tokens": None, "stop": "x"}),
        (CHAT, {"model": "m", "messages": M, "stop": []}),
        (CHAT, {"model": "m", "messages": M, "stop": ["a", "b"]}),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": None}]}),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        (COMPLETIONS, {"model": "m", "prompt": "x"}),
        (COMPLETIONS, {"model": "m", "prompt": ["x", "y"]}),
        (EMBEDDINGS, {"model": "m", "input": "x"}),
        (EMBEDDINGS, {"model": "m", "input": []}),
    ],
)
def test_valid_bodies_pass_and_return_the_model(endpoint: str, body: dict[str, object]) -> None:
    assert validate(endpoint, body) == "m"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "request body is empty; expected a JSON object"),
        (b" \n", "request body is empty; expected a JSON object"),
        (b"[1]", "request body must be a JSON object"),
        (b"null", "request body must be a JSON object"),
        (
            b"{",
            "request body is not valid JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
    ],
)
def test_bodies_that_are_not_objects_say_so(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_body(raw)
    assert caught.value.message == message and caught.value.param is None


def test_images_are_counted_across_messages_and_parts() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    body = {
        "messages": [
            {"role": "user", "content": [image, {"type": "text", "text": "and"}, image]},
            {"role": "user", "content": "plain"},
            "not a message",
            {"role": "user", "content": [{"type": "input_image"}, {"type": "image"}]},
        ]
    }
    assert count_images(body) == 4
    assert count_images({"messages": None}) == 0
    assert count_images({}) == 0


def test_capability_refusals_name_the_model_and_the_way_out() -> None:
    with pytest.raises(CapabilityMismatch) as not_embedding:
        check_capabilities(EMBEDDINGS, entry(), {"input": "x"})
    assert not_embedding.value.param == "model"
    assert not_embedding.value.message == "model 'm' is not an embedding model"
    embedder = entry(capabilities={"text": False, "embedding": True})
    with pytest.raises(CapabilityMismatch) as embedding_only:
        check_capabilities(CHAT, embedder, {"messages": M})
    assert embedding_only.value.param == "model"
    assert embedding_only.value.message == "model 'm' is an embedding model; use /v1/embeddings"
    check_capabilities(EMBEDDINGS, embedder, {"input": "x"})
    # Text and embedding both: chat is fine; text only: chat is fine; neither is not refused
    # as an embedding model.
    check_capabilities(CHAT, entry(capabilities={"text": True, "embedding": True}), {"messages": M})
    check_capabilities(CHAT, entry(capabilities={"text": False}), {"messages": M})
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    two = {"messages": [{"role": "user", "content": [image, image]}]}
    with pytest.raises(CapabilityMismatch) as no_vision:
        check_capabilities(CHAT, entry(), two)
    assert no_vision.value.param == "messages"
    assert no_vision.value.message == (
        "model 'm' does not accept images (2 sent); choose a model with the vision capability "
        "or send text only (or set vision.alt_text in its entry to send each image's alt_text "
        "instead)"
    )
    check_capabilities(COMPLETIONS, entry(), two)  # completions carry no images
    # An entry that opted in to alt text gets the images (vision.py replaces them).
    assert check_capabilities(CHAT, entry(vision={"alt_text": True}), two) == 2


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


@pytest.mark.parametrize("field", ["tools", "functions"])
def test_tools_for_a_model_without_the_tools_capability_are_refused(field: str) -> None:
    body = {"messages": M, field: TOOLS if field == "tools" else [TOOLS[0]["function"]]}
    with pytest.raises(CapabilityMismatch) as refused:
        check_capabilities(CHAT, entry(), body)
    assert refused.value.status == 409 and refused.value.param == field
    assert refused.value.message == (
        "model 'm' does not support tool calling (its entry has no capabilities.tools), so "
        f"'{field}' would be ignored or garbled; choose a model with the tools capability, or "
        'list "tools" in the entry\'s allow_request_fields to forward tools anyway'
    )
    check_capabilities(CHAT, entry(capabilities={"tools": True}), body)
    check_capabilities(CHAT, entry(allow_request_fields=["tools"]), body)  # the opt-out
    # An empty list declares no tools.
    check_capabilities(CHAT, entry(), {"messages": M, field: []})


def test_the_engine_field_refusal_says_how_to_allow_it() -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_engine_fields(entry(), {"chat_template_kwargs": {}})
    assert caught.value.message == (
        "'chat_template_kwargs' is not accepted from requests for model 'm': it controls the "
        "engine itself; list it in the entry's allow_request_fields to allow it"
    )


def test_the_served_id_alone_is_reason_to_re_encode() -> None:
    raw = b'{"model": "m", "input": "x"}'
    sent = prepare(EMBEDDINGS, entry(served_model_id="served"), json.loads(raw), raw)
    assert json.loads(sent) == {"model": "served", "input": "x"}


def test_stop_sequences_in_the_defaults_become_stop() -> None:
    model = entry(generation_defaults={"stop_sequences": ["</s>"]})
    sent = json.loads(prepare(CHAT, model, {"model": "m", "messages": M}, b""))
    assert sent == {"model": "m", "messages": M, "stop": ["</s>"]}
    both = entry(generation_defaults={"stop_sequences": ["</s>"], "stop": ["<eot>"]})
    sent = json.loads(prepare(CHAT, both, {"model": "m", "messages": M}, b""))
    assert sent["stop"] == ["<eot>"] and "stop_sequences" not in sent
    raw = json.dumps({"model": "m", "messages": M, "stop": "x"}).encode()
    assert prepare(CHAT, model, json.loads(raw), raw) is raw  # the request's own stop wins


def test_the_template_refusal_says_how_to_fix_it() -> None:
    with pytest.raises(TemplateRequired) as caught:
        check_template(entry(), required=True, template_needed=True)
    assert caught.value.param == "model"
    assert caught.value.message == (
        "model 'm' has no usable chat template; set chat_template in its registry entry "
        '(e.g. {"source": "external", "path": "configs/chat_templates/<model>.jinja"}) or start '
        "the proxy with CHAT_PROXY_REQUIRE_TEMPLATE=0"
    )


def test_a_body_nested_too_deeply_is_a_clear_400_when_parsed_or_re_encoded() -> None:
    from imageworks.chat_proxy.request.payloads import parse_body, prepare

    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidRequest) as parsed:
        parse_body(deep)
    assert parsed.value.message == "request body is nested too deeply"
    nested: list[object] = []
    for _ in range(100_000):  # built in Python: parsed fine, too deep to encode again
        nested = [nested]
    entry = ModelEntry.model_validate({"name": "m", "backend": "openai", "served_model_id": "s"})
    with pytest.raises(InvalidRequest) as encoded:
        prepare("chat", entry, {"model": "m", "messages": nested}, b"{}")
    assert encoded.value.message == "request body is nested too deeply"
