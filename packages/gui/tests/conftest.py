"""A console pointed at a real proxy (``up``), or at an address where nothing answers
(``down``)."""

from __future__ import annotations

import pytest

from testkit.entries import GEMMA
from testkit.fake_engine import entry_for
from testkit.servers import free_port


def point_console_at(url: str, monkeypatch: pytest.MonkeyPatch, workdir: object) -> None:
    monkeypatch.setenv("IMAGEWORKS_CHAT_PROXY_URL", url)
    monkeypatch.setenv("IMAGEWORKS_GUI_WORKDIR", str(workdir))
    monkeypatch.delenv("CHAT_PROXY_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("CHAT_PROXY_API_KEYS", raising=False)


@pytest.fixture
def point_console(monkeypatch, tmp_path):
    """Point the console at a proxy: ``point_console(proxy.url)``."""
    return lambda url: point_console_at(url, monkeypatch, tmp_path)


@pytest.fixture
def up(proxy_factory, fake_vllm, monkeypatch, tmp_path):
    proxy = proxy_factory([GEMMA, entry_for("ext", fake_vllm.url, "openai")])
    point_console_at(proxy.url, monkeypatch, tmp_path)
    return proxy


@pytest.fixture
def down(monkeypatch, tmp_path):
    point_console_at(f"http://127.0.0.1:{free_port()}", monkeypatch, tmp_path)
    return tmp_path
