"""Swap arms on the fakes (issue 26), through the real proxy and executor processes:

    uv run python -m bench.swap --arm tiers [--swaps 6]        swap by stop vs by sleep
    uv run python -m bench.swap --arm interleaved [--rounds 6]  two clients alternating models

``tiers``: the simulated GPU (24000 MB) and the fake vLLM, two models that do not fit together
(14000 MB each), requests alternating between them; once with sleep mode off (every swap stops
one model and cold-starts the other) and once on (the other sleeps and wakes, ``--wake-s``).
``interleaved``: no GPU budget (one shared executor slot), two clients on a fixed schedule,
alternating between two models that cannot run at once; with collation
off (``CHAT_PROXY_COLLATE_MAX=0``) and on; reports swaps, p50 and p99 of request latency.
"""

from __future__ import annotations

import json
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from testkit.gpu import simulated_gpu
from testkit.processes import FAKE_VLLM_TEMPLATE, Executor, start_proxy, write_registry

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def _entry(name: str, *flags: str, sleep: bool = False, served: str | None = None) -> Any:
    return {
        "name": name,
        "backend": "vllm",
        "served_model_id": served or name,
        "vram_estimate_mb": 14000,
        "backend_config": {"model_path": "/m", "extra_args": list(flags), "sleep_mode": sleep},
        "chat_template": {"source": "external", "path": "t.jinja"},
    }


class _Box:
    def __init__(self, root: Path, entries: list[Any], sim: bool, **env: str) -> None:
        sim_env: dict[str, str] = {}
        if sim:
            _, sim_env = simulated_gpu(root, [24000], release_delay_s=0.2)
        write_registry(root / "executor", entries)
        self.executor = Executor(root / "executor", template=FAKE_VLLM_TEMPLATE, env=sim_env)
        self.proxy, self.url = start_proxy(
            root / "proxy", entries, **sim_env, CHAT_PROXY_VLLM_REMOTE_URL=self.executor.url, **env
        )
        self.log = root / "proxy" / "logs" / "chat_proxy.jsonl"

    def chat(self, model: str, stream: bool = False) -> float:
        started = time.perf_counter()
        body = {"model": model, **CHAT, "stream": stream}
        answer = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=300)
        answer.raise_for_status()
        return time.perf_counter() - started

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def close(self) -> None:
        self.proxy.send_signal(signal.SIGTERM)
        self.proxy.communicate(timeout=60)
        self.executor.stop()


def tiers(swaps: int, wake_s: float) -> None:
    for label, sleep in (("stop", False), ("sleep", True)):
        with tempfile.TemporaryDirectory() as tmp:
            flags = ("--sim-weights-mb", "5000", "--sim-wake-s", str(wake_s))
            entries = [
                _entry("model-a", *flags, sleep=sleep),
                _entry("model-b", *flags, sleep=sleep),
            ]
            box = _Box(Path(tmp), entries, sim=True, CHAT_PROXY_SLEEP_RAM_MB="30000")
            try:
                box.chat("model-a")
                box.chat("model-b")  # both have run once: cold starts are behind us
                took = [box.chat(("model-a", "model-b")[i % 2]) for i in range(swaps)]
                tier_of = [e.get("tier") for e in box.events() if e.get("event") == "evict"]
            finally:
                box.close()
        print(
            f"swap by {label}: {len(took)} swaps, median {statistics.median(took):.3f} s, "
            f"min {min(took):.3f} s, max {max(took):.3f} s (evictions: {tier_of})"
        )


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _alternate(box: _Box, rounds: int) -> list[float]:
    """Two clients, one on each model, sending on a fixed schedule (open loop: a request every
    0.25 s in all, ABAB), each answer a 0.5 s stream: requests for the resident model keep
    arriving while one for the other model waits, the load under which strict first-come turns
    swap on nearly every request (issue 26). Closed-loop workers that waited for each answer
    drained the slot between requests and left nothing to collate."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(model: str) -> None:
        took = box.chat(model, stream=True)  # "slow" streams for 0.5 s
        with lock:
            latencies.append(took)

    workers = []
    for i in range(2 * rounds):
        worker = threading.Thread(target=one, args=(("model-a", "model-b")[i % 2],))
        worker.start()
        workers.append(worker)
        time.sleep(0.25)
    for worker in workers:
        worker.join()
    return latencies


def interleaved(rounds: int) -> None:
    for label, limit in (("without collation", "0"), ("with collation", "8")):
        with tempfile.TemporaryDirectory() as tmp:
            entries = [
                _entry("model-a", "--startup-delay", "0.3", served="slow"),
                _entry("model-b", "--startup-delay", "0.3", served="slow"),
            ]
            box = _Box(Path(tmp), entries, sim=False, CHAT_PROXY_COLLATE_MAX=limit)
            try:
                latencies = _alternate(box, rounds)
                swaps = sum(
                    1
                    for e in box.events()
                    if e.get("event") == "unload" and e.get("reason") == "swap"
                )
            finally:
                box.close()
        print(
            f"interleaved {label}: {len(latencies)} requests, {swaps} swaps, "
            f"p50 {_percentile(latencies, 0.5):.2f} s, p99 {_percentile(latencies, 0.99):.2f} s"
        )
