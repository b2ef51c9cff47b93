"""Model starts and shutdown seen from outside: a real proxy whose vLLM entries are started by a
fake executor (``testkit.fake_executor``) that the test holds, hangs or lets go."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from testkit.fake_executor import FakeExecutor
from testkit.servers import AiohttpServer, free_port

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def vllm_entry(name: str) -> dict[str, object]:
    return {
        "name": name,
        "backend": "vllm",
        "served_model_id": "served",
        "backend_config": {"model_path": f"/weights/{name}"},
        "chat_template": {"source": "external", "path": "t.jinja"},
    }


@pytest.fixture
def executor(fake_vllm) -> Iterator[FakeExecutor]:
    fake = FakeExecutor(fake_vllm.url)
    server = AiohttpServer(fake.app())
    fake.url = server.url
    yield fake
    fake.release.set()
    server.stop()


def metric(proxy, line_start: str) -> str | None:
    """The value of the first /metrics sample whose line starts with ``line_start``."""
    for line in proxy.client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return line.rsplit(" ", 1)[1]
    return None


def test_a_streaming_client_gets_a_loading_comment_every_keepalive_interval(
    proxy_factory, executor
) -> None:
    executor.hold_activate = True
    proxy = proxy_factory(
        [vllm_entry("v")], vllm_remote_url=executor.url, keepalive_s=0.05, start_timeout_s=60
    )
    comments: list[str] = []
    with (
        httpx.Client(base_url=proxy.url, timeout=10) as client,
        client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "model": "v", "stream": True}
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:  # the start is held until three comments have arrived
            if line.startswith(": loading v"):
                comments.append(line)
                if len(comments) == 3:
                    executor.release.set()
                    break
        rest = [line for line in lines if line]
    # Never loaded before: no estimate, only the time so far, which grows.
    elapsed = [float(re.fullmatch(r": loading v \((\d+\.\d) s\)", c)[1]) for c in comments]
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0]
    assert rest[-1] == "data: [DONE]"
    assert metric(proxy, 'chat_proxy_model_loads_total{model="v",result="ready"}') == "1.0"
    assert metric(proxy, 'chat_proxy_model_load_seconds_count{model="v"}') == "1.0"


def test_a_model_still_loading_when_the_wait_ends_is_504_model_start_timeout(
    proxy_factory, executor
) -> None:
    executor.hang_activate = True
    # The wait for a model that is loading is bounded by its start timeout (+5 s of grace).
    proxy = proxy_factory(
        [vllm_entry("v")],
        vllm_remote_url=executor.url,
        start_timeout_s=0.2,
        queue_timeout_s=0.2,
        shutdown_step_timeout_s=2,
    )
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "v"})
    assert answer.status_code == 504, answer.text
    error = answer.json()["error"]
    assert error["code"] == "model_start_timeout" and error["type"] == "server_error"
    assert answer.headers["retry-after"]


def test_a_failed_start_is_counted(proxy_factory, fake_vllm) -> None:
    # Nothing listens where the executor should be: the start fails at once.
    proxy = proxy_factory([vllm_entry("v")], vllm_remote_url=f"http://127.0.0.1:{free_port()}")
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "v"})
    assert answer.status_code == 502
    assert metric(proxy, 'chat_proxy_model_loads_total{model="v",result="failed"}') == "1.0"


def test_shutdown_runs_its_steps_in_order_and_bounds_one_that_hangs(
    proxy_factory, executor
) -> None:
    executor.hang_deactivate = True
    proxy = proxy_factory(
        [vllm_entry("v")],
        vllm_remote_url=executor.url,
        ollama_base_url=f"http://127.0.0.1:{free_port()}",
        shutdown_step_timeout_s=1,
    )
    assert proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "v"}).status_code == 200
    proxy.server.stop()
    (record,) = proxy.records("shutdown")
    steps = record["steps"]
    assert list(steps) == ["release_lease", "stop_models", "deactivate_vllm", "unload_ollama"]
    # Stopping the running model asks the executor, which never answers: that step times out
    # (and so does the executor's own deactivation), and the steps after it still run.
    # (The message is empty: ``exc or type(exc).__name__`` in lifespan keeps the exception,
    # whose str() is empty; left for the supervision rework, see docs/testing.md.)
    assert steps["stop_models"].startswith("failed")
    assert steps["deactivate_vllm"].startswith("failed")
    assert steps["release_lease"] == "ok" and steps["unload_ollama"] == "ok"
    assert executor.calls == ["activate v", "deactivate", "deactivate"]


def test_after_the_first_load_the_comments_carry_its_estimate(proxy_factory, executor) -> None:
    proxy = proxy_factory(
        [vllm_entry("v")], vllm_remote_url=executor.url, keepalive_s=0.05, start_timeout_s=60
    )
    assert proxy.client.post("/admin/activate", json={"model": "v"}).status_code == 200
    first = proxy.client.get("/admin/state").json()["models"][0]
    assert first["state"] == "ready" and first["load_ms"] > 0 and first["loading"] is None
    assert proxy.client.post("/admin/deactivate", json={"model": "v"}).status_code == 200
    executor.hold_activate = True
    executor.release.clear()
    comments: list[str] = []
    with (
        httpx.Client(base_url=proxy.url, timeout=10) as client,
        client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "model": "v", "stream": True}
        ) as response,
    ):
        lines = response.iter_lines()
        for line in lines:
            if line.startswith(": loading v"):
                comments.append(line)
                if len(comments) == 2:
                    loading = client.get("/admin/state").json()["models"][0]["loading"]
                if len(comments) == 30:  # held well past twice the first load
                    executor.release.set()
                    break
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    about = re.compile(r": loading v \(\d+\.\d s of about \d+(\.\d)? s\)")
    slower = re.compile(r": loading v \(\d+\.\d s, slower than its usual \d+(\.\d)? s\)")
    assert about.fullmatch(comments[0]), comments[0]
    assert slower.fullmatch(comments[-1]), comments[-1]
    assert loading["kind"] == "load" and loading["expected_s"] == round(first["load_ms"] / 1000, 1)
    assert loading["elapsed_s"] >= 0 and loading["left_s"] is not None


def test_a_pinned_model_is_never_swapped_out_of_its_slot(proxy_factory, executor) -> None:
    pinned = {**vllm_entry("a"), "pinned": True}
    proxy = proxy_factory([pinned, vllm_entry("b")], vllm_remote_url=executor.url)
    assert proxy.client.post("/admin/activate", json={"model": "a"}).status_code == 200
    refused = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "b"})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_vram" and "pinned model 'a'" in error["message"]
    states = {m["name"]: m["state"] for m in proxy.client.get("/admin/state").json()["models"]}
    assert states == {"a": "ready", "b": "stopped"}
