"""Ctrl+C / SIGTERM: drain, release the lease, stop models, unload Ollama, flush; exit 0 and
leave no process behind. Real proxy process, real llama.cpp process."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import httpx
import pytest

from testkit.entries import GEMMA
from testkit.fake_engine import sse_events
from testkit.processes import our_processes, start_proxy
from testkit.servers import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess


# A vLLM entry the proxy would run through the executor (never started in these tests).
VLLM = {
    "name": "v",
    "backend": "vllm",
    "backend_config": {"model_path": "/m"},
    "chat_template": {"source": "external", "path": "t.jinja"},
}


def shutdown_record(root: Path) -> dict[str, object]:
    lines = (root / "logs" / "chat_proxy.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "shutdown"][-1]


def test_sigterm_releases_stops_unloads_and_exits_zero(tmp_path: Path, fake_ollama) -> None:
    engine = fake_ollama.engine
    vision = {
        "name": "vision",
        "backend": "ollama",
        "served_model_id": "qwen2.5vl:7b",
        "vram_estimate_mb": 9000,
        "backend_config": {"base_url": fake_ollama.url + "/v1"},
    }
    proxy, url = start_proxy(tmp_path, [GEMMA, vision])
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert (
        httpx.post(
            url + "/v1/chat/completions", json={**chat, "model": "gemma"}, timeout=120
        ).status_code
        == 200
    )
    assert (
        httpx.post(url + "/v1/chat/completions", json={**chat, "model": "vision"}).status_code
        == 200
    )
    assert list(engine.loaded) == ["qwen2.5vl:7b"]
    engine.loaded["someone-elses:3b"] = 1.0  # loaded by another program, not in our registry
    foreign = httpx.get(url + "/v1/gpu/status").json()["foreign"]
    assert foreign == [{"name": "ollama:someone-elses:3b", "vram_mb": 4096}]
    lease = httpx.post(
        url + "/v1/gpu/lease", json={"owner": "jv", "restart_model": False}, timeout=60
    ).json()
    assert lease["token"] and list(engine.loaded) == ["someone-elses:3b"]  # never evicted
    engine.loaded["qwen2.5vl:7b"] = 1.0  # someone used Ollama directly meanwhile
    llama = [  # this checkout's only: other suites may run on the machine
        pid
        for pid, cmd in our_processes()
        if "llamacpp.server" in cmd and "gemma" in cmd and sys.executable in cmd
    ]
    assert llama

    proxy.send_signal(signal.SIGTERM)
    output = proxy.communicate(timeout=60)[0].decode()
    assert proxy.returncode == 0, output
    assert "Traceback" not in output
    assert not [p for p in our_processes() if p[0] in llama]
    # Ours unloaded with keep_alive 0 at shutdown; another program's model left loaded.
    assert list(engine.loaded) == ["someone-elses:3b"]
    assert "/api/generate someone-elses:3b" not in engine.unload_requests
    assert not (tmp_path / "_staging" / "gpu_lease.json").exists()
    steps = shutdown_record(tmp_path)["steps"]
    assert steps["release_lease"] == "ok" and steps["stop_models"] == "ok"
    assert steps["unload_ollama"].startswith("ok")


def test_a_failing_step_does_not_skip_the_others(tmp_path: Path, fake_vllm) -> None:
    # The "executor" answers, but with an error (a fake engine has no /admin/deactivate).
    ollama_down = f"http://127.0.0.1:{free_port()}"
    proxy, url = start_proxy(
        tmp_path,
        [GEMMA, VLLM],
        CHAT_PROXY_VLLM_REMOTE_URL=fake_vllm.url,
        CHAT_PROXY_OLLAMA_BASE_URL=ollama_down,
    )
    activated = httpx.post(url + "/admin/activate", json={"model": "gemma"}, timeout=120)
    assert activated.json()["state"] == "ready"
    proxy.send_signal(signal.SIGINT)  # Ctrl+C
    output = proxy.communicate(timeout=60)[0].decode()
    assert proxy.returncode == 0, output
    steps = shutdown_record(tmp_path)["steps"]
    assert steps["deactivate_vllm"].startswith("failed")  # the executor refused...
    assert steps["unload_ollama"] == "ok"  # ...and Ollama is down: nothing to free, no error
    assert steps["stop_models"] == "ok"
    assert not [c for _, c in our_processes() if "llamacpp.server" in c and str(tmp_path) in c]


def test_no_executor_and_no_ollama_is_a_quiet_clean_exit(tmp_path: Path) -> None:
    proxy, _ = start_proxy(
        tmp_path,
        [VLLM],
        CHAT_PROXY_VLLM_REMOTE_URL=f"http://127.0.0.1:{free_port()}",
        CHAT_PROXY_OLLAMA_BASE_URL=f"http://127.0.0.1:{free_port()}",
    )
    proxy.send_signal(signal.SIGINT)
    output = proxy.communicate(timeout=60)[0].decode()
    assert proxy.returncode == 0 and "WARNING" not in output, output
    assert shutdown_record(tmp_path)["steps"]["deactivate_vllm"] == "ok: executor not running"


def test_a_stream_in_flight_is_allowed_to_finish(tmp_path: Path, fake_vllm) -> None:
    slow = {
        "name": "slow",
        "backend": "openai",
        "served_model_id": "slow",
        "backend_config": {"base_url": fake_vllm.url + "/v1"},
    }
    proxy, url = start_proxy(tmp_path, [slow])
    received: list[str] = []

    def stream() -> None:
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            timeout=30,
            json={"model": "slow", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        ) as response:
            for line in response.iter_lines():
                received.append(line)
                if len(received) == 3:
                    proxy.send_signal(signal.SIGTERM)  # mid-stream

    reader = threading.Thread(target=stream)
    reader.start()
    reader.join(30)
    proxy.communicate(timeout=60)
    assert proxy.returncode == 0
    events = sse_events("\n".join(received))
    assert events[-1] == "[DONE]" and len(events) == 13  # nothing was cut
