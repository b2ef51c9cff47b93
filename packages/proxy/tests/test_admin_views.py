"""The console's read-only admin views: an engine log's tail and the registry with provenance."""

from __future__ import annotations

import json

from testkit.fake_engine import entry_for

BROKEN = {
    "name": "org/broken",
    "backend": "llamacpp",
    "backend_config": {"model_path": "/nowhere/model.gguf"},
}


def test_engine_log_tail_is_read_by_model_name_only(proxy_factory) -> None:
    proxy = proxy_factory([BROKEN], admin_token="t0k")
    admin = {"x-admin-token": "t0k"}
    log = proxy.root / "_staging" / "autostart" / "org%2Fbroken.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {n}\n" for n in range(1, 501)))
    answer = proxy.client.get(
        "/admin/logs", params={"model": "org/broken", "lines": 3}, headers=admin
    )
    assert answer.status_code == 200
    assert answer.json() == {
        "model": "org/broken",
        "source": "engine",
        "exists": True,
        "lines": ["line 498", "line 499", "line 500"],
    }
    executor = proxy.client.get(
        "/admin/logs", params={"model": "org/broken", "source": "executor"}, headers=admin
    ).json()
    assert executor["exists"] is False and executor["lines"] == []


def test_engine_log_refuses_what_is_not_a_model(proxy_factory) -> None:
    proxy = proxy_factory([BROKEN], admin_token="t0k")
    admin = {"x-admin-token": "t0k"}
    assert proxy.client.get("/admin/logs", params={"model": "org/broken"}).status_code == 401
    for model in ("../proxy.lock", "/etc/passwd", "org%2Fbroken"):
        answer = proxy.client.get("/admin/logs", params={"model": model}, headers=admin)
        assert answer.status_code == 404, model
        assert answer.json()["error"]["code"] == "model_not_found"
    for params in ({"model": "org/broken", "source": "/etc"}, {"model": "org/broken", "lines": 0}):
        answer = proxy.client.get("/admin/logs", params=params, headers=admin)
        assert (
            answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
        )


def test_registry_view_names_the_layer_of_each_field(proxy_factory, fake_vllm) -> None:
    ext = entry_for("ext", fake_vllm.url, "openai", profiles=["staging"])
    ext["backend_config"]["headers"] = {"Authorization": "Bearer s3cret"}
    proxy = proxy_factory([ext])
    configs = proxy.root / "configs"
    (configs / "model_registry.discovered.json").write_text(
        json.dumps([{"name": "ext", "backend": "openai", "family": "demo"}])
    )
    proxy.client.post("/admin/registry/reload").raise_for_status()
    view = proxy.client.get("/admin/registry").json()
    assert view["last_error"] is None and view["profile"] == "production"
    (entry,) = view["entries"]
    assert entry["name"] == "ext" and entry["visible"] is False
    assert entry["origins"]["family"] == "discovered"
    assert entry["origins"]["backend_config.base_url"] == "curated"
    assert [s["layer"] for s in entry["sources"]] == ["discovered", "curated"]
    assert entry["entry"]["backend_config"]["headers"] == {"Authorization": "<hidden>"}
    assert "s3cret" not in json.dumps(view)

    (configs / "model_registry.curated.json").write_text("[{")
    assert proxy.client.post("/admin/registry/reload").status_code == 409
    held = proxy.client.get("/admin/registry").json()
    assert "not valid JSON" in held["last_error"] and held["version"] == view["version"]
