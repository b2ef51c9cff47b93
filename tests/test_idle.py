"""Idle unload, pinning and preload, with real engine processes (fake engines started through
the llama.cpp launch template) behind a real proxy. No timing assertions: each test waits for
an observable event, bounded only so that a broken test cannot hang."""

from __future__ import annotations

import json
from typing import Any

import pytest

from testkit.entries import eventually
from testkit.fake_engine import sse_events
from testkit.processes import FAKE_ENGINE_TEMPLATE

pytestmark = pytest.mark.subprocess
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def template() -> str:
    argv = json.loads(FAKE_ENGINE_TEMPLATE)
    argv[argv.index("{extra_args}")] = "--flavour=llamacpp"
    return json.dumps(argv)


def engine(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "llamacpp",
        "backend_config": {"model_path": "none"},
        **fields,
    }


def states(proxy: Any) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in proxy.client.get("/admin/state").json()["models"]}


def test_an_idle_model_is_unloaded_after_its_ttl_and_a_pinned_one_never(proxy_factory) -> None:
    proxy = proxy_factory(
        [engine("idle"), engine("pinned", pinned=True), engine("own-ttl", ttl_s=0)],
        llamacpp_launch_template=template(),
        idle_ttl_s=1,
    )
    for name in ("pinned", "own-ttl", "idle"):
        assert proxy.client.post("/v1/chat/completions", json={**CHAT, "model": name}).is_success
    left = states(proxy)["idle"]["idle_unload_in_s"]
    assert left is not None and 0 < left <= 1
    assert eventually(lambda: states(proxy)["idle"]["state"] == "stopped", 15)
    now = states(proxy)
    assert now["pinned"]["state"] == "ready" and now["pinned"]["idle_unload_in_s"] is None
    assert now["own-ttl"]["state"] == "ready"  # ttl_s 0 on the entry: never
    assert (
        'chat_proxy_idle_unloads_total{model="idle",reason="idle"} 1.0'
        in proxy.client.get("/metrics").text
    )
    # Unloaded is not broken: the next request starts it again.
    assert proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "idle"}).is_success
    proxy.server.stop()
    first = proxy.records("unload")[0]
    assert (first["model"], first["reason"]) == ("idle", "idle")


def test_a_stream_open_longer_than_the_ttl_is_never_cut(proxy_factory) -> None:
    # "slow" streams 10 chunks 50 ms apart: 0.5 s, longer than the 0.2 s TTL.
    proxy = proxy_factory(
        [engine("streamer", served_model_id="slow", ttl_s=0.2)],
        llamacpp_launch_template=template(),
    )
    answers = []
    for _ in range(2):
        answer = proxy.client.post(
            "/v1/chat/completions", json={**CHAT, "model": "streamer", "stream": True}
        )
        answers.append(sse_events(answer.text))
    for events in answers:
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
        assert len(events) >= 11  # every chunk arrived
    assert eventually(lambda: states(proxy)["streamer"]["state"] == "stopped", 15)
    proxy.server.stop()
    requests = proxy.records("request")
    unloads = [u for u in proxy.records("unload") if u["reason"] == "idle"]
    assert unloads and all(u["ts"] >= max(r["ts"] for r in requests) for u in unloads)


def test_preloaded_models_start_with_the_proxy(proxy_factory) -> None:
    proxy = proxy_factory(
        [engine("by-entry", preload=True), engine("by-setting"), engine("left-alone")],
        llamacpp_launch_template=template(),
        preload=("by-setting",),
    )
    assert eventually(
        lambda: (
            {n: m["state"] for n, m in states(proxy).items()}
            == {"by-entry": "ready", "by-setting": "ready", "left-alone": "stopped"}
        ),
        30,
    )
    proxy.server.stop()
    assert sorted(p["model"] for p in proxy.records("preload")) == ["by-entry", "by-setting"]
