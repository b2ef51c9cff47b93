"""The console's pages through Streamlit's AppTest, each against a real proxy (and the pages'
recovery once a proxy that was down answers again). The per-page "proxy down" check for every
page is in test_pages.py."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from imageworks.chat_proxy.app import create_app
from imageworks.gui.client import ModelRow
from imageworks.gui.widgets import timing, where
from testkit.console import everything, page, texts
from testkit.entries import GEMMA, eventually
from testkit.fake_engine import entry_for
from testkit.gpu import FakeProbe
from testkit.servers import UvicornServer

CHAT = {"messages": [{"role": "user", "content": "SECRET-PROMPT-TEXT"}]}


def vision(url: str) -> dict[str, Any]:
    return {
        "name": "vision",
        "backend": "ollama",
        "served_model_id": "qwen2.5vl:7b",
        "backend_config": {"base_url": url + "/v1"},
        "capabilities": {"vision": True},
    }


@pytest.fixture
def gpu_proxy(proxy_factory, fake_ollama, point_console):
    fake_ollama.engine.vram_mb = {"qwen2.5vl:7b": 9000}
    proxy = proxy_factory(
        [vision(fake_ollama.url)], probe=FakeProbe(24000, fake_ollama.engine.holdings)
    )
    point_console(proxy.url)
    return proxy


def test_gpu_card_shows_our_model_and_keeps_a_history(gpu_proxy) -> None:
    answer = gpu_proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "vision"})
    assert answer.status_code == 200
    app = page("gpu").run()
    assert not app.exception
    shown = everything(app)
    assert "GPU 0 · fake GPU" in shown
    assert "Total 24,000 MB" in shown and "Our engines 9,000 MB" in shown
    assert "Free 15,000 MB" in shown and "**vision** 9,000 MB" in shown
    assert "measured by the `fake` probe" in shown
    assert len(app.get("plotly_chart")) == 2  # the bar and the sparkline
    app.run()
    assert [mb for _, mb in app.session_state["gpu_history"][0]] == [9000, 9000]


def test_gpu_page_draws_utilisation_temperature_and_power(
    proxy_factory, fake_ollama, point_console
) -> None:
    probe = FakeProbe(24000, fake_ollama.engine.holdings)
    probe.telemetry = (42.0, 61.0, 250.0)
    proxy = proxy_factory([vision(fake_ollama.url)], probe=probe)
    point_console(proxy.url)
    assert proxy.client.get("/v1/gpu/status").status_code == 200  # a probe read
    gauges = proxy.client.get("/metrics").text
    assert 'chat_proxy_gpu_telemetry{device="0",kind="utilization_pct"} 42.0' in gauges
    assert 'chat_proxy_gpu_telemetry{device="0",kind="power_w"} 250.0' in gauges
    app = page("gpu").run()
    assert not app.exception
    shown = everything(app)
    assert "Utilisation 42 %" in shown and "Temperature 61 °C" in shown and "Power 250 W" in shown
    assert len(app.get("plotly_chart")) == 5  # the bar, memory, and one per reading
    probe.telemetry = (90.0, 70.0, 400.0)
    app.run()
    history = app.session_state["gpu_telemetry"][0]
    assert [v for _, v in history["utilization_pct"]] == [42.0, 90.0]
    assert [v for _, v in history["power_w"]] == [250.0, 400.0]


def test_gpu_page_without_readings_says_so(gpu_proxy) -> None:
    app = page("gpu").run()
    assert "No utilisation, temperature or power readings" in everything(app)


@pytest.mark.parametrize("declared", [None, 16000])
def test_gpu_page_without_nvml_says_which_budget_is_in_force(
    proxy_factory, fake_vllm, point_console, declared
) -> None:
    settings = {"gpu_probe": "none"} | ({"gpu_total_mb": declared} if declared else {})
    proxy = proxy_factory([entry_for("ext", fake_vllm.url, "openai")], **settings)
    point_console(proxy.url)
    app = page("gpu").run()
    assert not app.exception
    shown = everything(app)
    if declared:
        assert "declared budget" in shown and "CHAT_PROXY_GPU_TOTAL_MB = 16000 MB" in shown
    else:
        assert "no budget is declared" in shown


def test_models_filters_restart_and_idle_columns(proxy_factory, fake_vllm, point_console) -> None:
    ext = entry_for("ext", fake_vllm.url, "openai", capabilities={"text": True, "tools": True})
    up = proxy_factory([GEMMA, ext], idle_ttl_s=600)
    point_console(up.url)
    app = page("models").run()
    assert not app.exception
    app.multiselect(key="backends").set_value(["openai"]).run()
    assert "`ext`" in texts(app) and "`gemma`" not in texts(app)
    app.multiselect(key="backends").set_value([]).run()
    app.multiselect(key="capabilities").set_value(["tools"]).run()
    assert "`ext`" in texts(app) and "`gemma`" not in texts(app)
    app.multiselect(key="capabilities").set_value([]).run()
    assert "never used" in everything(app)
    app.button(key="activate-gemma").click().run()
    assert "gemma is ready" in texts(app)
    app.button(key="restart-gemma").click().run()
    assert not app.exception
    assert "gemma restarted: ready" in texts(app)
    assert "unloads in" in everything(app)  # idle countdown of a ready model


def test_where_a_model_runs_and_its_timing() -> None:
    local = {"kind": "local"}
    assert where(ModelRow("m", "vllm", "stopped", 0, True, True, location=local)) == "—"
    assert where(ModelRow("m", "vllm", "ready", 0, True, True, location=local)) == "vLLM executor"
    assert where(ModelRow("m", "llamacpp", "ready", 0, True, True)) == "this host"
    on_gpus = ModelRow("m", "vllm", "ready", 0, True, True, devices=[0, 1], location=local)
    assert where(on_gpus) == "vLLM executor · GPU 0, 1"
    peer = ModelRow("m", "vllm", "ready", 0, False, True, location={"kind": "peer", "peer": "box2"})
    assert where(peer) == "peer box2"
    ray = {"kind": "ray", "application": "imageworks-m", "cluster": "http://head:8265"}
    assert where(ModelRow("m", "ray", "ready", 0, True, True, location=ray)) == "Ray imageworks-m"
    assert timing(ModelRow("m", "vllm", "ready", 0, True, True, pinned=True)) == (
        "📌 pinned · never used"
    )
    idle = ModelRow("m", "vllm", "ready", 0, True, True, idle_unload_in_s=95, last_used_s_ago=5)
    assert timing(idle) == "unloads in 1 min 35 s · used 5 s ago"


def test_models_failed_row_has_the_engine_log_tail(proxy_factory, point_console) -> None:
    broken = {"name": "broken", "backend": "llamacpp", "backend_config": {"model_path": "/no.gguf"}}
    proxy = proxy_factory([broken], restart_backoff_s=600)
    point_console(proxy.url)
    log = proxy.root / "_staging" / "autostart" / "broken.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("loading model\nerror: out of memory on device 0\n")
    chat = {"model": "broken", "messages": [{"role": "user", "content": "Hi"}]}
    assert proxy.client.post("/v1/chat/completions", json=chat).status_code == 502
    app = page("models").run()
    assert not app.exception
    assert "Engine log of broken (last 40 lines)" in [e.label for e in app.expander]
    assert "error: out of memory on device 0" in app.code[0].value


def test_leases_force_release_asks_first(gpu_proxy) -> None:
    lease = {"owner": "judge-vision", "reason": "stage 2", "ttl_s": 600}
    assert gpu_proxy.client.post("/v1/gpu/lease", json=lease).status_code == 200
    app = page("leases").run()
    assert not app.exception
    shown = everything(app)
    assert "Owner judge-vision" in shown and "Reason stage 2" in shown
    assert re.search(r"Time left (9|10) min", shown)  # of its 600 s
    next(b for b in app.button if b.label == "Force release…").click().run()
    assert "End **judge-vision**'s lease now?" in texts(app)
    next(b for b in app.button if b.label == "Cancel").click().run()
    assert gpu_proxy.client.get("/v1/gpu/status").json()["leased"] is True
    next(b for b in app.button if b.label == "Force release…").click().run()
    next(b for b in app.button if b.label == "Yes, release it").click().run()
    assert not app.exception
    assert gpu_proxy.client.get("/v1/gpu/status").json()["leased"] is False
    assert "judge-vision's lease released" in texts(app)
    assert ":green-badge[free]" in texts(app)


def test_leases_force_release_needs_the_admin_token_when_one_is_set(
    proxy_factory, point_console
) -> None:
    proxy = proxy_factory([], probe=FakeProbe(24000), admin_token="s3cret")
    point_console(proxy.url)
    lease = {"owner": "judge-vision", "reason": "stage 2"}
    headers = {"x-admin-token": "s3cret"}
    assert proxy.client.post("/v1/gpu/lease", json=lease, headers=headers).status_code == 200
    app = page("leases").run()
    next(b for b in app.button if b.label == "Force release…").click().run()
    next(b for b in app.button if b.label == "Yes, release it").click().run()
    assert "The lease was not released" in texts(app)
    assert proxy.client.get("/v1/gpu/status").json()["leased"] is True
    next(b for b in app.button if b.label == "Force release…").click().run()
    app.text_input(key="release_token").input("s3cret")
    next(b for b in app.button if b.label == "Yes, release it").click().run()
    assert proxy.client.get("/v1/gpu/status").json()["leased"] is False


def test_activity_charts_errors_and_filters_without_prompt_text(up) -> None:
    for _ in range(3):
        assert up.client.post("/v1/chat/completions", json={**CHAT, "model": "ext"}).is_success
    assert up.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
    code = up.client.get("/admin/requests?limit=1").json()["data"][0]["error_code"]
    app = page("activity").run()
    assert not app.exception
    shown = everything(app)
    assert "Requests 4" in shown and "Errors 1" in shown
    assert len(app.get("plotly_chart")) == 3
    assert code in app.dataframe[0].value.to_json()
    assert len(app.dataframe[1].value) == 4
    app.checkbox(key="activity_errors").check().run()
    assert len(app.dataframe[1].value) == 1
    app.checkbox(key="activity_errors").uncheck().run()
    app.multiselect(key="activity_models").set_value(["ext"]).run()
    assert len(app.dataframe[1].value) == 3
    assert "SECRET-PROMPT-TEXT" not in everything(app)


def test_logs_follow_the_engine_log(up) -> None:
    assert up.client.post("/admin/activate", json={"model": "gemma"}).status_code == 200
    last = (up.root / "_staging" / "autostart" / "gemma.log").read_text().splitlines()[-1]
    app = page("logs").run()
    assert not app.exception
    assert app.selectbox(key="log_model").value == "gemma"
    assert last in app.code[0].value
    app.get("button_group")[0].set_value("executor").run()
    assert "No vLLM executor log for gemma" in texts(app)


def test_playground_streams_a_reply_from_the_embedded_model(up) -> None:
    app = page("playground").run()
    assert not app.exception
    app.selectbox(key="playground_model").set_value("gemma").run()
    app.text_area(key="playground_prompt").input("Say hello.")
    app.number_input(key="playground_max").set_value(16)
    next(b for b in app.button if b.label == "Send").click().run()
    assert not app.exception
    last = app.session_state["playground_last"]
    assert last["error"] is None and last["text"].strip()
    assert last["text"] in texts(app) and "TTFT **" in texts(app) and "tokens/s" in texts(app)
    records = up.client.get("/admin/requests?limit=1").json()["data"]
    assert records[0]["logical_name"] == "gemma" and records[0]["stream"] is True


def test_registry_shows_layers_and_a_held_off_edit(up) -> None:
    configs = up.root / "configs"
    (configs / "model_registry.discovered.json").write_text(
        json.dumps([{"name": "gemma", "backend": "llamacpp", "family": "gemma3"}])
    )
    app = page("registry").run()
    app.text_input(key="registry_filter").input("gemma")
    next(b for b in app.button if b.label == "Reload registry").click().run()
    assert not app.exception
    assert "Registry" in texts(app) and "loaded (2 entries)" in texts(app)
    frame = app.dataframe[0].value
    layers = dict(zip(frame["field"], frame["layer"], strict=True))
    assert layers["family"] == "discovered" and layers["backend_config.model_path"] == "curated"
    (configs / "model_registry.curated.json").write_text("[{")
    next(b for b in app.button if b.label == "Reload registry").click().run()
    assert "A registry edit is held off" in texts(app) and "not valid JSON" in texts(app)


def test_dashboard_banner_leaves_a_stopped_model_out(up) -> None:
    assert up.client.post("/admin/activate", json={"model": "gemma"}).status_code == 200
    assert up.client.post("/admin/deactivate", json={"model": "gemma"}).status_code == 200
    app = page("dashboard").run()
    assert not app.exception
    assert not [w for w in app.warning if "Backend unavailable" in w.value]


@pytest.mark.parametrize(
    "name", ["dashboard", "gpu", "activity", "models", "logs", "playground", "registry", "leases"]
)
def test_a_page_recovers_when_the_proxy_comes_back(
    proxy_factory, fake_vllm, point_console, name
) -> None:
    proxy = proxy_factory([entry_for("ext", fake_vllm.url, "openai")], probe=FakeProbe(24000))
    point_console(proxy.url)
    proxy.server.stop()
    app = page(name).run()
    assert "Chat proxy unavailable" in texts(app)
    again = UvicornServer(create_app(proxy.config, probe=FakeProbe(24000)), port=proxy.server.port)
    try:
        assert eventually(lambda: proxy.client.get("/v1/healthz").is_success, 20)
        app.run()
        assert not app.exception
        assert "Chat proxy unavailable" not in texts(app)
    finally:
        again.stop()
