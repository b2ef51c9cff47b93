"""Supervision under faults, against real processes: the real llama.cpp engine with the embedded
model, the real executor, fake engines run as real processes, and raw fake servers on loopback.

Each test is one of issue 12's reproductions: a start that fails with anything but a ProxyError,
an engine killed while ready, a proxy killed while its engine runs, a crash loop, an executor
whose model stopped behind the proxy's back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from testkit.entries import GEMMA, eventually
from testkit.fake_engine import sse_events
from testkit.processes import FAKE_ENGINE_TEMPLATE, Executor, our_processes, start_proxy
from testkit.servers import AiohttpServer

pytestmark = pytest.mark.subprocess

CHAT = {"messages": [{"role": "user", "content": "Tell me about cats."}], "max_tokens": 8}


def llama_servers(*, cwd: Path | None = None, parent: int | None = None) -> list[int]:
    """llama.cpp servers of this test only (other suites may run on the machine): those whose
    working directory is ``cwd`` (a proxy process started there), or whose parent is
    ``parent`` (an in-process proxy's children)."""
    found = []
    for pid, cmd in our_processes():
        if "llamacpp.server" not in cmd:
            continue
        try:
            here = Path(f"/proc/{pid}/cwd").readlink()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if (cwd is not None and here == cwd) or (parent is not None and ppid == parent):
            found.append(pid)
    return found


def model_state(proxy: Any, name: str) -> dict[str, Any]:
    models = proxy.client.get("/admin/state").json()["models"]
    found: dict[str, Any] = next(m for m in models if m["name"] == name)
    return found


def engine_pid(root: Path, name: str) -> int:
    record = json.loads((root / "_staging" / "engines" / f"{name}.json").read_text())
    pid: int = record["pid"]
    return pid


# --- a start that fails with anything but a ProxyError --------


@pytest.mark.parametrize("how", ["full disk", "log path is a directory"])
def test_a_start_whose_log_cannot_be_written_fails_once_and_spawns_nothing(
    proxy_factory, how: str
) -> None:
    proxy = proxy_factory([GEMMA], restart_backoff_s=30)
    log = proxy.root / "_staging" / "autostart" / "gemma.log"
    log.parent.mkdir(parents=True)
    if how == "full disk":
        log.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    else:
        log.mkdir()  # opening it for append raises IsADirectoryError
    before = set(llama_servers(parent=os.getpid()))
    first = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "gemma"})
    assert first.status_code == 502, first.text
    assert first.json()["error"]["code"] == "model_start_failed"
    assert "engine log" in first.json()["error"]["message"] or "No space" in first.text
    for _ in range(20):  # no storm: every later request is told to back off, none starts
        again = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "gemma"})
        assert again.status_code == 503 and again.json()["error"]["code"] == "model_start_backoff"
        assert 1 <= int(again.headers["retry-after"]) <= 30
    assert set(llama_servers(parent=os.getpid())) == before  # nothing spawned, nothing leaked
    state = model_state(proxy, "gemma")
    assert state["state"] == "failed" and state["restarts"]["consecutive_failures"] == 1
    assert state["restarts"]["retry_in_s"] > 0


def executor_app(calls: list[str]) -> web.Application:
    """An executor that fails every activation with a *string* error, as some do."""

    async def activate(request: web.Request) -> web.Response:
        calls.append("activate")
        return web.json_response({"error": "CUDA OOM"}, status=500)

    async def state(request: web.Request) -> web.Response:
        return web.json_response({"status": "stopped"})

    async def deactivate(request: web.Request) -> web.Response:
        calls.append("deactivate")
        return web.json_response({"status": "stopped"})

    app = web.Application()
    app.router.add_post("/admin/activate", activate)
    app.router.add_post("/admin/deactivate", deactivate)
    app.router.add_get("/admin/state", state)
    return app


def test_an_executor_500_with_a_string_error_is_one_failed_start(proxy_factory) -> None:
    calls: list[str] = []
    executor = AiohttpServer(executor_app(calls))
    try:
        entry = {
            "name": "v",
            "backend": "vllm",
            "backend_config": {"model_path": "/m"},
            "chat_template": {"source": "external", "path": "t.jinja"},
        }
        proxy = proxy_factory([entry], vllm_remote_url=executor.url, restart_backoff_s=30)
        results = []

        def ask() -> None:
            results.append(proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "v"}))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = sorted(r.json()["error"]["code"] for r in results)
        # Concurrent requests share the one start; a latecomer may already see the backoff.
        assert codes.count("model_start_failed") >= 1
        assert set(codes) <= {"model_start_failed", "model_start_backoff"}
        failed = next(r for r in results if r.json()["error"]["code"] == "model_start_failed")
        assert failed.status_code == 502 and "CUDA OOM" in failed.json()["error"]["message"]
        later = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "v"})
        assert later.status_code == 503 and later.headers["retry-after"]
        assert calls.count("activate") == 1  # one attempt, not thousands
    finally:
        executor.stop()


# --- an engine killed while ready --------


def test_kill_9_of_a_ready_engine_mid_stream_ends_the_stream_and_the_next_request_restarts(
    proxy_factory,
) -> None:
    proxy = proxy_factory([GEMMA], reconcile_s=30)  # the exit watch, not the loop, must see it
    assert proxy.client.post("/admin/activate", json={"model": "gemma"}, timeout=120).is_success
    pid = engine_pid(proxy.root, "gemma")
    body = {**CHAT, "model": "gemma", "stream": True, "max_tokens": 400}
    text, killed = "", False
    with proxy.client.stream("POST", "/v1/chat/completions", json=body, timeout=60) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            text += line + "\n"
            if line.startswith("data: {") and not killed:
                os.kill(pid, signal.SIGKILL)  # after the first token
                killed = True
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] in ("backend_unavailable", "backend_timeout"), error
    assert eventually(lambda: model_state(proxy, "gemma")["state"] == "crashed", 5)
    state = model_state(proxy, "gemma")
    assert "exited with code -9" in state["last_error"]
    metrics = proxy.client.get("/metrics").text
    assert 'chat_proxy_engine_crashes_total{model="gemma"} 1.0' in metrics

    served = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "gemma"}, timeout=120)
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"]
    assert model_state(proxy, "gemma")["state"] == "ready"
    assert engine_pid(proxy.root, "gemma") != pid
    assert llama_servers(parent=os.getpid()) == [engine_pid(proxy.root, "gemma")]
    proxy.server.stop()
    crashes = proxy.records("crash")
    assert [c["model"] for c in crashes] == ["gemma"] and not crashes[0]["crash_loop"]


def test_a_crash_loop_ends_in_failed_after_the_limit(proxy_factory) -> None:
    template = json.loads(FAKE_ENGINE_TEMPLATE)
    template[template.index("{extra_args}") : template.index("{extra_args}") + 1] = [
        "--flavour",
        "llamacpp",
        "--exit-after",
        "1",
    ]
    crashy = {"name": "crashy", "backend": "llamacpp", "backend_config": {"model_path": "none"}}
    proxy = proxy_factory(
        [crashy],
        llamacpp_launch_template=json.dumps(template),
        crash_loop_limit=3,
        restart_backoff_s=0.2,
        restart_backoff_max_s=0.5,
    )
    codes: list[str] = []

    def halted() -> bool:
        answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "crashy"})
        codes.append("ok" if answer.is_success else answer.json()["error"]["code"])
        return model_state(proxy, "crashy")["state"] == "failed"

    assert eventually(halted, 60)
    state = model_state(proxy, "crashy")
    assert "crash loop: 3 crashes" in state["restarts"]["halted"]
    assert "exited with code 3" in state["last_error"]  # the real cause is kept
    assert state["restart"] == "on-failure"
    for _ in range(5):  # halted: requests are refused, nothing is started any more
        refused = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "crashy"})
        assert refused.status_code == 502 and "crash loop" in refused.json()["error"]["message"]
    log = (proxy.root / "_staging" / "autostart" / "crashy.log").read_text()
    assert log.count("starting:") == 3  # exactly the allowed attempts, counted in its log
    assert "ok" in codes  # it did serve between crashes
    assert not [p for p, c in our_processes() if "fake_engine" in c and "--exit-after" in c]


# --- engines the proxy does not parent: reconciled --------


@pytest.mark.parametrize("noticed_by", ["the reconcile loop", "a refused request"])
def test_a_vllm_stopped_behind_the_proxys_back_is_noticed_and_restarted(
    tmp_path: Path, proxy_factory, noticed_by: str
) -> None:
    root = tmp_path / "exec"
    (root / "configs").mkdir(parents=True)
    entry = {
        "name": "v",
        "backend": "vllm",
        "backend_config": {"model_path": "/m"},
        "chat_template": {"source": "external", "path": "t.jinja"},
    }
    (root / "configs" / "model_registry.curated.json").write_text(json.dumps([entry]))
    executor = Executor(root, template=FAKE_ENGINE_TEMPLATE)
    try:
        loop_s = 0.2 if noticed_by == "the reconcile loop" else 3600
        proxy = proxy_factory([entry], vllm_remote_url=executor.url, reconcile_s=loop_s)
        assert proxy.client.post("/admin/activate", json={"model": "v"}, timeout=60).is_success
        httpx.post(executor.url + "/admin/deactivate", timeout=30)  # behind the proxy's back
        if noticed_by == "a refused request":
            refused = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "v"})
            assert refused.status_code == 502  # the engine is gone: connection refused...
        # ...and the proxy looks at once instead of calling it ready forever
        assert eventually(lambda: model_state(proxy, "v")["state"] == "crashed", 10)
        served = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "v"}, timeout=60)
        assert served.status_code == 200, served.text
        assert httpx.get(executor.url + "/admin/state").json()["status"] == "running"
    finally:
        proxy.server.stop()
        assert executor.stop() == 0


# --- a proxy killed while its engine runs --------


def test_kill_9_of_the_proxy_then_a_restart_adopts_the_engine(tmp_path: Path) -> None:
    proxy, url = start_proxy(tmp_path, [GEMMA])
    try:
        activated = httpx.post(url + "/admin/activate", json={"model": "gemma"}, timeout=120)
        assert activated.json()["state"] == "ready"
        pid = engine_pid(tmp_path, "gemma")
        proxy.send_signal(signal.SIGKILL)
        proxy.communicate(timeout=10)
        assert llama_servers(cwd=tmp_path) == [pid]  # the engine outlived its proxy...

        proxy, url = start_proxy(tmp_path, [GEMMA])  # ...and the next proxy takes it back
        state = httpx.get(url + "/admin/state").json()["models"][0]
        assert state["state"] == "ready"
        assert llama_servers(cwd=tmp_path) == [pid]  # exactly one engine, the adopted one
        served = httpx.post(
            url + "/v1/chat/completions", json={**CHAT, "model": "gemma"}, timeout=120
        )
        assert served.status_code == 200 and engine_pid(tmp_path, "gemma") == pid
        autostarts = [
            json.loads(line)
            for line in (tmp_path / "logs" / "chat_proxy.jsonl").read_text().splitlines()
            if '"autostart"' in line or '"adopt"' in line
        ]
        events = [r["event"] for r in autostarts]
        # No second start after the adoption. (The first proxy's own autostart record may be
        # lost with it: kill -9 takes the log writer's unflushed batch too.)
        assert events.count("adopt") == 1 and events[-1] == "adopt", events
    finally:
        proxy.send_signal(signal.SIGINT)
        proxy.communicate(timeout=60)
    assert proxy.returncode == 0
    assert not llama_servers(cwd=tmp_path)


def test_a_record_whose_process_is_gone_or_reused_is_not_adopted(tmp_path: Path) -> None:
    engines = tmp_path / "_staging" / "engines"
    engines.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])  # a live pid that is not our engine
    try:
        (engines / "gemma.json").write_text(
            json.dumps(
                {
                    "pid": sleeper.pid,
                    "start_ticks": 1,
                    "argv": ["python", "-m", "imageworks.chat_proxy.llamacpp.server"],
                    "log_path": "",
                    "extra": {"model": "gemma", "port": 1},
                }
            )
        )
        proxy, url = start_proxy(tmp_path, [GEMMA])
        assert httpx.get(url + "/admin/state").json()["models"][0]["state"] == "stopped"
        assert sleeper.poll() is None  # a stranger's process is never signalled
        assert not (engines / "gemma.json").exists()
        proxy.send_signal(signal.SIGINT)
        proxy.communicate(timeout=60)
        assert proxy.returncode == 0
    finally:
        sleeper.kill()
        sleeper.wait()
