"""Nothing blocks the event loop: every callback of the proxy's loop is timed (``LoopWatch``:
its time on the CPU or blocked in a call, not the time the OS kept it waiting for a CPU) while
the operations that touch disks, processes and the registry run (lease writes, profile changes,
registry reloads, engine starts and stops, forwarding); a callback that held the loop for 20 ms
or more fails the test."""

from __future__ import annotations

import json
import threading
import time

import pytest

from testkit.entries import eventually
from testkit.fake_engine import entry_for
from testkit.processes import FAKE_ENGINE_TEMPLATE

pytestmark = pytest.mark.subprocess
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def test_no_callback_holds_the_loop_for_long(proxy_factory, fake_vllm) -> None:
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
    # in every round. The watch leaves out the time the OS preempted the loop's thread, but not
    # a wait for the GIL while another thread of this test process (the fake engine's, the
    # client's) holds it and is itself preempted: so a round with a slow callback counts only
    # if every round has one.
    exercise(1)
    watch = proxy.server.watch
    rounds = []
    for round_ in (2, 3, 4):
        watch.slow.clear()
        exercise(round_)
        rounds.append(list(watch.slow))
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


def test_the_watch_sees_a_blocking_call_and_cpu_work_but_not_a_short_callback() -> None:
    from testkit.servers import LoopThread, LoopWatch

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    loop = LoopThread("watched")
    watch = LoopWatch(0.02)
    watch.watch(loop.thread)
    try:
        for callback, seconds in ((time.sleep, 0.05), (spin, 0.05), (time.sleep, 0)):
            done = threading.Event()
            loop.loop.call_soon_threadsafe(
                lambda c=callback, s=seconds, d=done: (c(s), d.set())  # type: ignore[misc]
            )
            assert done.wait(10)
        assert len(watch.slow) == 2, watch.slow
        assert all("held the loop for" in line for line in watch.slow)
    finally:
        watch.forget(loop.thread)
        loop.close()
