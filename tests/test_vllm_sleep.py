"""vLLM's sleep mode through the real executor, on the simulated GPU with the fake vLLM (real
processes): only entries that ask for it run with --enable-sleep-mode and dev mode, bound to
loopback; the executor alone calls the engine's sleep routes; sleep gives the VRAM back and
holds host RAM, a wake takes the VRAM back and is timed."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from imageworks.chat_proxy.arbiter.simgpu import SimGpu
from imageworks.model_loader.schema import ModelEntry
from imageworks.vllm_executor.launcher import (
    DEFAULT_TEMPLATE,
    SLEEP_FLAG,
    build_command,
    sleep_mode_allowed,
)
from testkit.entries import eventually
from testkit.gpu import held_by, simulated_gpu
from testkit.processes import (
    FAKE_VLLM_TEMPLATE,
    Executor,
    start_engine,
    start_proxy,
    write_registry,
)

pytestmark = pytest.mark.subprocess
TOKEN = "sleep-test-token"


def entry(name: str, *extra: str, **config: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "vllm",
        "backend_config": {"model_path": "/m", "extra_args": list(extra), **config},
        "chat_template": {"source": "external", "path": "t.jinja"},
    }


def argv_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def environ_of(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)


def test_the_builder_adds_the_flag_only_where_sleep_is_allowed() -> None:
    sleepy = ModelEntry.model_validate(entry("s", sleep_mode=True))
    plain = ModelEntry.model_validate(entry("p"))
    assert sleep_mode_allowed(sleepy, DEFAULT_TEMPLATE, "127.0.0.1") == (True, None)
    assert sleep_mode_allowed(plain, DEFAULT_TEMPLATE, "127.0.0.1") == (False, None)
    allowed, why = sleep_mode_allowed(sleepy, DEFAULT_TEMPLATE, "0.0.0.0")
    assert not allowed and why is not None and "loopback" in why
    custom = tuple(t for t in DEFAULT_TEMPLATE if t != "{sleep_args}")
    allowed, why = sleep_mode_allowed(sleepy, custom, "127.0.0.1")
    assert not allowed and why is not None and "{sleep_args}" in why
    on = build_command(
        sleepy,
        DEFAULT_TEMPLATE,
        host="127.0.0.1",
        port=1,
        gpu_memory_utilization=0.5,
        sleep_mode=True,
    )
    off = build_command(
        sleepy, DEFAULT_TEMPLATE, host="127.0.0.1", port=1, gpu_memory_utilization=0.5
    )
    assert on.count(SLEEP_FLAG) == 1 and SLEEP_FLAG not in off


def test_the_fake_vllm_has_sleep_routes_only_in_dev_mode_and_with_the_flag(
    tmp_path: Path,
) -> None:
    for env, flags, status in (
        ({}, ["--enable-sleep-mode"], 404),  # no dev mode: vLLM has no such route
        ({"VLLM_SERVER_DEV_MODE": "1"}, [], 400),  # dev mode without sleep mode: refused
        ({"VLLM_SERVER_DEV_MODE": "1"}, ["--enable-sleep-mode"], 200),
    ):
        process, url = start_engine(tmp_path, *flags, **env)
        try:
            assert httpx.post(url + "/sleep?level=1").status_code == status
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def test_sleep_frees_the_vram_holds_host_ram_and_a_timed_wake_takes_it_back(
    tmp_path: Path,
) -> None:
    sim, env = simulated_gpu(tmp_path, [24000], release_delay_s=0.2)
    write_registry(
        tmp_path,
        [
            entry("sleepy", "--sim-weights-mb", "3000", "--sim-wake-s", "0.3", sleep_mode=True),
            entry("plain"),
        ],
    )
    running = Executor(
        tmp_path, template=FAKE_VLLM_TEMPLATE, env={**env, "CHAT_PROXY_ADMIN_TOKEN": TOKEN}
    )
    admin = httpx.Client(base_url=running.url, headers={"x-admin-token": TOKEN}, timeout=60)
    try:
        assert httpx.post(running.url + "/admin/sleep", json={"model": "sleepy"}).status_code == 401
        run = admin.post(
            "/admin/activate", json={"model": "sleepy", "gpu_memory_utilization": 0.5}
        ).json()
        pid = run["pid"]
        assert run["sleep_mode"] is True and run["sleeping"] is False
        argv = argv_of(pid)
        assert SLEEP_FLAG in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
        assert environ_of(pid).get("VLLM_SERVER_DEV_MODE") == "1"
        assert held_by(sim, pid) == {0: 12000}
        root = run["base_url"].removesuffix("/v1")

        assert admin.post("/admin/sleep", json={"model": "sleepy", "level": 3}).status_code == 400
        slept = admin.post("/admin/sleep", json={"model": "sleepy"}).json()
        assert slept["sleeping"] is True and slept["host_mb"] == 3000 and slept["sleep_ms"]
        assert eventually(lambda: held_by(sim, pid) == {}, 10)  # the VRAM comes back
        assert sim.host_held() == {pid: 3000}
        assert httpx.get(root + "/is_sleeping").json() == {"is_sleeping": True}
        chat = {"model": "sleepy", "messages": [{"role": "user", "content": "Hi"}]}
        assert httpx.post(root + "/v1/chat/completions", json=chat).status_code == 503

        woke = admin.post("/admin/wake", json={"model": "sleepy"}).json()
        assert woke["sleeping"] is False and woke["wake_ms"] >= 300 and woke["host_mb"] is None
        assert held_by(sim, pid) == {0: 12000} and sim.host_held() == {}
        assert httpx.post(root + "/v1/chat/completions", json=chat).status_code == 200

        admin.post("/admin/sleep", json={"model": "sleepy"})
        again = admin.post("/admin/activate", json={"model": "sleepy"}).json()
        assert again["pid"] == pid and again["sleeping"] is False  # activation wakes it

        plain = admin.post(
            "/admin/activate",
            json={"model": "plain", "alongside": True, "gpu_memory_utilization": 0.2},
        ).json()
        assert SLEEP_FLAG not in argv_of(plain["pid"])
        assert "VLLM_SERVER_DEV_MODE" not in environ_of(plain["pid"])
        refused = admin.post("/admin/sleep", json={"model": "plain"})
        assert refused.status_code == 409 and "sleep mode" in refused.json()["error"]["message"]
        plain_root = plain["base_url"].removesuffix("/v1")
        assert httpx.post(plain_root + "/sleep?level=1").status_code == 404
    finally:
        admin.close()
        assert running.stop() == 0


def test_a_restarted_executor_adopts_a_sleeping_child_as_sleeping(tmp_path: Path) -> None:
    sim, env = simulated_gpu(tmp_path, [24000], release_delay_s=0.0)
    write_registry(tmp_path, [entry("sleepy", "--sim-weights-mb", "1000", sleep_mode=True)])
    running = Executor(tmp_path, template=FAKE_VLLM_TEMPLATE, env=env)
    try:
        pid = httpx.post(
            running.url + "/admin/activate",
            json={"model": "sleepy", "gpu_memory_utilization": 0.25},
            timeout=60,
        ).json()["pid"]
        httpx.post(running.url + "/admin/sleep", json={"model": "sleepy"}, timeout=60)
        running.kill()
        running.start()
        (run,) = httpx.get(running.url + "/admin/state").json()["models"]
        assert run["pid"] == pid and run["sleeping"] is True and run["host_mb"] == 1000
        assert isinstance(SimGpu(sim.path).host_held().get(pid), int)
    finally:
        assert running.stop() == 0


# --- through the proxy: the arbiter sleeps instead of stopping, and a request wakes -------------


def vllm_model(name: str, *flags: str, sleep: bool = True) -> dict[str, Any]:
    return {
        **entry(name, *flags, sleep_mode=sleep),
        "vram_estimate_mb": 14000,  # two never fit on the 24000 MB card together
    }


class Proxied:
    def __init__(self, root: Path, entries: list[dict[str, Any]], **env: str) -> None:
        self.sim, sim_env = simulated_gpu(root, [24000], release_delay_s=0.2)
        write_registry(root / "executor", entries)
        self.executor = Executor(root / "executor", template=FAKE_VLLM_TEMPLATE, env=sim_env)
        self.proxy, self.url = start_proxy(
            root / "proxy",
            entries,
            **sim_env,
            CHAT_PROXY_VLLM_REMOTE_URL=self.executor.url,
            CHAT_PROXY_KEEPALIVE_S="0.1",
            **env,
        )
        self.log = root / "proxy" / "logs" / "chat_proxy.jsonl"
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def close(self) -> None:
        self.http.close()
        self.proxy.send_signal(signal.SIGTERM)
        self.proxy.communicate(timeout=60)
        self.executor.stop()

    def chat(self, model: str, stream: bool = False) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        answer = self.http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        return answer

    def model(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(
            m for m in self.http.get("/admin/state").json()["models"] if m["name"] == name
        )
        return found

    def run(self, name: str) -> dict[str, Any]:
        runs = httpx.get(self.executor.url + "/admin/state").json()["models"]
        found: dict[str, Any] = next(r for r in runs if r["logical_name"] == name)
        return found

    def events(self, kind: str) -> list[dict[str, Any]]:
        import json

        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [r for r in map(json.loads, lines) if r.get("event") == kind]


@pytest.fixture
def proxied(tmp_path: Path) -> Any:
    made: list[Proxied] = []

    def make(entries: list[dict[str, Any]], **env: str) -> Proxied:
        made.append(Proxied(tmp_path, entries, **env))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_a_swap_sleeps_the_resident_model_and_the_next_request_wakes_it(proxied: Any) -> None:
    box = proxied(
        [
            vllm_model("a", "--sim-weights-mb", "5000", "--sim-wake-s", "0.3"),
            vllm_model("b", "--sim-weights-mb", "5000"),
            vllm_model("c", sleep=False),
        ],
        CHAT_PROXY_SLEEP_RAM_MB="16000",
    )
    box.chat("a")
    a_pid = box.run("a")["pid"]
    assert held_by(box.sim, a_pid) == {0: 14160}  # 0.59 of the card, as the ledger sized it
    box.chat("b")  # a does not fit beside b: it sleeps, it is not stopped
    a = box.model("a")
    assert a["state"] == "sleeping" and a["host_mb"] == 5000 and a["sleep_ms"] is not None
    assert box.run("a")["pid"] == a_pid and box.run("a")["sleeping"] is True
    assert eventually(lambda: held_by(box.sim, a_pid) == {}, 10)  # its VRAM is back
    assert box.sim.host_held() == {a_pid: 5000}  # and its weights are in host RAM
    ram = box.http.get("/v1/gpu/status").json()["host_ram"]
    assert ram == {
        "budget_mb": 16000,
        "used_mb": 5000,
        "free_mb": 11000,
        "sleeping": [{"name": "a", "host_mb": 5000}],
    }
    listed = {m["id"]: m for m in box.http.get("/v1/models").json()["data"]}
    assert listed["a"]["status"]["value"] == "sleeping"  # resident, in llama.cpp's shape

    # c does not fit beside b: b cannot sleep too. Never asleep before, it is guessed at its
    # whole need (14160 MB: no weights estimate for its folder), more than the 11000 MB the
    # budget has left while a sleeps, so b is stopped.
    box.chat("c")
    assert box.model("b")["state"] == "stopped" and box.model("a")["state"] == "sleeping"
    # The next request for a wakes it: the same process, its VRAM back, the wake timed (c,
    # without sleep mode, is stopped to make room).
    box.chat("a", stream=True)
    a = box.model("a")
    assert a["state"] == "ready" and a["wake_ms"] >= 300 and a["host_mb"] is None
    assert a["vram"]["wake_s"] >= 0.3
    assert box.run("a")["pid"] == a_pid and held_by(box.sim, a_pid) == {0: 14160}
    assert box.sim.host_held() == {}
    assert box.model("c")["state"] == "stopped"
    tiers = {(e["model"], e.get("tier")): e.get("why", "") for e in box.events("evict")}
    assert "wake not measured" in tiers[("a", "sleep")]
    assert "host RAM budget full: asleep it holds 14160 MB, 11000 MB left" in tiers[("b", "stop")]
    assert tiers[("c", "stop")] == "no sleep mode"
    assert [e["model"] for e in box.events("wake")] == ["a"]
    assert [e["model"] for e in box.events("sleep")] == ["a"]


def test_stop_is_chosen_when_the_wake_is_not_cheaper_or_sleep_is_off(proxied: Any) -> None:
    box = proxied(
        [
            vllm_model("slow-waker", "--sim-wake-s", "4", "--sim-weights-mb", "100"),
            vllm_model("other", sleep=False),
        ],
        CHAT_PROXY_SLEEP_RAM_MB="20000",
    )
    box.chat("slow-waker")
    box.chat("other")  # wake unmeasured: it sleeps
    assert box.model("slow-waker")["state"] == "sleeping"
    answer = box.chat("slow-waker", stream=True)  # waking takes 4 s, longer than its cold start
    assert "waking from sleep" in answer.text  # the loading comments say it wakes
    assert box.model("other")["state"] == "stopped"  # no sleep mode: stopped
    assert box.model("slow-waker")["wake_ms"] >= 4000
    box.chat("other")  # now the measured wake is no cheaper than its cold start: stopped
    assert box.model("slow-waker")["state"] == "stopped"
    why = [e["why"] for e in box.events("evict") if e["model"] == "slow-waker"]
    assert "no cheaper than a cold start" in why[-1]
