"""GPU leases through the proxy's HTTP API, with a fake GPU shared by a fake Ollama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testkit.entries import eventually
from testkit.fake_engine import entry_for
from testkit.gpu import FakeProbe

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def ollama_entry(url: str) -> dict[str, object]:
    return {
        "name": "vision",
        "backend": "ollama",
        "served_model_id": "qwen2.5vl:7b",
        "vram_estimate_mb": 9000,
        "backend_config": {"base_url": url + "/v1"},
        "capabilities": {"vision": True},
    }


def metrics(proxy) -> dict[str, float]:
    """Every /metrics sample, by its name and labels as written."""
    samples = {}
    for line in proxy.client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_lease_cycle_over_http(proxy_factory, fake_ollama, fake_vllm) -> None:
    engine = fake_ollama.engine
    engine.vram_mb = {"qwen2.5vl:7b": 9000}
    probe = FakeProbe(24000, engine.holdings)
    proxy = proxy_factory(
        [ollama_entry(fake_ollama.url), entry_for("cpu-model", fake_vllm.url, "openai")],
        probe=probe,
    )
    http = proxy.client
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "vision"}).status_code == 200
    assert engine.loaded and http.get("/v1/gpu/status").json()["gpu"]["used_mb"] == 9000
    before = metrics(proxy)
    assert before["chat_proxy_vram_total_mb"] == 24000
    assert before["chat_proxy_vram_used_mb"] == 9000
    assert before["chat_proxy_gpu_lease_active"] == 0

    granted = http.post(
        "/v1/gpu/lease",
        json={"owner": "judge-vision", "reason": "stage 2", "ttl_s": 60, "restart_model": False},
    )
    assert granted.status_code == 200, granted.text
    token = granted.json()["token"]
    assert granted.json()["lease"]["evicted"] == ["vision"]
    assert engine.loaded == {}  # Ollama unloaded it through keep_alive 0
    status = http.get("/v1/gpu/status").json()
    assert status["leased"] and status["lease"]["owner"] == "judge-vision"
    assert status["gpu"]["used_mb"] == 0 and token not in json.dumps(status)
    during = metrics(proxy)
    assert during["chat_proxy_gpu_lease_active"] == 1
    assert during['chat_proxy_gpu_lease_events_total{event="granted"}'] == 1
    assert during['chat_proxy_evictions_total{reason="lease"}'] == 1
    assert during["chat_proxy_vram_used_mb"] == 0

    blocked = http.post("/v1/chat/completions", json={**CHAT, "model": "vision"})
    assert blocked.status_code == 423 and blocked.json()["error"]["code"] == "gpu_lease_active"
    assert blocked.json()["error"]["type"] == "invalid_request_error"
    assert blocked.headers["retry-after"]
    for wrong in ("wrong", token[:-1], token + "x", token.upper()):
        refused = http.post(
            "/v1/chat/completions",
            json={**CHAT, "model": "vision"},
            headers={"x-gpu-lease-token": wrong},
        )
        assert refused.status_code == 423, wrong
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "cpu-model"}).status_code == 200
    mine = http.post(
        "/v1/chat/completions",
        json={**CHAT, "model": "vision"},
        headers={"x-gpu-lease-token": token},
    )
    assert mine.status_code == 200

    again = http.post("/v1/gpu/lease", json={"owner": "someone-else"})
    assert again.status_code == 423
    renewed = http.post("/v1/gpu/renew", json={"token": token}).json()["lease"]
    assert renewed["renewed_at"] >= status["lease"]["renewed_at"]
    assert http.post("/v1/gpu/release", json={"token": "wrong"}).status_code == 400
    released = http.post("/v1/gpu/release", json={"token": token})
    assert released.json() == {"status": "released", "restoring": []}
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "vision"}).status_code == 200
    after = metrics(proxy)
    assert after["chat_proxy_gpu_lease_active"] == 0
    assert after['chat_proxy_gpu_lease_events_total{event="released"}'] == 1
    proxy.server.stop()
    events = [r["event"] for r in proxy.records("lease_granted") + proxy.records("evict")]
    assert events == ["lease_granted", "evict"]


def test_first_use_of_an_ollama_model_evicts_an_idle_one_to_make_room(
    proxy_factory, fake_ollama
) -> None:
    engine = fake_ollama.engine
    engine.vram_mb = {"qwen2.5vl:7b": 9000, "llama3.1:8b": 16000}
    big = {**ollama_entry(fake_ollama.url), "name": "big", "served_model_id": "llama3.1:8b"}
    big["vram_estimate_mb"] = 16000
    proxy = proxy_factory(
        [ollama_entry(fake_ollama.url), big], probe=FakeProbe(24000, engine.holdings)
    )
    http = proxy.client
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "vision"}).status_code == 200
    assert list(engine.loaded) == ["qwen2.5vl:7b"]
    # 9000 + 16000 + 1024 of headroom > 24000: Ollama would load "big" next to "vision" and
    # spill; the proxy unloads the idle "vision" first.
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "big"}).status_code == 200
    assert engine.unload_requests == ["/api/generate qwen2.5vl:7b"]
    assert list(engine.loaded) == ["llama3.1:8b"]
    assert metrics(proxy)['chat_proxy_evictions_total{reason="start"}'] == 1
    proxy.server.stop()
    (evicted,) = proxy.records("evict")
    assert evicted["model"] == "vision" and evicted["reason"] == "start big"


def test_force_release_and_validation(proxy_factory) -> None:
    proxy = proxy_factory([], probe=FakeProbe(24000))
    http = proxy.client
    assert http.post("/v1/gpu/lease", json={"reason": "no owner"}).status_code == 400
    assert http.post("/v1/gpu/lease", json={"owner": "x", "ttl_s": -1}).status_code == 400
    assert http.post("/v1/gpu/lease", json={"owner": "x", "need_mb": "lots"}).status_code == 400
    assert http.post("/v1/gpu/force_release").json()["status"] == "idle"
    http.post("/v1/gpu/lease", json={"owner": "stuck-client", "ttl_s": 600})
    assert http.post("/v1/gpu/force_release", json={"owner": "other"}).status_code == 400
    assert http.post("/v1/gpu/force_release", json={"max_age_s": 3600}).status_code == 400
    assert (
        http.post("/v1/gpu/force_release", json={"owner": "stuck-client"}).json()["status"]
        == "released"
    )
    assert http.get("/v1/gpu/status").json()["leased"] is False


def test_lease_mutations_need_the_admin_token_when_one_is_set(proxy_factory) -> None:
    proxy = proxy_factory([], probe=FakeProbe(24000), admin_token="s3cret")
    http = proxy.client
    assert http.post("/v1/gpu/lease", json={"owner": "x"}).status_code == 401
    assert http.get("/v1/gpu/status").status_code == 200
    granted = http.post("/v1/gpu/lease", json={"owner": "x"}, headers={"x-admin-token": "s3cret"})
    assert granted.status_code == 200


def test_an_expired_lease_frees_the_gpu_for_everyone(proxy_factory, fake_ollama) -> None:
    proxy = proxy_factory([ollama_entry(fake_ollama.url)], probe=FakeProbe(24000))
    # A TTL long enough for the first refusal on a loaded machine, short enough to wait out.
    proxy.client.post("/v1/gpu/lease", json={"owner": "gone-away", "ttl_s": 3})
    chat = {**CHAT, "model": "vision"}
    assert proxy.client.post("/v1/chat/completions", json=chat).status_code == 423
    assert eventually(lambda: not proxy.client.get("/v1/gpu/status").json()["leased"])
    assert proxy.client.post("/v1/chat/completions", json=chat).status_code == 200
    assert metrics(proxy)['chat_proxy_gpu_lease_events_total{event="expired"}'] == 1


def test_the_lease_survives_a_proxy_restart(proxy_factory, fake_ollama) -> None:
    first = proxy_factory([ollama_entry(fake_ollama.url)], probe=FakeProbe(24000))
    token = first.client.post("/v1/gpu/lease", json={"owner": "jv", "ttl_s": 600}).json()["token"]
    lease_file = first.root / "_staging" / "gpu_lease.json"
    saved = lease_file.read_text()
    first.server.stop()  # a graceful stop releases it; put back what a crash would leave
    lease_file.write_text(saved)
    from imageworks.chat_proxy.app import create_app
    from testkit.servers import UvicornServer

    again = UvicornServer(create_app(first.config, probe=FakeProbe(24000)))
    try:
        import httpx

        with httpx.Client(base_url=again.url) as http:
            assert http.get("/v1/gpu/status").json()["lease"]["owner"] == "jv"
            chat = {**CHAT, "model": "vision"}
            assert http.post("/v1/chat/completions", json=chat).status_code == 423
            assert (
                http.post(
                    "/v1/chat/completions", json=chat, headers={"x-gpu-lease-token": token}
                ).status_code
                == 200
            )
    finally:
        again.stop()


def test_release_restores_the_ollama_model_the_lease_evicted(proxy_factory, fake_ollama) -> None:
    engine = fake_ollama.engine
    engine.vram_mb = {"qwen2.5vl:7b": 9000}
    proxy = proxy_factory([ollama_entry(fake_ollama.url)], probe=FakeProbe(24000, engine.holdings))
    http = proxy.client
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "vision"}).status_code == 200
    token = http.post("/v1/gpu/lease", json={"owner": "jv", "restart_model": True}).json()["token"]
    assert engine.loaded == {}
    released = http.post("/v1/gpu/release", json={"token": token}).json()
    assert released == {"status": "released", "restoring": ["vision"]}
    assert eventually(lambda: "qwen2.5vl:7b" in engine.loaded)  # loaded again through Ollama
    proxy.server.stop()
    assert [r["result"] for r in proxy.records("restore")] == ["ready"]


@pytest.mark.subprocess
def test_declared_budget_admits_a_model_that_fits_an_empty_budget(proxy_factory, fake_vllm) -> None:
    """No NVML: the declared sizes are the ledger. A 14,000 MB model on an empty 20,000 MB
    budget must start; the model being started must not count against itself."""
    template = [
        "{python}",
        "-m",
        "testkit.fake_engine",
        "--port",
        "{port}",
        "--flavour",
        "llamacpp",
    ]
    big = {
        "name": "big",
        "backend": "llamacpp",
        "vram_estimate_mb": 14000,
        "backend_config": {"model_path": "none"},
    }
    other = {**big, "name": "other", "vram_estimate_mb": 8000}
    proxy = proxy_factory(
        [big, other],
        gpu_probe="none",
        gpu_total_mb=20000,
        gpu_headroom_mb=1000,
        llamacpp_launch_template=json.dumps(template),
    )
    http = proxy.client
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "big"}).status_code == 200
    assert http.get("/v1/gpu/status").json()["gpu"] == {
        "name": "declared budget",
        "total_mb": 20000,
        "used_mb": 14000,
        "free_mb": 6000,
    }
    # 14,000 + 8,000 + 1,000 headroom > 20,000: the idle big model makes room for the other
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "other"}).status_code == 200
    states = {m["name"]: m["state"] for m in http.get("/admin/state").json()["models"]}
    assert states == {"big": "stopped", "other": "ready"}


FAKE_LLAMACPP = json.dumps(
    ["{python}", "-m", "testkit.fake_engine", "--port", "{port}", "--flavour", "llamacpp"]
)


@pytest.mark.subprocess
def test_without_any_gpu_budget_a_lease_still_evicts_every_idle_model(proxy_factory) -> None:
    """No NVML and no declared total: nothing is measured, yet the whole GPU is still lent and
    every idle model is stopped for it (the runbook's lease step on a machine like that)."""
    engine = {
        "name": "resident",
        "backend": "llamacpp",
        "vram_estimate_mb": 4000,
        "backend_config": {"model_path": "none"},
    }
    proxy = proxy_factory([engine], gpu_probe="none", llamacpp_launch_template=FAKE_LLAMACPP)
    http = proxy.client
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "resident"}).is_success
    granted = http.post("/v1/gpu/lease", json={"owner": "jv"})
    assert granted.status_code == 200, granted.text
    assert granted.json()["lease"]["evicted"] == ["resident"]
    status = http.get("/v1/gpu/status").json()
    assert status["budget"] == "none" and status["devices"] == [] and status["leased"] is True


@pytest.mark.subprocess
def test_declared_devices_take_one_model_each_and_a_lease_by_size_finds_room(
    proxy_factory,
) -> None:
    """Two declared cards (CHAT_PROXY_GPU_TOTAL_MB=20000,20000): two 14,000 MB models go to
    different devices, each engine told its device; a lease asking for 5,000 MB gets a device
    without evicting anything that way, and one naming a device that does not exist is a 400."""
    big = {
        "name": "big",
        "backend": "llamacpp",
        "vram_estimate_mb": 14000,
        "backend_config": {"model_path": "none"},
    }
    proxy = proxy_factory(
        [big, {**big, "name": "other"}],
        gpu_probe="none",
        gpu_total_mb="20000,20000",
        gpu_headroom_mb=1000,
        llamacpp_launch_template=FAKE_LLAMACPP,
    )
    http = proxy.client
    for name in ("big", "other"):
        assert http.post("/v1/chat/completions", json={**CHAT, "model": name}).status_code == 200
    rows = {m["name"]: m for m in http.get("/admin/state").json()["models"]}
    assert {rows["big"]["state"], rows["other"]["state"]} == {"ready"}
    assert sorted([rows["big"]["devices"], rows["other"]["devices"]]) == [[0], [1]]
    backend = proxy.state.lifecycle.backends["llamacpp"]
    for name in ("big", "other"):
        pid = backend.pid_of(name)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"CUDA_VISIBLE_DEVICES={rows[name]['devices'][0]}".encode() in environ
    status = http.get("/v1/gpu/status").json()
    assert status["budget"] == "declared"
    assert [(d["index"], d["used_mb"], d["free_mb"]) for d in status["devices"]] == [
        (0, 14000, 6000),
        (1, 14000, 6000),
    ]
    # 5,000 + 1,000 headroom fit in the 6,000 left on either card: nothing is evicted, and
    # with a tie the lower index.
    lease = http.post("/v1/gpu/lease", json={"owner": "jv", "need_mb": 5000}).json()["lease"]
    assert lease["evicted"] == [] and lease["device"] == 0
    # 7,000 fits nowhere: the device where evicting frees the least (a tie: device 1, as
    # device 0 is lent now).
    second = http.post("/v1/gpu/lease", json={"owner": "kv", "need_mb": 7000}).json()["lease"]
    assert second["device"] == 1 and len(second["evicted"]) == 1
    missing = http.post("/v1/gpu/lease", json={"owner": "x", "device": 5})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "device"


@pytest.mark.subprocess
def test_what_no_card_of_the_box_could_ever_hold_is_a_409_at_once_not_a_503_to_retry(
    proxy_factory,
) -> None:
    """Two declared 8,000 MB cards: a model pinned to GPU 5, one spanning three GPUs, one
    needing 9,000 MB, and a lease of 9,000 MB can never be placed, whatever is evicted or
    waited for: each is a 409 that says why (they were 503 "cannot free ... busy: none" with
    Retry-After, inviting retries forever). What fits still starts."""
    small = {
        "name": "small",
        "backend": "llamacpp",
        "vram_estimate_mb": 1000,
        "backend_config": {"model_path": "none"},
    }
    proxy = proxy_factory(
        [
            small,
            {**small, "name": "pinned", "gpus": [5]},
            {**small, "name": "wide", "tensor_parallel": 3},
            {**small, "name": "huge", "vram_estimate_mb": 9000},
        ],
        gpu_probe="none",
        gpu_total_mb="8000,8000",
        gpu_headroom_mb=1024,
        llamacpp_launch_template=FAKE_LLAMACPP,
    )
    http = proxy.client
    expected = {
        "pinned": "pinned to GPU [5] (the entry's gpus), and this box has GPUs [0, 1]",
        "wide": "spans 3 GPUs, and this box has GPUs [0, 1]",
        "huge": "needs 9000 MB (+1024 MB headroom) on each of 1 GPU(s), more than a whole card",
    }
    for name, why in expected.items():
        response = http.post("/v1/chat/completions", json={**CHAT, "model": name})
        assert response.status_code == 409, response.text
        assert "retry-after" not in response.headers
        error = response.json()["error"]
        assert error["code"] == "insufficient_vram" and why in error["message"]
    lease = http.post("/v1/gpu/lease", json={"owner": "jv", "need_mb": 9000})
    assert lease.status_code == 409 and "more than a whole card holds" in lease.text
    assert http.get("/v1/gpu/status").json()["leased"] is False
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "small"}).status_code == 200
