"""Nothing blocks the event loop: the proxy's loop runs in asyncio's debug mode with a 20 ms
slow-callback threshold while the operations that touch disks, processes and the registry run
(lease writes, profile changes, registry reloads, engine starts and stops, forwarding); any
callback that held the loop longer is logged by asyncio and fails the test."""

from __future__ import annotations

import json
import logging

import pytest

from testkit.entries import eventually
from testkit.fake_engine import entry_for
from testkit.processes import FAKE_ENGINE_TEMPLATE

pytestmark = pytest.mark.subprocess
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
SLOW = "Executing"  # asyncio: "Executing <Handle ...> took 0.031 seconds"


def test_no_callback_holds_the_loop_for_long(proxy_factory, fake_vllm, caplog) -> None:
    template = json.loads(FAKE_ENGINE_TEMPLATE)
    template[template.index("{extra_args}")] = "--flavour=llamacpp"
    local = {
        "name": "local",
        "backend": "llamacpp",
        "vram_estimate_mb": 1000,
        "backend_config": {"model_path": "none"},
    }
    remote = entry_for("remote", fake_vllm.url, backend="openai")
    # A registry of a realistic size for a busy workstation, so that parsing it on the loop
    # would show (a few entries parse in well under the threshold).
    filler = [entry_for(f"m{i}", fake_vllm.url, backend="openai") for i in range(800)]
    proxy = proxy_factory(
        [local, remote, *filler],
        gpu_probe="none",
        slow_callback_s=0.02,
        llamacpp_launch_template=json.dumps(template),
        reconcile_s=0.2,
    )
    client = proxy.client

    def exercise(round_: int) -> None:
        activated = client.post("/admin/activate", json={"model": "local"}, timeout=60)
        assert activated.is_success, activated.text
        for model in ("local", "remote"):
            for stream in (False, True):
                answer = client.post(
                    "/v1/chat/completions", json={**CHAT, "model": model, "stream": stream}
                )
                assert answer.status_code == 200, answer.text
        lease = client.post("/v1/gpu/lease", json={"owner": "jv", "restart_model": True}).json()
        assert client.post("/v1/gpu/renew", json={"token": lease["token"]}).is_success
        assert client.post("/v1/gpu/release", json={"token": lease["token"]}).is_success
        # Polled one model at a time: a listing of hundreds of models is CPU work of its own.
        assert eventually(
            lambda: client.get("/v1/models/local").json()["imageworks"]["state"] == "ready", 30
        )
        assert client.put("/admin/profile", json={"name": "testing"}).is_success
        assert client.put("/admin/profile", json={"name": "production"}).is_success
        assert client.post("/admin/registry/reload").is_success
        more = entry_for(f"more{round_}", fake_vllm.url, backend="openai")
        proxy.write_registry([local, remote, more, *filler])
        assert eventually(lambda: client.get(f"/v1/models/{more['name']}").is_success, 10)
        assert client.post("/admin/deactivate", json={"model": "local"}).is_success
        client.get("/metrics")

    # The first round pays one-time costs (lazy imports, first connections); later rounds are
    # the steady state, where a blocking call (an fsync, a registry parse, a process wait) shows
    # in every round. On a shared 2-core machine the OS can preempt the loop's thread in any one
    # callback, so a round with a slow callback counts only if every round has one.
    exercise(1)
    caplog.set_level(logging.WARNING, "asyncio")
    rounds = []
    for round_ in (2, 3, 4):
        caplog.clear()
        exercise(round_)
        rounds.append(
            [
                r.getMessage()
                for r in caplog.records
                if r.name == "asyncio" and SLOW in r.getMessage()
            ]
        )
    assert not all(rounds), "callbacks held the event loop in every round:\n" + "\n".join(
        rounds[-1]
    )


def test_a_huge_body_is_validated_off_the_loop(proxy_factory, fake_vllm, monkeypatch) -> None:
    """900,000 messages took 0.5 s of validation on the loop. Validation (and the capability
    check, which walks every message too) of a body beyond ``BIG_BODY`` runs in the pool:
    recorded here by the thread each ran on. (Parsing it there already did; the C parser holds
    the GIL while it runs, about 0.6 µs a message: docs/performance.md.)"""
    import threading

    from imageworks.chat_proxy.request import payloads
    from imageworks.chat_proxy.routes import forward

    threads: dict[str, str] = {}

    def recorded(name: str, fn):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            threads[name] = threading.current_thread().name
            return fn(*args)

        return run

    monkeypatch.setattr(payloads, "validate", recorded("validate", payloads.validate))
    monkeypatch.setattr(
        forward, "check_capabilities", recorded("capabilities", forward.check_capabilities)
    )
    proxy = proxy_factory([entry_for("remote", fake_vllm.url, backend="openai")])
    many = [{"role": "user", "content": "x"}] * 60_000  # ~2 MB: over BIG_BODY
    answer = proxy.client.post("/v1/chat/completions", json={"model": "remote", "messages": many})
    assert answer.status_code == 200, answer.text
    loop_thread = "uvicorn-server"
    assert threads.keys() == {"validate", "capabilities"}
    assert loop_thread not in threads.values(), threads
