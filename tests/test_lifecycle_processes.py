"""Autostart, start failures, activation and the CLI, with real llama.cpp processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from testkit.entries import GEMMA, eventually
from testkit.fake_engine import sse_events
from testkit.processes import our_processes

pytestmark = pytest.mark.subprocess

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BROKEN = {
    "name": "broken",
    "backend": "llamacpp",
    "backend_config": {"model_path": "/nowhere/model.gguf"},
}


def llama_servers() -> list[str]:
    return [cmd for _, cmd in our_processes() if "llamacpp.server" in cmd]


def test_a_process_that_exits_during_start_fails_fast_with_its_log_and_can_retry(
    proxy_factory,
) -> None:
    # A backoff (1 s, doubling) is what keeps a broken model from being restarted in a loop;
    # here 0.2 s, so each request makes its own attempt once it has passed.
    # The backoff is counted from when the proxy records the failure, which may be just after
    # the client got its 502: with a 1 ms backoff, a next request sent within it was refused
    # (503 model_start_backoff, about one run in three on a loaded machine). So each next
    # request waits until the proxy's backoff has passed, as a client honouring it would.
    proxy = proxy_factory([BROKEN], start_timeout_s=300, restart_backoff_s=0.2)
    restarts = proxy.state.lifecycle.restarts_of("broken")

    def backoff_passed() -> bool:
        return restarts.failures > 0 and restarts.wait_s(time.monotonic()) == 0

    for _ in range(2):  # a failed start does not wedge the model: the next request tries again
        answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "broken"})
        assert answer.status_code == 502
        error = answer.json()["error"]
        assert error["code"] == "model_start_failed"
        assert "exited with code 2" in error["message"]
        assert "model file not found: /nowhere/model.gguf" in error["message"]  # the log tail
        assert eventually(backoff_passed, 5)
    streamed = proxy.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "broken", "stream": True}
    )
    assert streamed.status_code == 200 and streamed.text.startswith(": loading broken")
    assert json.loads(sse_events(streamed.text)[-2])["error"]["code"] == "model_start_failed"
    state = proxy.client.get("/admin/state").json()["models"][0]
    assert state["state"] == "failed" and "model file not found" in state["last_error"]
    log = (proxy.root / "_staging" / "autostart" / "broken.log").read_text()
    assert log.count("starting:") == 3
    proxy.server.stop()
    assert [r["error_code"] for r in proxy.records()] == ["err_model_start_failed"] * 3


def test_autostart_off_gives_502_with_a_hint_until_the_model_is_activated(proxy_factory) -> None:
    proxy = proxy_factory([GEMMA], autostart_enabled=False)
    refused = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "gemma"})
    assert refused.status_code == 502
    assert refused.json()["error"]["code"] == "backend_unavailable"
    assert "imageworks-models activate-model gemma" in refused.json()["error"]["message"]
    activated = proxy.client.post("/admin/activate", json={"model": "gemma"}, timeout=120)
    assert activated.json()["state"] == "ready" and activated.json()["load_ms"] > 0
    served = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "gemma"})
    assert served.status_code == 200
    assert proxy.client.post("/admin/deactivate", json={"model": "gemma"}).json() == {
        "stopped": ["gemma"]
    }
    assert proxy.client.get("/admin/state").json()["models"][0]["state"] == "stopped"
    assert not [c for c in llama_servers() if str(proxy.root) in c or "gemma" in c]


def test_activation_of_an_unmanaged_model_is_refused(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory(
        [
            {
                "name": "ext",
                "backend": "openai",
                "backend_config": {"base_url": fake_vllm.url + "/v1"},
            }
        ]
    )
    answer = proxy.client.post("/admin/activate", json={"model": "ext"})
    assert answer.status_code == 400 and "not started by the proxy" in answer.text


def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imageworks.model_loader.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "IMAGEWORKS_CHAT_PROXY_URL": url},
    )


def test_cli_activate_current_deactivate_against_a_real_proxy(proxy_factory) -> None:
    proxy = proxy_factory([GEMMA])
    assert cli("current-model", url=proxy.url).stdout.strip() == "none"
    activated = cli("activate-model", "gemma", url=proxy.url)
    assert activated.returncode == 0, activated.stderr
    assert activated.stdout.startswith("gemma: ready in ")
    current = cli("current-model", url=proxy.url)
    assert current.stdout.startswith("gemma  llamacpp  ready")
    assert json.loads(cli("current-model", "--json", url=proxy.url).stdout)[0]["name"] == "gemma"
    assert cli("deactivate-model", url=proxy.url).stdout.strip() == "stopped: gemma"
    assert cli("deactivate-model", url=proxy.url).stdout.strip() == "nothing was running"
    missing = cli("activate-model", "nope", url=proxy.url)
    assert missing.returncode == 1 and "model_not_found" not in missing.stderr
    assert "The model 'nope' does not exist" in missing.stderr


def test_cli_current_model_shows_a_failed_model_with_its_backoff_and_error(
    proxy_factory,
) -> None:
    proxy = proxy_factory([BROKEN], restart_backoff_s=600)
    assert proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "broken"}).is_error
    lines = cli("current-model", url=proxy.url).stdout.splitlines()
    assert lines[0].startswith("broken  llamacpp  failed  in flight: 0  restart: on-failure")
    assert ", next try in " in lines[0]
    assert lines[1].startswith("  last error: model 'broken' failed to start")


def test_cli_with_the_proxy_down_is_one_line_and_exit_1() -> None:
    from testkit.servers import free_port

    result = cli("current-model", url=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("Error: cannot reach the chat proxy at")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_stream_for_a_model_in_backoff_is_refused_before_the_first_byte(proxy_factory) -> None:
    proxy = proxy_factory([BROKEN], restart_backoff_s=600)
    assert proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "broken"}).is_error
    streamed = proxy.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "broken", "stream": True}
    )
    assert streamed.status_code == 503  # a real status, not 200 and an in-band error
    assert streamed.json()["error"]["code"] == "model_start_backoff"
    assert int(streamed.headers["retry-after"]) > 0


def test_streams_queued_behind_a_loading_model_get_loading_comments_not_429(
    proxy_factory,
) -> None:
    import threading

    from testkit.processes import FAKE_ENGINE_TEMPLATE

    template = json.loads(FAKE_ENGINE_TEMPLATE)
    template[template.index("{extra_args}")] = "--startup-delay=1.5"
    slow_start = {
        "name": "slow-start",
        "backend": "llamacpp",
        "max_concurrency": 1,
        "backend_config": {"model_path": "none"},
    }
    proxy = proxy_factory(
        [slow_start], llamacpp_launch_template=json.dumps(template), queue_timeout_s=0.5
    )
    bodies: list[str] = []

    def stream() -> None:
        answer = proxy.client.post(
            "/v1/chat/completions", json={**CHAT, "model": "slow-start", "stream": True}
        )
        assert answer.status_code == 200
        bodies.append(answer.text)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The load outlasts the 0.5 s queue timeout: waiting for it is the lifecycle's queue.
    for body in bodies:
        assert body.startswith(": loading slow-start")
        events = sse_events(body)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), body
    assert len(bodies) == 3


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_cut_off_by_shutdown_gets_an_answer_and_a_record(
    proxy_factory, stream: bool
) -> None:
    import threading

    from testkit.processes import FAKE_ENGINE_TEMPLATE

    template = json.loads(FAKE_ENGINE_TEMPLATE)
    template[template.index("{extra_args}")] = "--startup-delay=60"  # a start that outlasts us
    slow = {"name": "slow", "backend": "llamacpp", "backend_config": {"model_path": "none"}}
    proxy = proxy_factory([slow], llamacpp_launch_template=json.dumps(template))
    answers: list[Any] = []

    def ask() -> None:
        answers.append(
            proxy.client.post(
                "/v1/chat/completions", json={**CHAT, "model": "slow", "stream": stream}
            )
        )

    asking = threading.Thread(target=ask)
    asking.start()
    assert eventually(lambda: model_state_of(proxy, "slow") == "starting", 10)
    proxy.server.stop()  # graceful period (2 s in tests), then the request is cancelled
    asking.join(30)
    (answer,) = answers
    if stream:
        assert answer.status_code == 200 and answer.text.startswith(": loading slow")
        events = sse_events(answer.text)
        assert json.loads(events[-2])["error"]["code"] == "shutting_down"
        assert events[-1] == "[DONE]"
    else:
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
    (record,) = proxy.records()
    assert record["error_code"] == "err_shutting_down"


def model_state_of(proxy: Any, name: str) -> str:
    models = proxy.client.get("/admin/state").json()["models"]
    return str(next(m["state"] for m in models if m["name"] == name))
