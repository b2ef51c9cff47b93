"""Every error path ends in an OpenAI envelope with the right status, and in the JSONL log."""

from __future__ import annotations

import json

import pytest

from testkit.fake_engine import entry_for, sse_events
from testkit.servers import free_port

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def envelope(response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_unknown_model_is_404_with_suggestions(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("qwen2-7b-instruct", fake_vllm.url)])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "qwen2-7b"})
    error = envelope(answer)
    assert answer.status_code == 404 and error["code"] == "model_not_found"
    assert "did you mean 'qwen2-7b-instruct'" in error["message"]
    assert error["param"] == "model"


def test_a_model_outside_the_active_profile_is_404(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("staged", fake_vllm.url, profiles=["staging"])])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "staged"})
    assert answer.status_code == 404
    assert "not offered in deployment profile 'production'" in envelope(answer)["message"]


def test_backend_4xx_passes_through(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="fail-400")])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert answer.status_code == 400
    assert envelope(answer)["message"] == "scripted failure fail-400"


def test_backend_5xx_is_502(proxy_factory, fake_ollama) -> None:
    proxy = proxy_factory([entry_for("m", fake_ollama.url, "ollama", "fail-500")])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert answer.status_code == 502 and envelope(answer)["code"] == "backend_unavailable"


def test_ollama_model_not_pulled_is_its_404(proxy_factory, fake_ollama) -> None:
    proxy = proxy_factory([entry_for("m", fake_ollama.url, "ollama", "never-pulled:1b")])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert answer.status_code == 404 and "try pulling it first" in envelope(answer)["message"]


def test_nothing_listening_is_502_and_logged(proxy_factory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = proxy_factory([entry_for("m", dead)])
    for stream in (False, True):
        answer = proxy.client.post(
            "/v1/chat/completions", json={**CHAT, "model": "m", "stream": stream}
        )
        assert answer.status_code == 502
        assert envelope(answer)["code"] == "backend_unavailable"
        assert "cannot connect" in envelope(answer)["message"]
    models = proxy.client.get("/v1/models").json()["data"]
    assert models[0]["imageworks"]["state"] == "unreachable"
    proxy.server.stop()
    assert [r["error_code"] for r in proxy.records()] == ["err_backend_unavailable"] * 2
    assert [r["status"] for r in proxy.records()] == [502, 502]


def test_a_backend_that_never_answers_is_504(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="hang")], read_timeout_s=0.5)
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert answer.status_code == 504 and envelope(answer)["code"] == "backend_timeout"


def test_a_backend_dying_mid_stream_ends_with_an_error_event_and_done(
    proxy_factory, fake_vllm
) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="die")])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    assert answer.status_code == 200
    events = sse_events(answer.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "backend_unavailable" and "mid-stream" in error["message"]
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "Hello"
    proxy.server.stop()
    (record,) = proxy.records()
    assert record["status"] == 200 and record["error_code"] == "err_backend_unavailable"


def test_a_stream_that_goes_silent_times_out_in_band(proxy_factory, fake_llamacpp) -> None:
    proxy = proxy_factory(
        [entry_for("m", fake_llamacpp.url, "llamacpp", "hang-stream")], read_timeout_s=0.5
    )
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    events = sse_events(answer.text)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "backend_timeout"


def test_template_required_for_vllm_unless_disabled(proxy_factory, fake_vllm) -> None:
    bare = entry_for("m", fake_vllm.url)
    del bare["chat_template"]
    proxy = proxy_factory([bare])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert answer.status_code == 409 and envelope(answer)["code"] == "template_required"
    assert "CHAT_PROXY_REQUIRE_TEMPLATE=0" in envelope(answer)["message"]
    relaxed = proxy_factory([bare], require_template=False)
    assert (
        relaxed.client.post("/v1/chat/completions", json={**CHAT, "model": "m"}).status_code == 200
    )


def test_images_to_a_text_model_are_409(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    answer = proxy.client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": [image]}]},
    )
    assert answer.status_code == 409 and envelope(answer)["code"] == "capability_mismatch"


def test_a_body_over_the_limit_is_413(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)], max_body_bytes=4096)
    big = {**CHAT, "model": "m", "padding": "x" * 5000}
    answer = proxy.client.post("/v1/chat/completions", json=big)
    assert answer.status_code == 413 and envelope(answer)["code"] == "payload_too_large"

    def chunks():  # no content-length: the limit is enforced while reading
        yield json.dumps(big).encode()

    answer = proxy.client.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 413


def body_of_exactly(size: int) -> bytes:
    head = json.dumps({**CHAT, "model": "m", "padding": ""}).encode()
    body = head[:-2] + b"x" * (size - len(head)) + head[-2:]
    assert len(body) == size
    return body


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not(
    proxy_factory, fake_vllm, chunked: bool
) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)], max_body_bytes=4096)

    def post(body: bytes) -> int:
        content = iter([body[:100], body[100:]]) if chunked else body
        return proxy.client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        ).status_code

    assert post(body_of_exactly(4096)) == 200
    assert post(body_of_exactly(4097)) == 413


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": [{"role": "user"}], "temperature": "x"}', "temperature"),
        (b'{"messages": []}', "model"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(
    proxy_factory, fake_vllm, body: bytes, param: str | None
) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    answer = proxy.client.post("/v1/chat/completions", content=body)
    assert answer.status_code == 400
    error = envelope(answer)
    assert error["code"] == "invalid_request" and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_are_enveloped(proxy_factory) -> None:
    proxy = proxy_factory([])
    missing = proxy.client.get("/v1/nothing")
    assert missing.status_code == 404 and envelope(missing)["code"] == "not_found"
    wrong = proxy.client.get("/v1/chat/completions")
    assert wrong.status_code == 405 and envelope(wrong)["code"] == "method_not_allowed"


def test_api_keys_protect_v1_but_not_health(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)], api_keys=("k1", "k2"))
    denied = proxy.client.get("/v1/models")
    assert denied.status_code == 401 and envelope(denied)["code"] == "unauthorized"
    assert envelope(denied)["type"] == "authentication_error"
    assert proxy.client.get("/v1/models", headers={"authorization": "Bearer k2"}).status_code == 200
    assert proxy.client.get("/v1/models", headers={"x-api-key": "k1"}).status_code == 200
    assert (
        proxy.client.post(
            "/v1/chat/completions",
            json={**CHAT, "model": "m"},
            headers={"authorization": "Bearer nope"},
        ).status_code
        == 401
    )
    assert proxy.client.get("/v1/healthz").status_code == 200


def test_the_admin_token_protects_admin(proxy_factory) -> None:
    proxy = proxy_factory([], admin_token="t0k")
    assert proxy.client.get("/admin/state").status_code == 401
    assert proxy.client.get("/admin/state", headers={"x-admin-token": "t0k"}).status_code == 200
    assert (
        proxy.client.put(
            "/admin/profile", json={"name": "testing"}, headers={"authorization": "Bearer bad"}
        ).status_code
        == 401
    )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_and_never_reach_the_engine(
    proxy_factory, fake_vllm, constant: str
) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": '
    answer = proxy.client.post("/v1/chat/completions", content=body + constant.encode() + b"}")
    assert answer.status_code == 400
    assert constant.lstrip("-") in envelope(answer)["message"]
    assert envelope(answer)["code"] == "invalid_request"
    assert fake_vllm.engine.requests == []


@pytest.mark.parametrize("name", ["ok\u0000", "ok\r\n", "o\tk", "ok\u007f", "ok\u0085"])
def test_control_characters_in_a_model_name_are_400(proxy_factory, fake_vllm, name: str) -> None:
    proxy = proxy_factory([entry_for("ok", fake_vllm.url)])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": name})
    assert answer.status_code == 400 and envelope(answer)["param"] == "model"
    assert fake_vllm.engine.requests == []
    assert (
        proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "OK"}).status_code == 200
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}"),
        ("chat_template_kwargs", {"enable_thinking": True}),
        ("mm_processor_kwargs", {"num_crops": 64}),
        ("logits_processors", ["some.module.Processor"]),
        ("vllm_xargs", {"x": 1}),
        ("kv_transfer_params", {"remote": "x"}),
    ],
)
def test_engine_control_fields_are_refused_unless_the_entry_allows_them(
    proxy_factory, fake_vllm, field: str, value: object
) -> None:
    proxy = proxy_factory(
        [
            entry_for("strict", fake_vllm.url),
            entry_for("trusting", fake_vllm.url, allow_request_fields=[field]),
        ]
    )
    refused = proxy.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "strict", field: value}
    )
    assert refused.status_code == 400
    error = envelope(refused)
    assert error["param"] == field and f"'{field}'" in error["message"]
    assert fake_vllm.engine.requests == []
    allowed = proxy.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "trusting", field: value}
    )
    assert allowed.status_code == 200
    (sent,) = fake_vllm.engine.requests
    assert sent.body is not None and sent.body[field] == value


def test_a_tool_call_event_arriving_in_pieces_is_not_a_silent_backend(
    proxy_factory, fake_vllm
) -> None:
    # The legacy function_call event comes in pieces 0.1 s apart, 1.5 s to arrive whole: each
    # piece resets the 0.5 s idle limit, though the converter sends nothing until the event ends.
    entry = entry_for(
        "m",
        fake_vllm.url,
        served="function-call-trickle",
        capabilities={"text": True, "tools": True},
    )
    proxy = proxy_factory([entry], read_timeout_s=0.5)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    body = {**CHAT, "model": "m", "tools": tools, "stream": True}
    answer = proxy.client.post("/v1/chat/completions", json=body)
    events = sse_events(answer.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
