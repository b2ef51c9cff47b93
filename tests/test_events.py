"""``GET /admin/events``: a real client follows a swap as it happens; the bus never waits for
a slow subscriber."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from imageworks.chat_proxy.observe.events import EventBus, sse
from testkit.processes import FAKE_ENGINE_TEMPLATE, Executor

REPO = Path(__file__).resolve().parents[1]


def entry(name: str) -> dict[str, object]:
    return {
        "name": name,
        "backend": "vllm",
        "backend_config": {"model_path": f"/weights/{name}"},
        "chat_template": {"source": "external", "path": "t.jinja"},
    }


def follow(url: str, seen: list[dict[str, Any]], stop: threading.Event) -> None:
    with (
        httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=30)) as http,
        http.stream("GET", "/admin/events") as answer,
    ):
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
            if stop.is_set():
                return


@pytest.mark.subprocess
def test_a_client_sees_the_swap_as_it_happens(tmp_path: Path, proxy_factory) -> None:
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "deployment_profiles.json", tmp_path / "configs")
    (tmp_path / "configs" / "model_registry.curated.json").write_text(
        json.dumps([entry("left"), entry("right")])
    )
    executor = Executor(tmp_path, template=FAKE_ENGINE_TEMPLATE)
    try:
        proxy = proxy_factory([entry("left"), entry("right")], vllm_remote_url=executor.url)
        seen: list[dict[str, Any]] = []
        stop = threading.Event()
        reader = threading.Thread(target=follow, args=(proxy.url, seen, stop), daemon=True)
        reader.start()
        time.sleep(0.3)  # subscribed
        for model in ("left", "right"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            assert proxy.client.post("/v1/chat/completions", json=body).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            e.get("event") == "autostart" and e.get("model") == "right" for e in seen
        ):
            time.sleep(0.05)
        stop.set()
        proxy.client.post(  # one more event wakes the reader so it can return
            "/admin/deactivate", json={"model": "right"}
        )
        reader.join(10)
    finally:
        executor.stop()
    kinds = [(e.get("event"), e.get("model"), e.get("state")) for e in seen]
    # left starts and is ready; the swap stops it and starts right, in that order.
    order = [
        ("state", "left", "starting"),
        ("state", "left", "ready"),
        ("autostart", "left", None),
        ("state", "left", "stopping"),
        ("state", "left", "stopped"),
        ("unload", "left", None),
        ("state", "right", "starting"),
        ("state", "right", "ready"),
        ("autostart", "right", None),
    ]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(isinstance(e.get("ts"), str) and e["ts"].endswith("Z") for e in seen)
    assert not any(e.get("event") == "request" for e in seen)  # requests stay in the JSONL


def test_events_need_the_admin_token_from_another_host(proxy_factory) -> None:
    proxy = proxy_factory([], admin_token="s3cret")
    refused = proxy.client.get("/admin/events")
    assert refused.status_code in (401, 403) and refused.json()["error"]["code"]
    with proxy.client.stream(
        "GET", "/admin/events", headers={"authorization": "Bearer s3cret"}
    ) as answer:
        assert answer.status_code == 200
        assert next(answer.iter_lines()) == ": events"


async def test_a_slow_subscriber_loses_events_and_is_told_how_many() -> None:
    bus = EventBus(queue_size=4)
    slow = bus.open()
    quick = bus.open()
    started = time.perf_counter()
    for n in range(1000):
        bus.publish({"event": "evict", "ts": "t", "n": n})
        if not quick.queue.empty():
            quick.queue.get_nowait()
    assert time.perf_counter() - started < 0.5  # publishing never waited for anyone
    got = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
    assert [e["n"] for e in got] == [0, 1, 2, 3]
    assert slow.dropped == 996 and bus.dropped == 996
    bus.publish({"event": "evict", "ts": "t", "n": 1000})  # room again: told first, then the event
    notice, event = slow.queue.get_nowait(), slow.queue.get_nowait()
    assert notice == {"event": "dropped", "count": 996, "ts": "t"} and event["n"] == 1000
    bus.close(slow)
    bus.close(quick)
    assert bus.subscribers == set()


async def test_a_reconnect_gets_what_it_missed_and_request_records_stay_out() -> None:
    bus = EventBus(history=3)
    bus.publish({"event": "request", "ts": "t"})
    for n in range(5):
        bus.publish({"event": "state", "ts": "t", "n": n})
    assert bus.published == 5 and [e["id"] for e in bus.recent] == [3, 4, 5]
    again = bus.open(after=3)
    assert [again.queue.get_nowait()["id"] for _ in range(2)] == [4, 5]


async def test_publishing_from_another_thread_goes_through_the_loop() -> None:
    bus = EventBus()
    bus.bind()
    subscriber = bus.open()
    thread = threading.Thread(target=bus.publish, args=({"event": "crash", "ts": "t"},))
    thread.start()
    thread.join()
    event = await asyncio.wait_for(subscriber.queue.get(), 2)
    assert event["event"] == "crash" and event["id"] == 1


def test_the_wire_format() -> None:
    assert sse({"id": 7, "event": "evict", "model": "a"}) == (
        b'id: 7\nevent: evict\ndata: {"id":7,"event":"evict","model":"a"}\n\n'
    )
