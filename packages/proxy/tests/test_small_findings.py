"""The smaller findings of issue 24 (finding 8), one test each: a lease owner with control
characters, force_release on a device the box does not have, absurd token counts, /metrics to
keyless LAN clients when keys are set, heap addresses in image errors, the console on the LAN
without a token."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from imageworks.chat_proxy.app import ProxyApp, create_app
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.observe.records import sane_usage
from imageworks.chat_proxy.vision.images import Fit, ImageError, fit_image
from testkit.gpu import FakeProbe

REPO = Path(__file__).resolve().parents[3]


def proxy_config(tmp_path: Path, **settings: str) -> ProxyConfig:
    (tmp_path / "configs").mkdir(exist_ok=True)
    profiles = (REPO / "configs" / "deployment_profiles.json").read_text()
    (tmp_path / "configs" / "deployment_profiles.json").write_text(profiles)
    (tmp_path / "configs" / "model_registry.curated.json").write_text("[]")
    return ProxyConfig.load(
        environ={},
        cwd=tmp_path,
        registry_dir=tmp_path / "configs",
        staging_dir=tmp_path / "_staging",
        log_path=tmp_path / "logs" / "chat_proxy.jsonl",
        gpu_probe="none",
        **settings,
    )


@pytest.mark.parametrize("owner", ["a\x00b", "judge\r\nvision", "x\ny", "tab\there"])
def test_a_lease_owner_with_control_characters_is_refused(proxy_factory, owner: str) -> None:
    proxy = proxy_factory([], probe=FakeProbe(24000))
    answer = proxy.client.post("/v1/gpu/lease", json={"owner": owner})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "owner"
    reason = proxy.client.post("/v1/gpu/lease", json={"owner": "jv", "reason": "a\nb"})
    assert reason.status_code == 400 and reason.json()["error"]["param"] == "reason"
    assert proxy.client.get("/v1/gpu/status").json()["leases"] == []


def test_force_release_or_a_lease_on_a_missing_device_is_refused(proxy_factory) -> None:
    proxy = proxy_factory([], probe=FakeProbe(24000))  # one device: 0
    for path, body in [
        ("/v1/gpu/force_release", {"device": 5}),
        ("/v1/gpu/lease", {"owner": "a", "device": 5}),
    ]:
        answer = proxy.client.post(path, json=body)
        assert answer.status_code == 400, (path, answer.text)
        assert answer.json()["error"]["param"] == "device"
        assert "no GPU device 5" in answer.json()["error"]["message"]
    assert proxy.client.post("/v1/gpu/force_release", json={"device": 0}).status_code == 200


def test_absurd_token_counts_are_not_believed() -> None:
    usage = {"prompt_tokens": 1e308, "completion_tokens": -5, "total_tokens": True, "x": 1}
    assert sane_usage(usage) == {"x": 1}
    assert sane_usage({"prompt_tokens": 12, "completion_tokens": 3}) == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
    }
    assert sane_usage({"prompt_tokens": 10**12}) == {}
    assert sane_usage("many") is None


@contextlib.asynccontextmanager
async def client_at(app: ProxyApp, peer: str) -> AsyncIterator[httpx.AsyncClient]:
    async with app.app.router.lifespan_context(app.app):
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://10.0.0.2") as client:
            yield client


async def test_metrics_need_a_key_from_the_lan_when_keys_are_set(tmp_path: Path) -> None:
    app = create_app(proxy_config(tmp_path, api_keys="k1"))
    async with client_at(app, "192.168.1.20") as lan:
        assert (await lan.get("/metrics")).status_code == 401
        keyed = await lan.get("/metrics", headers={"authorization": "Bearer k1"})
        assert keyed.status_code == 200 and "chat_proxy_" in keyed.text
    async with client_at(create_app(proxy_config(tmp_path, api_keys="k1")), "127.0.0.1") as local:
        assert (await local.get("/metrics")).status_code == 200  # the local scraper
    async with client_at(create_app(proxy_config(tmp_path)), "192.168.1.20") as lan:
        assert (await lan.get("/metrics")).status_code == 200  # no keys: open, as before


def test_image_errors_show_no_heap_address() -> None:
    with pytest.raises(ImageError) as raised:
        fit_image(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, Fit(1536, 90))
    assert "0x" not in str(raised.value) and "object at" not in str(raised.value)
    assert "BytesIO" not in str(ImageError("cannot identify <_io.BytesIO object at 0x7f3a2c>"))


def test_the_console_on_the_lan_needs_a_token(monkeypatch) -> None:
    from imageworks.gui.cli import main

    monkeypatch.delenv("CHAT_PROXY_ADMIN_TOKEN", raising=False)
    result = CliRunner().invoke(main, ["--address", "192.168.1.5"])
    assert result.exit_code == 2 and "requires CHAT_PROXY_ADMIN_TOKEN" in result.output
