"""The console's typed client against a real proxy (and one that is not there)."""

from __future__ import annotations

import pytest

from imageworks.gui.client import ProxyClient, ProxyDown, ProxyRequestFailed, gpu_view
from testkit.entries import GEMMA
from testkit.fake_engine import entry_for
from testkit.servers import free_port


def test_reads_and_actions(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory(
        [
            GEMMA,
            entry_for(
                "ext", fake_vllm.url, "openai", capabilities={"tools": True}, profiles=["staging"]
            ),
        ]
    )
    client = ProxyClient(proxy.url)
    health = client.health()
    assert health.status == "ok" and health.profile == "production" and health.models == 1
    rows = {r.name: r for r in client.models()}
    assert rows["gemma"].managed and rows["gemma"].state == "stopped"
    assert rows["gemma"].capabilities == ["text"] and not rows["ext"].visible
    assert client.activate("gemma")["state"] == "ready"
    assert client.deactivate("gemma") == ["gemma"]
    assert client.set_autostart(False) is False and client.autostart() is False
    assert client.set_profile("staging") == "staging"
    assert client.profile() == ("staging", ["production", "staging", "testing"])
    assert {r.name for r in client.models() if r.visible} == {"gemma", "ext"}
    assert client.reload_registry()["entries"] == 2
    proxy.client.post(
        "/v1/chat/completions",
        json={"model": "ext", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert client.recent_requests(5)[0]["logical_name"] == "ext"
    assert client.gpu()["leased"] is False


def test_errors_keep_the_proxys_message(proxy_factory) -> None:
    client = ProxyClient(proxy_factory([]).url)
    with pytest.raises(ProxyRequestFailed) as caught:
        client.activate("nope")
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert "does not exist" in str(caught.value)


def test_a_proxy_that_is_down() -> None:
    with pytest.raises(ProxyDown, match="not reachable"):
        ProxyClient(f"http://127.0.0.1:{free_port()}").health()


def test_the_admin_token_is_sent(proxy_factory) -> None:
    proxy = proxy_factory([], admin_token="t0k")
    with pytest.raises(ProxyRequestFailed) as caught:
        ProxyClient(proxy.url, admin_token="").state()
    assert caught.value.status == 401
    assert ProxyClient(proxy.url, admin_token="t0k").state()["profile"] == "production"


@pytest.mark.parametrize("token", [None, "admin-secret"])
def test_with_api_keys_the_console_sends_one(
    proxy_factory, fake_vllm, monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    settings = {"api_keys": "k1"} | ({"admin_token": token} if token else {})
    proxy = proxy_factory([entry_for("ext", fake_vllm.url, "openai")], **settings)
    monkeypatch.setenv("CHAT_PROXY_API_KEYS", "k1")
    if token:
        monkeypatch.setenv("CHAT_PROXY_ADMIN_TOKEN", token)
    else:
        monkeypatch.delenv("CHAT_PROXY_ADMIN_TOKEN", raising=False)
    client = ProxyClient(proxy.url)
    assert [r.name for r in client.models()] == ["ext"]  # /v1/models and /admin/state
    assert client.set_autostart(False) is False


def test_gpu_view_reads_devices_and_falls_back_to_the_single_gpu_summary() -> None:
    lease = {"owner": "jv", "reason": "r", "age_s": 5, "expires_at": None, "evicted": ["m"]}
    old = {
        "probe": "nvml",
        "leased": True,
        "lease": lease,
        "pending": [],
        "gpu": {"name": "RTX", "total_mb": 24000, "used_mb": 12000, "free_mb": 12000},
        "models": [{"name": "m", "vram_mb": 9000, "in_flight": 1}],
        "foreign": [{"name": "pid 7", "vram_mb": 3000}],
    }
    view = gpu_view(old)
    (card,) = view.devices
    assert view.budget == "measured" and card.name == "RTX"
    assert (card.ours_mb, card.foreign_mb) == (9000, 3000)
    assert card.lease is not None and card.lease.owner == "jv" and card.lease.device == 0
    assert [lease.owner for lease in view.leases] == ["jv"]
    assert gpu_view({**old, "probe": "none"}).budget == "declared"
    assert gpu_view({"probe": "none", "gpu": None}).devices == []

    device = {
        "index": 1,
        "name": "sim 1",
        "total_mb": 16000,
        "used_mb": 3600,
        "free_mb": 12400,
        "ours_mb": 600,
        "foreign_mb": 3000,
        "models": [{"name": "g", "vram_mb": 600, "in_flight": 0}],
        "foreign": [],
        "lease": {**lease, "device": 1},
    }
    new = {**old, "budget": "measured", "devices": [device], "leases": [{**lease, "device": 1}]}
    (card,) = gpu_view(new).devices
    assert card.index == 1 and card.ours_mb == 600 and card.lease and card.lease.device == 1


def test_a_reply_streams_in_pieces_with_its_figures(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("ext", fake_vllm.url, "openai")])
    stream = ProxyClient(proxy.url).chat_stream("ext", "Say hello.", max_tokens=8)
    pieces = list(stream)
    # More than one piece: a reply read whole and handed over at the end is not a stream.
    assert len(pieces) > 1 and all(pieces)
    assert stream.tokens >= len(pieces) or stream.usage_reported
    assert stream.ttft_ms is not None and stream.total_ms is not None
    assert stream.finish_reason is not None
    record = proxy.client.get("/admin/requests?limit=1").json()["data"][0]
    assert record["logical_name"] == "ext" and record["stream"] is True
