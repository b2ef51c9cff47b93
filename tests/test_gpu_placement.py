"""GPU truth on a simulated multi-device GPU, with real processes: the proxy (its own process,
``CHAT_PROXY_GPU_PROBE=sim``), the vLLM executor running fake vLLMs that reserve exactly their
``--gpu-memory-utilization`` of their ``CUDA_VISIBLE_DEVICES`` (and refuse to start without
it free, as vLLM does), a fake Ollama that loads models with sizes, and fake llama.cpp servers
holding memory. No timing assertions: each step waits for an observable state, bounded only
so that a broken test cannot hang."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imageworks.chat_proxy.arbiter.simgpu import SimGpu
from testkit.entries import eventually
from testkit.gpu import held_by, simulated_gpu
from testkit.processes import (
    FAKE_ENGINE_TEMPLATE,
    FAKE_VLLM_TEMPLATE,
    Executor,
    start_engine,
    start_proxy,
    write_registry,
)

pytestmark = pytest.mark.subprocess
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
VISION_TAG = "qwen2.5vl:7b"


def vllm(name: str, need_mb: int, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "vllm",
        "vram_estimate_mb": need_mb,
        "backend_config": {"model_path": "/m"},
        "chat_template": {"source": "external", "path": "t.jinja"},
        **fields,
    }


def llamacpp(name: str, mb: int, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "llamacpp",
        "vram_estimate_mb": mb,
        "backend_config": {"model_path": "none", "extra_args": ["--sim-vram-mb", str(mb)]},
        **fields,
    }


VISION = {
    "name": "vision",
    "backend": "ollama",
    "served_model_id": VISION_TAG,
    "vram_estimate_mb": 8000,
}


def llamacpp_template() -> str:
    argv = json.loads(FAKE_ENGINE_TEMPLATE)
    argv[argv.index("{extra_args}") : argv.index("{extra_args}") + 1] = [
        "--flavour",
        "llamacpp",
        "{extra_args}",
    ]
    return json.dumps(argv)


class Box:
    """A workstation: a simulated GPU, a fake Ollama, the executor and the proxy."""

    def __init__(self, root: Path, totals_mb: list[int], entries: list[dict[str, Any]]) -> None:
        self.root = root
        self.sim, self.env = simulated_gpu(root, totals_mb)
        self.stoppers: list[Any] = []
        devices = ",".join(str(i) for i in range(len(totals_mb)))
        self.ollama, ollama_url = start_engine(
            root,
            "--flavour",
            "ollama",
            "--sim-model",
            f"{VISION_TAG}=8000",
            CUDA_VISIBLE_DEVICES=devices,
            **self.env,
        )
        self.stoppers.append(self._stop_ollama)
        executor_root = root / "executor"
        write_registry(executor_root, entries)
        self.executor = Executor(executor_root, template=FAKE_VLLM_TEMPLATE, env=self.env)
        self.stoppers.append(self.executor.stop)
        self.proxy, self.url = start_proxy(
            root / "proxy",
            entries,
            **self.env,
            CHAT_PROXY_VLLM_REMOTE_URL=self.executor.url,
            CHAT_PROXY_OLLAMA_BASE_URL=ollama_url,
            CHAT_PROXY_LLAMACPP_LAUNCH_TEMPLATE=llamacpp_template(),
        )
        self.stoppers.append(self._stop_proxy)
        self.ollama_url = ollama_url
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def _stop_ollama(self) -> None:
        self.ollama.send_signal(signal.SIGTERM)
        self.ollama.communicate(timeout=30)

    def _stop_proxy(self) -> None:
        self.proxy.send_signal(signal.SIGTERM)
        self.proxy.communicate(timeout=60)

    def close(self) -> None:
        self.http.close()
        for stop in reversed(self.stoppers):
            stop()

    # --- what the box shows ------------------------------------------------------------------

    def models(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.http.get("/admin/state").json()["models"]}

    def gpu(self) -> dict[str, Any]:
        status: dict[str, Any] = self.http.get("/v1/gpu/status").json()
        return status

    def vllm_run(self, name: str) -> dict[str, Any]:
        runs = httpx.get(self.executor.url + "/admin/state").json()["models"]
        found: dict[str, Any] = next(r for r in runs if r["logical_name"] == name)
        return found

    def ollama_loaded(self) -> set[str]:
        return {m["name"] for m in httpx.get(self.ollama_url + "/api/ps").json()["models"]}


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Any]:
    made: list[Box] = []

    def make(totals_mb: list[int], entries: list[dict[str, Any]]) -> Box:
        made.append(Box(tmp_path, totals_mb, entries))
        return made[-1]

    yield make
    for one in made:
        one.close()


def cuda_devices(pid: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES a process was really started with."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return item.split(b"=", 1)[1].decode()
    return None


def argv_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def used(sim: SimGpu, device: int) -> int:
    return sim.read()[device].used_mb


def test_vllm_sized_by_the_ledger_starts_beside_ollama_and_llamacpp(box: Any) -> None:
    """48 GB card: a 14 GB vLLM entry starts beside a resident Ollama vision model (8 GB) and a
    llama.cpp model (4 GB) without evicting either; vLLM was told 0.3 of the card (with the old
    fixed 0.9 it would have refused: 36 GB free < 43.2 GB)."""
    gpu = box([48000], [vllm("seven-b", 14000), VISION, llamacpp("small", 4000)])
    assert gpu.http.post("/v1/chat/completions", json={**CHAT, "model": "vision"}).is_success
    assert gpu.http.post("/v1/chat/completions", json={**CHAT, "model": "small"}).is_success
    assert used(gpu.sim, 0) == 12000
    answer = gpu.http.post("/v1/chat/completions", json={**CHAT, "model": "seven-b"})
    assert answer.status_code == 200, answer.text
    run = gpu.vllm_run("seven-b")
    argv = argv_of(run["pid"])
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.3"  # 14000 / 48000, up
    assert held_by(gpu.sim, run["pid"]) == {0: 14400}  # what vLLM holds: 0.3 of the card
    states = gpu.models()
    assert states["small"]["state"] == "ready" and VISION_TAG in gpu.ollama_loaded()
    assert states["seven-b"]["devices"] == [0] and states["small"]["devices"] == [0]
    status = gpu.gpu()
    assert status["budget"] == "measured" and status["probe"] == "sim"
    (device,) = status["devices"]
    assert device["index"] == 0 and device["name"] == "simulated GPU 0"
    assert device["total_mb"] == 48000 and device["used_mb"] == 26400
    assert device["free_mb"] == 21600 and device["lease"] is None
    assert {m["name"] for m in device["models"]} == {"seven-b", "vision", "small"}
    assert device["foreign"] == [] and device["foreign_mb"] == 0
    assert device["ours_mb"] == 26400  # learned footprints: 14400 + 8000 + 4000
    assert status["gpu"] == {
        "name": "simulated GPU 0",
        "total_mb": 48000,
        "used_mb": 26400,
        "free_mb": 21600,
    }
    metrics = gpu.http.get("/metrics").text
    assert 'chat_proxy_gpu_device_mb{device="0",kind="total"} 48000.0' in metrics
    assert 'chat_proxy_gpu_device_mb{device="0",kind="ours"} 26400.0' in metrics


def test_two_cards_place_vllm_apart_and_a_third_evicts_the_idle_one_never_the_busy(
    box: Any,
) -> None:
    entries = [vllm("a", 14000, served_model_id="hang-stream"), vllm("b", 14000), vllm("c", 14000)]
    gpu = box([24000, 24000], entries)
    assert gpu.http.post("/admin/activate", json={"model": "a"}).is_success
    assert gpu.http.post("/admin/activate", json={"model": "b"}).is_success
    a, b = gpu.vllm_run("a"), gpu.vllm_run("b")
    assert cuda_devices(a["pid"]) == "0" and cuda_devices(b["pid"]) == "1"
    assert held_by(gpu.sim, a["pid"]) == {0: 14160} and held_by(gpu.sim, b["pid"]) == {1: 14160}
    # "a" is the least recently used, but busy: a stream stays open on it.
    opened = threading.Event()

    def stream() -> None:
        with (
            httpx.Client(base_url=gpu.url, timeout=120) as client,
            client.stream(
                "POST", "/v1/chat/completions", json={**CHAT, "model": "a", "stream": True}
            ) as response,
        ):
            for _line in response.iter_lines():
                opened.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert opened.wait(30)
    assert gpu.http.post("/admin/activate", json={"model": "c"}).is_success
    states = gpu.models()
    assert states["a"]["state"] == "ready" and states["b"]["state"] == "stopped"
    assert states["c"]["state"] == "ready" and states["c"]["devices"] == [1]
    assert cuda_devices(gpu.vllm_run("c")["pid"]) == "1"
    assert reader.is_alive()  # the busy model's stream was never cut

    def evictions() -> list[tuple[str, str]]:
        return [(r["model"], r["reason"]) for r in records(gpu) if r.get("event") == "evict"]

    assert eventually(lambda: evictions() == [("b", "start c")], 10), evictions()


def test_two_starts_at_once_never_count_the_same_memory(box: Any) -> None:
    """ "slow" takes 2 s to load before it holds anything; "quick", asked for meanwhile, must
    not be placed in the memory "slow" is about to take (the fake vLLM on the same card would
    then refuse to start, as vLLM does)."""
    slow = vllm(
        "slow", 14000, backend_config={"model_path": "/m", "extra_args": ["--startup-delay", "2"]}
    )
    gpu = box([24000, 24000], [slow, vllm("quick", 14000)])
    answers: dict[str, int] = {}

    def activate(name: str) -> None:
        with httpx.Client(base_url=gpu.url, timeout=120) as client:
            answers[name] = client.post("/admin/activate", json={"model": name}).status_code

    first = threading.Thread(target=activate, args=("slow",))
    first.start()
    assert eventually(lambda: gpu.models()["slow"]["state"] == "starting", 30)
    activate("quick")
    first.join(120)
    assert answers == {"slow": 200, "quick": 200}
    devices = {cuda_devices(gpu.vllm_run(n)["pid"]) for n in ("slow", "quick")}
    assert devices == {"0", "1"}


def test_a_lease_on_device_1_evicts_only_device_1_and_release_restores_it(box: Any) -> None:
    entries = [vllm("a", 14000), VISION, llamacpp("small", 4000, gpus=[1])]
    gpu = box([24000, 24000], entries)
    assert gpu.http.post("/admin/activate", json={"model": "a"}).is_success
    # Ollama places its model itself (on the card with more free memory: device 1); the ledger
    # learns where from the Ollama process's memory per device.
    assert gpu.http.post("/v1/chat/completions", json={**CHAT, "model": "vision"}).is_success
    assert gpu.http.post("/v1/chat/completions", json={**CHAT, "model": "small"}).is_success
    assert held_by(gpu.sim, gpu.ollama.pid) == {1: 8000}
    assert eventually(lambda: gpu.models()["vision"]["devices"] == [1], 10)
    (small_pid,) = [pid for pid in gpu.sim.read()[1].processes if pid != gpu.ollama.pid]
    assert isinstance(small_pid, int) and cuda_devices(small_pid) == "1"  # its pin
    granted = gpu.http.post("/v1/gpu/lease", json={"owner": "jv", "device": 1, "reason": "t"})
    assert granted.status_code == 200, granted.text
    lease = granted.json()["lease"]
    assert lease["device"] == 1 and sorted(lease["evicted"]) == ["small", "vision"]
    assert used(gpu.sim, 1) == 0 and VISION_TAG not in gpu.ollama_loaded()
    status = gpu.gpu()
    assert status["devices"][1]["lease"]["owner"] == "jv" and status["devices"][0]["lease"] is None
    assert [le["device"] for le in status["leases"]] == [1]
    assert gpu.models()["a"]["state"] == "ready"  # device 0 was not touched
    # Device 0 still serves; a model pinned to device 1 waits for the lease (423).
    assert gpu.http.post("/v1/chat/completions", json={**CHAT, "model": "a"}).is_success
    refused = gpu.http.post("/v1/chat/completions", json={**CHAT, "model": "small"})
    assert refused.status_code == 423
    released = gpu.http.post(
        "/v1/gpu/release", json={"token": granted.json()["token"], "restart_model": True}
    )
    assert sorted(released.json()["restoring"]) == ["small", "vision"]
    assert eventually(lambda: VISION_TAG in gpu.ollama_loaded(), 30)
    assert eventually(lambda: gpu.models()["small"]["state"] == "ready", 30)
    assert used(gpu.sim, 1) == 12000


def test_idle_ttl_gives_the_memory_back_and_a_pinned_model_keeps_it(box: Any) -> None:
    entries = [llamacpp("idle", 4000, ttl_s=2), llamacpp("kept", 6000, pinned=True, ttl_s=2)]
    gpu = box([24000], entries)
    for name in ("kept", "idle"):
        assert gpu.http.post("/v1/chat/completions", json={**CHAT, "model": name}).is_success
    assert used(gpu.sim, 0) == 10000
    assert eventually(lambda: gpu.models()["idle"]["state"] == "stopped", 30)
    assert eventually(lambda: used(gpu.sim, 0) == 6000, 30)  # memory verified back
    assert gpu.models()["kept"]["state"] == "ready" and gpu.models()["idle"]["devices"] == []


def records(gpu: Box) -> list[dict[str, Any]]:
    log = gpu.root / "proxy" / "logs" / "chat_proxy.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(line) for line in lines if line.strip()]
