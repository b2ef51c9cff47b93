"""Fixtures shared by every package's tests: fake engines and a real proxy on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.fake_engine import FakeEngine
from testkit.processes import our_processes
from testkit.servers import AiohttpServer, HypercornServer

REPO = Path(__file__).resolve().parent


@dataclass
class Engine:
    engine: FakeEngine
    server: AiohttpServer

    @property
    def url(self) -> str:
        return self.server.url


def _engine(flavour: str) -> Iterator[Engine]:
    engine = FakeEngine(flavour)
    server = AiohttpServer(engine.app())
    yield Engine(engine, server)
    server.stop()


@pytest.fixture
def fake_vllm() -> Iterator[Engine]:
    yield from _engine("vllm")


@pytest.fixture
def fake_ollama() -> Iterator[Engine]:
    yield from _engine("ollama")


@pytest.fixture
def fake_llamacpp() -> Iterator[Engine]:
    yield from _engine("llamacpp")


@dataclass
class Proxy:
    url: str
    config: Any
    root: Path
    server: HypercornServer
    client: httpx.Client

    @property
    def log_path(self) -> Path:
        return Path(self.config.log_path)

    def records(self, event: str = "request") -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("event") == event]

    def write_registry(self, entries: list[dict[str, Any]]) -> None:
        path = self.root / "configs" / "model_registry.curated.json"
        path.write_text(json.dumps(entries, indent=2))


ProxyFactory = Callable[..., Proxy]


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start a real proxy (hypercorn, real sockets) over a registry of the test's own."""
    from imageworks.chat_proxy.app import create_app
    from imageworks.chat_proxy.config import ProxyConfig

    started: list[Proxy] = []

    def start(entries: list[dict[str, Any]], probe: Any = None, **settings: Any) -> Proxy:
        root = tmp_path / f"proxy{len(started)}"
        (root / "configs").mkdir(parents=True)
        shutil.copy(REPO / "configs" / "deployment_profiles.json", root / "configs")
        (root / "configs" / "model_registry.curated.json").write_text(json.dumps(entries))
        config = ProxyConfig.load(
            environ={},
            cwd=root,
            registry_dir=root / "configs",
            staging_dir=root / "_staging",
            log_path=root / "logs" / "chat_proxy.jsonl",
            **settings,
        )
        server = HypercornServer(create_app(config, probe=probe))
        client = httpx.Client(base_url=server.url, timeout=30)
        proxy = Proxy(server.url, config, root, server, client)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.client.close()
        proxy.server.stop()


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """After the whole suite, no llama.cpp server, executor or fake engine may still run."""
    before = {pid for pid, _ in our_processes()}
    yield
    deadline = time.monotonic() + 10
    left = [p for p in our_processes() if p[0] not in before]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in our_processes() if p[0] not in before]
    assert not left, f"processes left running after the tests: {left}"
