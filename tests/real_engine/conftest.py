"""The real-engines tier (``pytest -m real_engine``): a real vLLM for the CPU, run by the real
executor from its normal template and a registry entry, behind a real proxy.

``scripts/real-engines.sh`` builds vLLM's environment and the models outside the project's
environment and writes ``manifest.json``; without it every test here skips with that reason, and
with ``IMAGEWORKS_REQUIRE_REAL_ENGINES=1`` (CI) the skip is a failure instead.

One vLLM cold start costs 40-60 s on 2 cores, so one executor, one proxy and one SmolLM2 vLLM
serve the whole session (``stack``); the tests that stop, swap, kill or adopt it run last
(``test_zz_lifecycle.py``) and leave it serving again where they can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.processes import REPO, Executor, proxy_env, write_registry
from testkit.servers import free_port, wait_for_port

REQUIRE_VAR = "IMAGEWORKS_REQUIRE_REAL_ENGINES"
CHAT = "smollm2-vllm"
EMBED = "minilm-vllm"
TEMPLATE = REPO / "configs" / "chat_templates" / "smollm2-tools.jinja"
# vLLM on a shared 2-core CPU box: a 1 GiB KV cache (else it reserves 90% of the RAM), no
# hub, no telemetry. The executor itself adds VLLM_HOST_IP=127.0.0.1 and the usage-stats opt-out.
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def engines_dir() -> Path:
    configured = os.environ.get("IMAGEWORKS_REAL_ENGINES_DIR")
    return Path(configured) if configured else Path.home() / ".cache/imageworks/real-engines"


def manifest_or_reason() -> tuple[dict[str, Any] | None, str]:
    path = engines_dir() / "manifest.json"
    if not path.is_file():
        return None, f"real engines are not set up: run scripts/real-engines.sh (no {path})"
    manifest: dict[str, Any] = json.loads(path.read_text())
    for key in ("python", "chat_model", "embedding_model"):
        if not Path(manifest[key]).exists():
            return None, f"{path} names {manifest[key]}, which is gone: run scripts/real-engines.sh"
    return manifest, ""


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    found, reason = manifest_or_reason()
    if found is None:
        if os.environ.get(REQUIRE_VAR) == "1":
            pytest.fail(f"{REQUIRE_VAR}=1 but {reason}")
        pytest.skip(reason)
    return found


def chat_entry(manifest: dict[str, Any], name: str = CHAT, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "vllm",
        "served_model_id": name,
        "backend_config": {
            "model_path": manifest["chat_model"],
            "tool_parser": "hermes",
            "extra_args": [
                "--max-model-len",
                "2048",
                "--enforce-eager",
                "--dtype",
                "bfloat16",
                "--tool-strict-level",
                "parameter",
            ],
        },
        "capabilities": {"text": True, "tools": True},
        "chat_template": {"source": "external", "path": str(TEMPLATE)},
        **fields,
    }


def embed_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": EMBED,
        "backend": "vllm",
        "served_model_id": EMBED,
        "backend_config": {
            "model_path": manifest["embedding_model"],
            "extra_args": ["--runner", "pooling", "--max-model-len", "256", "--enforce-eager"],
        },
        "capabilities": {"text": False, "embedding": True},
    }


@dataclass
class Stack:
    root: Path
    manifest: dict[str, Any]
    executor: Executor
    proxy: subprocess.Popen[bytes]
    url: str
    client: httpx.Client
    cold_starts: list[float] = field(default_factory=list)

    def executor_state(self) -> dict[str, Any]:
        state: dict[str, Any] = httpx.get(self.executor.url + "/admin/state", timeout=10).json()
        return state

    def engine_url(self) -> str:
        """The running vLLM's own base URL (for the conformance suite)."""
        state = self.executor_state()
        assert state["status"] == "running", state
        return str(state["base_url"]).removesuffix("/v1")

    def activate(self, model: str = CHAT) -> dict[str, Any]:
        started = time.monotonic()
        answer = self.client.post("/admin/activate", json={"model": model}, timeout=400)
        assert answer.status_code == 200, answer.text
        if answer.elapsed.total_seconds() > 5:
            self.cold_starts.append(time.monotonic() - started)
        return self.executor_state()

    def records(self) -> list[dict[str, Any]]:
        """The proxy's request records so far, once its log writer has caught up (it writes
        in batches; a stream's record follows its last byte)."""
        log = self.root / "logs" / "chat_proxy.jsonl"
        lines: list[str] = []
        for _ in range(40):
            again = log.read_text().splitlines() if log.exists() else []
            if again and again == lines:
                break
            lines = again
            time.sleep(0.1)
        return [r for r in map(json.loads, lines) if r.get("event") == "request"]

    def chat(self, **body: Any) -> httpx.Response:
        body.setdefault("model", CHAT)
        body.setdefault("temperature", 0)
        return self.client.post("/v1/chat/completions", json=body, timeout=300)


def start_proxy(root: Path, executor_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with (root / "proxy.out").open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "imageworks.chat_proxy.cli", "--port", str(port)],
            cwd=root,
            env=proxy_env(
                CHAT_PROXY_VLLM_REMOTE_URL=executor_url,
                CHAT_PROXY_RECONCILE_S="1",
                CHAT_PROXY_START_TIMEOUT_S="400",
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port, timeout=30)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def stack(manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("real-engines")
    entries = [chat_entry(manifest), embed_entry(manifest)]
    write_registry(root, entries)
    executor = Executor(
        root,
        template="",  # the executor's own default template: python -m vllm.entrypoints...
        env={
            **CPU_ENV,
            "IMAGEWORKS_VLLM_PYTHON": manifest["python"],
            "IMAGEWORKS_VLLM_START_TIMEOUT_S": "400",
        },
    )
    proxy, url = start_proxy(root, executor.url)
    client = httpx.Client(base_url=url, timeout=60)
    running = Stack(root, manifest, executor, proxy, url, client)
    try:
        running.activate(CHAT)
        yield running
    finally:
        client.close()
        if proxy.poll() is None:
            proxy.send_signal(signal.SIGINT)
            proxy.wait(60)
        executor.stop()
        print(f"\nvLLM cold starts this session (s): {[round(s, 1) for s in running.cold_starts]}")
