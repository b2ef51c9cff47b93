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
from testkit.processes import our_processes, tag_session
from testkit.servers import AiohttpServer, UvicornServer

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
    server: UvicornServer
    client: httpx.Client

    @property
    def state(self) -> Any:
        """The running proxy's ``ProxyState`` (for the few facts no endpoint shows)."""
        return self.server.app.state.proxy

    @property
    def log_path(self) -> Path:
        return Path(self.config.log_path)

    def records(self, event: str = "request") -> list[dict[str, Any]]:
        """The log's records of one kind, once the writer has caught up: each read first waits
        for the writer to write what is queued (it writes in batches up to ``batch_s`` apart),
        and a stream's record follows its last byte, which a client may have read before the
        proxy has finished the request: an empty log is not taken as caught up until the
        deadline (under load that gap was over 50 ms)."""
        lines, deadline = self._log_lines(), time.monotonic() + 2
        while time.monotonic() < deadline:
            time.sleep(0.05)
            again = self._log_lines()
            if again == lines and self._of_kind(again, event):
                break
            lines = again
        return self._of_kind(lines, event)

    @staticmethod
    def _of_kind(lines: list[str], event: str) -> list[dict[str, Any]]:
        return [r for r in map(json.loads, lines) if r.get("event") == event]

    def _log_lines(self) -> list[str]:
        self.state.log.flush()
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []

    def write_registry(self, entries: list[dict[str, Any]]) -> None:
        path = self.root / "configs" / "model_registry.curated.json"
        path.write_text(json.dumps(entries, indent=2))


ProxyFactory = Callable[..., Proxy]


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start a real proxy (uvicorn, real sockets) over a registry of the test's own."""
    from imageworks.chat_proxy.app import create_app
    from imageworks.chat_proxy.config import ProxyConfig

    started: list[Proxy] = []

    def start(
        entries: list[dict[str, Any]],
        probe: Any = None,
        slow_callback_s: float = 0,
        **settings: Any,
    ) -> Proxy:
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
        server = UvicornServer(
            create_app(config, probe=probe),
            port=settings.get("port"),  # a port chosen before (peers naming each other)
            slow_callback_s=slow_callback_s,
            keep_alive_s=config.keep_alive_s,
            header_timeout_s=config.header_timeout_s,
            max_header_bytes=config.max_header_bytes,
        )
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
    """After the whole suite, nothing it started may still run: every process started from
    here carries the session's tag, console scripts (the runbook's) included."""
    tag_session()
    before = {pid for pid, _ in our_processes()}
    yield
    deadline = time.monotonic() + 10
    left = [p for p in our_processes() if p[0] not in before]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in our_processes() if p[0] not in before]
    assert not left, f"processes left running after the tests: {left}"
