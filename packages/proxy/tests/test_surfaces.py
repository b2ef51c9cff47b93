"""Every surface of the endpoint table through a real proxy to fake engines that record what
they get: Responses (ids routed to their maker), Anthropic Messages (its envelope for every
error), rerank, audio, raw engine routes, the /v1-less aliases and the JSONL record of each."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from imageworks.chat_proxy.upstream.responses import ResponseBook
from testkit.entries import eventually
from testkit.fake_engine import entry_for, sse_events

MSG = {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def sdk(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0)


def claude(proxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="none", max_retries=0)


# --- Responses -------------------------------------------------------------------------------


def test_responses_stream_and_not_with_usage_in_the_record(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="served")])
    client = sdk(proxy)
    answer = client.responses.create(model="m", input="hi")
    assert answer.output_text == "Hello from vllm!"
    assert fake_vllm.engine.requests[-1].body["model"] == "served"
    events = list(client.responses.create(model="m", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello from vllm!"
    client.close()
    records = [r for r in proxy.records() if r["endpoint"] == "responses"]
    assert [r["stream"] for r in records] == [False, True]
    for record in records:
        assert record["status"] == 200 and record["error_code"] is None
        assert (record["prompt_tokens"], record["completion_tokens"]) == (7, 4)
        assert record["usage_estimated"] is False
    metrics = proxy.client.get("/metrics").text
    assert 'endpoint="responses",model="m",status="200"} 2.0' in metrics


def test_ids_reach_the_engine_that_made_them(proxy_factory, fake_vllm, fake_llamacpp) -> None:
    # Two engines that keep responses serve the same protocol: each id goes to its maker.
    proxy = proxy_factory(
        [
            entry_for("a", fake_vllm.url, responses_stored=True),
            entry_for("b", fake_llamacpp.url, "llamacpp", responses_stored=True),
        ]
    )
    made = proxy.client.post("/v1/responses", json={"model": "b", "input": "hi"}).json()
    rid = made["id"]
    assert rid.startswith("resp_llamacpp")
    before = len(fake_vllm.engine.requests)
    got = proxy.client.get(f"/v1/responses/{rid}")
    assert got.status_code == 200 and got.json()["id"] == rid
    assert proxy.client.get(f"/v1/responses/{rid}/input_items").json()["data"] == ["hi"]
    assert proxy.client.post(f"/v1/responses/{rid}/cancel").json()["status"] == "cancelled"
    # A follow-up naming the other model still reaches the engine that holds the response.
    follow = {"model": "a", "input": "more", "previous_response_id": rid}
    assert proxy.client.post("/v1/responses", json=follow).status_code == 200
    assert fake_llamacpp.engine.requests[-1].body["previous_response_id"] == rid
    assert proxy.client.delete(f"/v1/responses/{rid}").json()["deleted"] is True
    assert len(fake_vllm.engine.requests) == before  # nothing went to the other engine
    unknown = proxy.client.get("/v1/responses/resp_nobody")
    assert unknown.status_code == 404
    assert "not known to this proxy" in unknown.json()["error"]["message"]
    stray = proxy.client.post("/v1/responses", json={**follow, "previous_response_id": "resp_x"})
    assert stray.status_code == 404 and stray.json()["error"]["param"] == "previous_response_id"


def test_an_engine_without_a_store_gets_the_conversation(proxy_factory, fake_llamacpp) -> None:
    proxy = proxy_factory([entry_for("m", fake_llamacpp.url, "llamacpp")])
    client = sdk(proxy)
    first = client.responses.create(model="m", input="Remember 7.")
    second = client.responses.create(
        model="m", input="Which number?", previous_response_id=first.id
    )
    sent = fake_llamacpp.engine.requests[-1].body
    assert "previous_response_id" not in sent
    answer = [{"type": "output_text", "text": "Hello from llamacpp!", "annotations": []}]
    assert sent["input"] == [
        {"type": "message", "role": "user", "content": "Remember 7."},
        {"type": "message", "role": "assistant", "content": answer},
        {"type": "message", "role": "user", "content": "Which number?"},
    ]
    # The proxy answers requests by id for what it keeps.
    assert client.responses.retrieve(second.id).id == second.id
    items = proxy.client.get(f"/v1/responses/{second.id}/input_items").json()["data"]
    assert [i["content"] for i in items][-1] == "Which number?"
    background = proxy.client.post(
        "/v1/responses", json={"model": "m", "input": "x", "background": True}
    )
    assert background.status_code == 400 and background.json()["error"]["param"] == "background"
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    client.close()


def test_the_id_map_survives_a_restart_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "response_ids.tsv"
    book = ResponseBook(path, max_ids=3).load()
    for n in range(8):
        book.place(f"resp_{n}", f"model-{n % 2}")
    book.close()
    again = ResponseBook(path, max_ids=3).load()
    assert list(again.places) == ["resp_5", "resp_6", "resp_7"]
    assert again.where("resp_6") == "model-0" and again.where("resp_1") is None
    assert len(path.read_text().splitlines()) == 3  # rewritten to the bound at start
    again.close()


def test_an_engine_cannot_forge_placements_with_the_ids_it_makes(tmp_path: Path) -> None:
    # The id map's file is one "id<TAB>entry" line per id: an id with a newline or a tab (a
    # lying engine's) would write a line of its own, placing a victim's id at another engine
    # after a restart; an id of megabytes would cost that times MAX_IDS. Neither is kept.
    path = tmp_path / "response_ids.tsv"
    book = ResponseBook(path).load()
    book.place("resp_ok", "a")
    book.place("x\nresp_ok\tevil", "evil")
    book.place("y\tz", "evil")
    book.place("r" * 100_000, "evil")
    assert list(book.places) == ["resp_ok"]
    book.close()
    again = ResponseBook(path).load()
    assert dict(again.places) == {"resp_ok": "a"}
    again.close()


# --- Anthropic Messages ----------------------------------------------------------------------


def test_messages_with_the_anthropic_sdk(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="served")])
    client = claude(proxy)
    message = client.messages.create(model="m", **MSG)  # type: ignore[arg-type]
    assert message.content[0].text == "Hello from vllm!"  # type: ignore[union-attr]
    with client.messages.stream(model="m", **MSG) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
    assert text == "Hello from vllm!"
    counted = client.messages.count_tokens(model="m", messages=MSG["messages"])  # type: ignore[arg-type]
    assert counted.input_tokens > 0
    assert fake_vllm.engine.requests[-1].body["model"] == "served"
    client.close()
    records = proxy.records()
    usage = {
        (r["endpoint"], r["stream"]): (r["prompt_tokens"], r["completion_tokens"]) for r in records
    }
    assert usage[("messages", False)] == (9, 4) and usage[("messages", True)] == (9, 4)
    assert ("count_tokens", False) in usage


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    message: str = body["error"]["message"]
    return message


def test_every_proxy_error_on_messages_is_in_anthropics_envelope(proxy_factory, fake_vllm) -> None:
    closed = "http://127.0.0.1:9"  # nothing listens on the discard port
    proxy = proxy_factory(
        [
            entry_for("m", fake_vllm.url),
            entry_for("busy", fake_vllm.url, served="fail-503"),
            entry_for("chat-only", fake_vllm.url, protocols=["chat"]),
            entry_for("gone", closed),
            entry_for("one", fake_vllm.url, served="hang", max_concurrency=1),
        ],
        max_body_bytes=4096,
        max_queue=0,
    )
    post = proxy.client.post
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "whatever"}
    anthropic_error(post("/v1/messages", json={"model": "nope", **MSG}), 404, "not_found_error")
    anthropic_error(post("/v1/messages", json={"model": "m"}), 400, "invalid_request_error")
    anthropic_error(post("/v1/messages", content=b"{oops"), 400, "invalid_request_error")
    anthropic_error(
        post("/v1/messages", json={"model": "chat-only", **MSG}), 409, "invalid_request_error"
    )
    big = {"model": "m", **MSG, "system": "x" * 5000}
    anthropic_error(post("/v1/messages", json=big), 413, "request_too_large")
    anthropic_error(post("/v1/messages", json={"model": "gone", **MSG}), 502, "api_error")
    anthropic_error(post("/v1/messages", json={"model": "busy", **MSG}), 529, "overloaded_error")
    anthropic_error(proxy.client.get("/v1/messages"), 405, "invalid_request_error")
    # 429 with Retry-After: one request holds the only turn, the queue holds none.
    with httpx.Client(base_url=proxy.url, timeout=30) as other:

        def hold() -> None:
            with contextlib.suppress(httpx.TimeoutException):
                other.post("/v1/messages", json={"model": "one", **MSG}, timeout=3)

        held = threading.Thread(target=hold, daemon=True)
        held.start()
        assert eventually(
            lambda: any(r.body and r.body["model"] == "hang" for r in fake_vllm.engine.requests)
        )
        refused = post("/v1/messages", json={"model": "one", **MSG}, headers=headers)
        anthropic_error(refused, 429, "rate_limit_error")
        assert refused.headers["retry-after"] == "1"
        held.join(10)
    # The SDK reads the envelope: its exception classes by status, the message kept.
    client = claude(proxy)
    with pytest.raises(anthropic.NotFoundError, match="does not exist"):
        client.messages.create(model="nope", **MSG)  # type: ignore[arg-type]
    client.close()
    codes = {r["error_code"] for r in proxy.records() if r["endpoint"] == "messages"}
    assert {"err_model_not_found", "err_rate_limited", "err_backend_unavailable"} <= codes


def test_a_mid_stream_failure_is_an_anthropic_error_event(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, served="die")])
    body = proxy.client.post("/v1/messages", json={"model": "m", "stream": True, **MSG}).text
    last = body.strip().split("\n\n")[-1]
    assert last.startswith("event: error\n"), body
    data = json.loads(last.split("data: ", 1)[1])
    assert data["type"] == "error" and data["error"]["type"] == "api_error"
    responses = proxy.client.post(
        "/v1/responses", json={"model": "m", "input": "x", "stream": True}
    )
    assert json.loads(sse_events(responses.text)[-1])["type"] == "error"


# --- rerank, audio, raw routes, aliases ------------------------------------------------------


def test_rerank_needs_the_capability(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory(
        [
            entry_for("ranker", fake_vllm.url, served="rr", capabilities={"rerank": True}),
            entry_for("m", fake_vllm.url),
        ]
    )
    body = {"model": "ranker", "query": "q", "documents": ["a", "b", "c"]}
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        answer = proxy.client.post(path, json=body)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 3
        assert fake_vllm.engine.requests[-1].path == "/v1/rerank"
        assert fake_vllm.engine.requests[-1].body["model"] == "rr"
    refused = proxy.client.post("/v1/rerank", json={**body, "model": "m"})
    assert refused.status_code == 409 and "rerank" in refused.json()["error"]["message"]
    record = next(r for r in proxy.records() if r["endpoint"] == "rerank")
    assert record["prompt_tokens"] is None and record["usage_estimated"] is False


def test_audio_uploads_and_speech(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory(
        [
            entry_for("ears", fake_vllm.url, served="whisper", capabilities={"audio": True}),
            entry_for("voice", fake_vllm.url, "openai", capabilities={"speech": True}),
            entry_for("m", fake_vllm.url),
        ],
        max_body_bytes=64 * 1024,
    )
    client = sdk(proxy)
    audio = io.BytesIO(b"\x00\x01" * 5000)
    audio.name = "clip.wav"
    heard = client.audio.transcriptions.create(model="ears", file=audio)
    assert heard.text == "heard 10000 bytes with whisper"  # the served id, in the form
    assert fake_vllm.engine.requests[-1].headers["content-type"].startswith("multipart/form-data")
    translated = proxy.client.post(  # the SDK's translations are deprecated: plain multipart
        "/v1/audio/translations", data={"model": "ears"}, files={"file": ("a.wav", b"\x00" * 10)}
    )
    assert translated.json()["text"] == "heard 10 bytes with whisper"
    with pytest.raises(openai.APIStatusError) as refused:
        audio.seek(0)
        client.audio.transcriptions.create(model="m", file=audio)
    assert refused.value.status_code == 409
    big = io.BytesIO(b"\x00" * 100_000)
    big.name = "long.wav"
    with pytest.raises(openai.APIStatusError) as too_big:
        client.audio.transcriptions.create(model="ears", file=big)
    assert too_big.value.status_code == 413
    spoken = client.audio.speech.create(model="voice", voice="alloy", input="bonjour")
    assert spoken.content == b"RIFF" + bytes(range(256)) * 4 + b"bonjour"
    client.close()
    endpoints = {r["endpoint"] for r in proxy.records()}
    assert {"audio", "audio_translation", "speech"} <= endpoints


def test_raw_engine_routes_follow_the_allow_list(proxy_factory, fake_vllm, fake_llamacpp) -> None:
    proxy = proxy_factory(
        [entry_for("v", fake_vllm.url), entry_for("l", fake_llamacpp.url, "llamacpp")],
        admin_token="s3cret",
    )
    tokens = proxy.client.post("/upstream/v/tokenize", json={"content": "hi"})
    assert tokens.status_code == 200 and tokens.json() == {"tokens": [104, 105]}
    assert fake_vllm.engine.requests[-1].path == "/tokenize"  # the engine's root, not /v1
    for path in ("/upstream/v/sleep", "/upstream/v/collective_rpc", "/upstream/v/nowhere"):
        refused = proxy.client.post(path, json={})
        assert refused.status_code == 404, path
    assert all(r.path not in ("/sleep", "/collective_rpc") for r in fake_vllm.engine.requests)
    assert proxy.client.get("/upstream/l/props").json() == {"path": "/props", "method": "GET"}
    state_changing = proxy.client.post("/upstream/l/slots/0?action=erase", json={})
    assert state_changing.status_code in (401, 403)
    allowed = proxy.client.post(
        "/upstream/l/slots/0?action=erase", json={}, headers={"x-admin-token": "s3cret"}
    )
    assert allowed.status_code == 200 and fake_llamacpp.engine.requests[-1].path == "/slots/0"
    assert proxy.client.post("/upstream/nope/tokenize", json={}).status_code == 404
    assert {r["endpoint"] for r in proxy.records()} >= {"upstream"}


def test_the_paths_without_v1_and_the_load_state(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    models = proxy.client.get("/models").json()["data"]
    assert [m["id"] for m in models] == ["m"]
    assert models[0]["status"]["value"] == "unloaded"  # an external model not yet reached
    chat = proxy.client.post("/chat/completions", json={"model": "m", **MSG})
    assert chat.json()["choices"][0]["message"]["content"] == "Hello from vllm!"
    assert proxy.client.post("/completions", json={"model": "m", "prompt": "x"}).status_code == 200
    assert proxy.client.get("/v1/models/m").json()["status"]["value"] == "loaded"
