"""/v1/models, hot registry and profile changes, admin endpoints, health and metrics."""

from __future__ import annotations

import json

from testkit.entries import eventually
from testkit.fake_engine import entry_for

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def ids(proxy) -> list[str]:
    return [m["id"] for m in proxy.client.get("/v1/models").json()["data"]]


def test_models_are_filtered_by_profile_and_shaped_like_openai(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory(
        [
            entry_for("everywhere", fake_vllm.url, display_name="Everywhere"),
            entry_for("staging-only", fake_vllm.url, profiles=["staging"]),
            entry_for("old", fake_vllm.url, deprecated=True),
            {"name": "legacy", "backend": "unassigned"},
        ]
    )
    listing = proxy.client.get("/v1/models").json()
    assert listing["object"] == "list"
    (item,) = listing["data"]
    assert item["id"] == "everywhere" and item["object"] == "model"
    assert isinstance(item["created"], int) and item["owned_by"] == "imageworks"
    assert item["imageworks"]["display_name"] == "Everywhere"
    assert item["imageworks"]["backend"] == "vllm" and item["imageworks"]["state"] == "unknown"
    assert fake_vllm.engine.requests == []  # listing never wakes a backend


def test_get_model_by_any_name_including_slashes(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("org/model-7b", fake_vllm.url, display_name="Model 7B")])
    assert proxy.client.get("/v1/models/org/model-7b").json()["id"] == "org/model-7b"
    assert proxy.client.get("/v1/models/Model 7B").json()["id"] == "org/model-7b"
    assert proxy.client.get("/v1/models/nope").status_code == 404


def test_switching_profile_changes_the_listing_at_once(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory(
        [entry_for("a", fake_vllm.url), entry_for("s", fake_vllm.url, profiles=["staging"])]
    )
    assert ids(proxy) == ["a"]
    switched = proxy.client.put("/admin/profile", json={"name": "staging"})
    assert switched.json()["name"] == "staging"
    assert ids(proxy) == ["a", "s"]
    assert proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "s"}).status_code == 200
    bad = proxy.client.put("/admin/profile", json={"name": "nope"})
    assert bad.status_code == 400 and "known: production" in bad.json()["error"]["message"]
    proxy.server.stop()
    assert proxy.records("profile_change")[0]["profile"] == "staging"


def test_a_registry_edit_shows_without_a_restart(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("a", fake_vllm.url)])
    assert ids(proxy) == ["a"]
    proxy.write_registry([entry_for("a", fake_vllm.url), entry_for("b", fake_vllm.url)])
    assert eventually(lambda: ids(proxy) == ["a", "b"]), ids(proxy)
    reloads = 'chat_proxy_registry_reloads_total{result="ok"} 1.0'
    assert reloads in proxy.client.get("/metrics").text
    proxy.server.stop()
    (reload,) = proxy.records("registry_reload")
    assert reload["entries"] == 2


def test_a_bad_registry_edit_keeps_serving_the_last_good_one(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("a", fake_vllm.url)])
    version = proxy.client.get("/v1/healthz").json()["registry_version"]
    (proxy.root / "configs" / "model_registry.curated.json").write_text('[{"name": "a"')
    assert eventually(lambda: proxy.client.get("/v1/healthz").json()["registry_error"])
    health = proxy.client.get("/v1/healthz").json()
    assert health["registry_version"] == version and "not valid JSON" in health["registry_error"]
    assert ids(proxy) == ["a"]
    assert proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "a"}).status_code == 200
    forced = proxy.client.post("/admin/registry/reload")
    assert forced.status_code == 409 and forced.json()["error"]["code"] == "registry_invalid"
    assert proxy.client.get("/admin/state").json()["registry"]["last_error"]
    proxy.write_registry([entry_for("a", fake_vllm.url), entry_for("c", fake_vllm.url)])
    reloaded = proxy.client.post("/admin/registry/reload")
    assert reloaded.status_code == 200 and reloaded.json()["entries"] == 2
    assert proxy.client.get("/v1/healthz").json()["registry_error"] is None


def test_admin_state_requests_and_autostart(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "missing"})
    state = proxy.client.get("/admin/state").json()
    assert state["profile"] == "production" and state["autostart"] is True
    (model,) = state["models"]
    assert {
        k: model[k] for k in ("name", "backend", "visible", "managed", "state", "in_flight")
    } == {
        "name": "m",
        "backend": "vllm",
        "visible": True,
        "managed": False,
        "state": "ready",
        "in_flight": 0,
    }
    assert "admin_token" not in json.dumps(state["config"]).replace("admin_token_set", "")
    recent = proxy.client.get("/admin/requests", params={"limit": 5}).json()["data"]
    assert [r["error_code"] for r in recent] == ["err_model_not_found", None]
    assert proxy.client.get("/admin/requests", params={"limit": "x"}).status_code == 400
    assert proxy.client.put("/admin/autostart", json={"enabled": False}).json() == {
        "enabled": False
    }
    assert proxy.client.get("/admin/autostart").json() == {"enabled": False}
    assert proxy.client.put("/admin/autostart", json={"enabled": "no"}).status_code == 400


def test_healthz_and_metrics(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    for path in ("/v1/healthz", "/v1/health"):
        health = proxy.client.get(path).json()
        assert health["status"] == "ok" and health["models"] == 1
    text = proxy.client.get("/metrics").text
    assert (
        'chat_proxy_requests_total{backend="vllm",endpoint="chat",model="m",status="200"} 1.0'
        in text
    )
    assert 'chat_proxy_errors_total{code="model_not_found",endpoint="chat"} 1.0' in text
    assert 'chat_proxy_ttft_seconds_count{backend="vllm"} 1.0' in text
    assert 'chat_proxy_tokens_total{kind="completion",model="m"}' in text
    assert "chat_proxy_in_flight_requests 0.0" in text
