"""`imageworks-chat-proxy` and the runbook's uvicorn command as real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.fake_engine import entry_for, sse_events
from testkit.servers import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.subprocess


def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    return tmp_path


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update(extra)
    return env


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_starts_serves_and_stops_cleanly_on_sigint(
    tmp_path: Path, server: str, fake_llamacpp: Any
) -> None:
    """Under either server: models listed, a plain and a streamed answer forwarded with their
    request ids, and a clean exit on Ctrl+C."""
    cwd = workdir(tmp_path)
    curated = cwd / "configs" / "model_registry.curated.json"
    entries = json.loads(curated.read_text())
    entries.append(entry_for("ext", fake_llamacpp.url, backend="openai"))
    curated.write_text(json.dumps(entries))
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imageworks.chat_proxy.cli",
            "--port",
            str(port),
            "--server",
            server,
        ],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=30)
        health = httpx.get(f"http://127.0.0.1:{port}/v1/healthz").json()
        assert health["status"] == "ok"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert {"gemma3-270m", "ext"} <= {m["id"] for m in models}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        chat = {"model": "ext", "messages": [{"role": "user", "content": "hi"}]}
        plain = httpx.post(url, json=chat, headers={"x-request-id": "plain-1"})
        assert plain.status_code == 200 and plain.json()["object"] == "chat.completion"
        assert plain.headers["x-request-id"] == "plain-1"
        streamed = httpx.post(url, json={**chat, "stream": True})
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert len(streamed.headers["x-request-id"]) == 32
        assert sse_events(streamed.text)[-1] == "[DONE]"
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output
    assert "Traceback" not in output
    events = [
        json.loads(line)["event"]
        for line in (cwd / "logs" / "chat_proxy.jsonl").read_text().splitlines()
    ]
    assert events[0] == "startup" and events[-1] == "shutdown"


def test_runbook_uvicorn_command_with_overrides(tmp_path: Path) -> None:
    cwd = workdir(tmp_path)
    port = free_port()
    env = environment(
        CHAT_PROXY_PORT=str(port),
        CHAT_PROXY_VLLM_REMOTE_URL="http://127.0.0.1:8600",
        CHAT_PROXY_OLLAMA_BASE_URL="http://127.0.0.1:11434",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "imageworks.chat_proxy.app:app", "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=30)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert process.returncode == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHAT_PROXY_PORT": "eighty"}, "Error: CHAT_PROXY_PORT: Input should be a valid integer"),
        ({"CHAT_PROXY_HOST": "0.0.0.0"}, "requires CHAT_PROXY_ADMIN_TOKEN"),
        ({"IMAGEWORKS_REGISTRY_DIR": "nowhere"}, "no registry layer found"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_1(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imageworks.chat_proxy.cli"],
        cwd=workdir(tmp_path),
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_runbook_config_check_prints_addresses(tmp_path: Path) -> None:
    code = "from imageworks.chat_proxy.config import ProxyConfig; print(ProxyConfig.load())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "CHAT_PROXY_HOST=127.0.0.1" in result.stdout
    assert "CHAT_PROXY_LOG_PATH=logs/chat_proxy.jsonl" in result.stdout
