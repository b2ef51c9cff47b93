"""Each console page through Streamlit's AppTest, with a real proxy up, and with none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imageworks.gui.envfile import read_variable
from testkit.console import PAGES, page, texts
from testkit.entries import GEMMA
from testkit.fake_engine import entry_for

DETACHED_CHILD = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in.*Popen.__del__:pytest.PytestUnraisableExceptionWarning"
)

REPO = Path(__file__).resolve().parents[3]


def gemma_state(proxy) -> str:
    models = proxy.client.get("/admin/state").json()["models"]
    return next(m["state"] for m in models if m["name"] == "gemma")


ALL_PAGES = sorted(p.stem for p in PAGES.glob("*.py"))


def test_the_app_routes_to_every_page() -> None:
    source = (PAGES.parent / "streamlit_app.py").read_text()
    assert len(ALL_PAGES) == 9
    for name in ALL_PAGES:
        assert f'page("{name}"' in source, name


@pytest.mark.parametrize("name", ALL_PAGES)
def test_every_page_says_clearly_when_the_proxy_is_down(down, name: str) -> None:
    app = page(name).run()
    assert not app.exception
    text = texts(app)
    assert "unavailable" in text or "stopped" in text or "running proxy" in text


def test_dashboard_with_the_proxy_up(up) -> None:
    up.client.post(
        "/v1/chat/completions",
        json={"model": "ext", "messages": [{"role": "user", "content": "hi"}]},
    )
    app = page("dashboard").run()
    assert not app.exception
    text = texts(app)
    assert "Proxy up · profile production · 2 models" in text
    assert "**None**" in text  # no model loaded yet
    assert len(app.dataframe) == 1  # recent requests


def test_models_activate_and_deactivate_buttons_call_the_proxy(up) -> None:
    app = page("models").run()
    assert not app.exception
    assert "`gemma`" in texts(app) and "openai (external)" in texts(app)
    labels = [b.label for b in app.button]
    assert labels.count("Activate") == 1  # only the managed model has one
    app.button(key="activate-gemma").click().run()
    assert "gemma is ready" in texts(app)
    assert gemma_state(up) == "ready"
    app.button(key="deactivate-gemma").click().run()
    assert "stopped gemma" in texts(app)
    assert gemma_state(up) == "stopped"


def test_models_reload_registry_button(up, fake_vllm) -> None:
    app = page("models").run()
    up.write_registry([GEMMA, entry_for("ext", fake_vllm.url, "openai"), entry_for("new", "x")])
    button = app.button[0]
    assert button.label == "Reload registry"
    button.click().run()
    assert not app.exception and not app.error
    version = up.client.get("/admin/state").json()["registry"]["version"]
    assert f"Registry {version} loaded (3 entries)" in texts(app)
    assert "`new`" in texts(app)


def test_autostart_switch_writes_env_local_and_applies_live(up, tmp_path) -> None:
    app = page("settings").run()
    assert not app.exception
    assert "Chat proxy running" in texts(app)
    assert app.toggle[0].value is True
    for wanted in (False, True, False):  # three flips in a row: the state follows each one
        app.toggle[0].set_value(wanted).run()
        assert not app.exception
        assert up.client.get("/admin/autostart").json() == {"enabled": wanted}
        saved = read_variable(tmp_path / ".env.local", "CHAT_PROXY_AUTOSTART_ENABLED")
        assert saved == ("1" if wanted else "0")
        assert app.toggle[0].value is wanted


def test_profiles_tab_switches_through_the_proxy(up) -> None:
    app = page("settings").run()
    app.radio[0].set_value("staging").run()
    next(b for b in app.button if b.label == "Apply profile").click().run()
    assert up.client.get("/admin/profile").json()["name"] == "staging"
    assert "Profile staging is active" in texts(app)


# The supervisor detaches the proxy on purpose (it outlives the console), so its Popen is
# dropped while the child runs; that one warning is expected here and nowhere else.
@DETACHED_CHILD
@pytest.mark.subprocess
def test_start_and_stop_buttons_run_the_real_proxy(down) -> None:
    shutil.copytree(REPO / "configs", down / "configs")
    app = page("settings").run()
    assert "Chat proxy stopped" in texts(app)
    next(b for b in app.button if b.label == "Start Chat Proxy").click().run()
    assert "Chat proxy running (pid" in texts(app)
    next(b for b in app.button if b.label == "Stop Chat Proxy").click().run()
    assert "stopped (pid" in texts(app)


def test_models_page_shows_a_failed_start_with_its_restart_policy(
    proxy_factory, monkeypatch, tmp_path
) -> None:
    broken = {
        "name": "broken",
        "backend": "llamacpp",
        "backend_config": {"model_path": "/nowhere/model.gguf"},
    }
    proxy = proxy_factory([broken], restart_backoff_s=600)
    monkeypatch.setenv("IMAGEWORKS_CHAT_PROXY_URL", proxy.url)
    monkeypatch.setenv("IMAGEWORKS_GUI_WORKDIR", str(tmp_path))
    chat = {"model": "broken", "messages": [{"role": "user", "content": "Hi"}]}
    assert proxy.client.post("/v1/chat/completions", json=chat).status_code == 502
    app = page("models").run()
    assert not app.exception
    errors = "\n".join(e.value for e in app.error)
    assert "broken (failed; restart: on-failure · next automatic start in" in errors
    assert "model file not found: /nowhere/model.gguf" in errors
