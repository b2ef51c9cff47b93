"""GPU check for the VRAM arbiter (issue 5): run on a machine with an NVIDIA GPU.

    uv run python scripts/gpu_check.py [--mb 4096] [--json out.json]

1. The NVML probe reports every device (name, total, used, free, processes).
2. A child process holds GPU memory: it allocates ``--mb`` MiB through the CUDA driver API
   (ctypes on libcuda, so no torch is needed) and serves /health.
3. The real Lifecycle starts that process as a model, pinned to the last device (on a
   one-GPU box: device 0) and so launched with CUDA_VISIBLE_DEVICES; NVML must see it on that
   device only, and the arbiter learns its footprint from NVML's per-process usage. The
   per-device ledger (``/v1/gpu/status`` ``devices``) is reported for every device.
4. A GPU lease on that device is granted: the arbiter evicts the process (SIGTERM to its
   group) and waits until NVML shows the memory back; the script reports how long that took.
5. The model is started again and its process killed with SIGKILL: the exit watch must mark
   it crashed within a second, and NVML must show its memory back.
6. Sleep and wake through the real vLLM executor: the holder, launched from the executor's
   template as a sleep-mode entry (``--enable-sleep-mode``, ``VLLM_SERVER_DEV_MODE=1``),
   answers vLLM's sleep routes as vLLM level 1 does: its memory copied to host RAM and freed
   on the device, copied back on a wake. NVML must show the memory gone while it sleeps and
   back after the wake; the executor's measured sleep and wake times are reported.
The holder runs through the real llama.cpp backend (launch template, engine record, exit
watch), so this is the path a llama.cpp model on the GPU takes.
Exits 0 when every step holds, 1 otherwise; 2 when there is no usable GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

SCRIPT = str(Path(__file__).resolve())


def hold_gpu_memory(mb: int, port: int, sleep_mode: bool = False) -> None:
    """The child: allocate ``mb`` MiB on GPU 0, then answer /health until killed (the template
    passes --port after --hold). With ``sleep_mode`` and vLLM's dev-mode variable it answers
    ``POST /sleep`` (memory to host RAM, freed on the device), ``POST /wake_up`` and
    ``GET /is_sleeping`` as vLLM's sleep level 1 does."""
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(result: int, what: str) -> None:
        if result != 0:
            raise SystemExit(f"{what} failed with CUDA error {result}")

    check(cuda.cuInit(0), "cuInit")
    device = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    context = ctypes.c_void_p()
    check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device), "cuCtxCreate")
    pointer = ctypes.c_uint64()
    check(
        cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(mb * 1024 * 1024)), "cuMemAlloc"
    )
    size = ctypes.c_size_t(mb * 1024 * 1024)
    check(cuda.cuMemsetD8_v2(pointer, 1, size), "cuMemsetD8")
    print(f"holding {mb} MiB on the GPU", flush=True)
    dev_routes = sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
    parked: list[Any] = []  # the host copy while asleep

    def sleep() -> None:
        if not parked:
            host = ctypes.create_string_buffer(size.value)
            check(cuda.cuMemcpyDtoH_v2(host, pointer, size), "cuMemcpyDtoH")
            check(cuda.cuMemFree_v2(pointer), "cuMemFree")
            parked.append(host)

    def wake() -> None:
        if parked:
            check(cuda.cuMemAlloc_v2(ctypes.byref(pointer), size), "cuMemAlloc")
            check(cuda.cuMemcpyHtoD_v2(pointer, parked.pop(), size), "cuMemcpyHtoD")

    class Health(BaseHTTPRequestHandler):
        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/is_sleeping" and dev_routes:
                self.answer(200, json.dumps({"is_sleeping": bool(parked)}).encode())
            else:
                self.answer(200, b'{"status": "ok"}')

        def do_POST(self) -> None:
            actions = {"/sleep?level=1": sleep, "/wake_up": wake}
            if not dev_routes or self.path not in actions:
                self.answer(404, b'{"detail": "Not Found"}')
                return
            actions[self.path]()
            self.answer(200, b"")

        def log_message(self, *args: Any) -> None:
            pass

    HTTPServer(("127.0.0.1", port), Health).serve_forever()


async def check(mb: int) -> dict[str, Any]:
    from imageworks.chat_proxy.arbiter.arbiter import VramArbiter
    from imageworks.chat_proxy.arbiter.gpu import NvmlProbe
    from imageworks.chat_proxy.config import ProxyConfig
    from imageworks.chat_proxy.engines.backends.llamacpp import LlamaCppBackend
    from imageworks.chat_proxy.engines.lifecycle import Lifecycle
    from imageworks.model_loader.schema import ModelEntry

    report: dict[str, Any] = {"ok": False, "steps": {}}
    steps = report["steps"]
    probe = NvmlProbe()
    devices = await probe.devices()
    target = devices[-1].index  # the last device: on a multi-GPU box, not the default one
    before = devices[target]

    async def on_target() -> Any:
        return (await probe.devices())[target]

    report["devices"] = [
        {
            "index": d.index,
            "name": d.name,
            "total_mb": d.total_mb,
            "used_mb": d.used_mb,
            "free_mb": d.free_mb,
            "processes": len(d.processes),
        }
        for d in devices
    ]
    report["card"] = report["devices"][target]
    staging = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    # The real llama.cpp backend (records, exit watch, stop), with the memory holder as its
    # server command: the same code path a llama.cpp model on the GPU takes.
    template = ["{python}", SCRIPT, "--hold", str(mb), "--port", "{port}"]
    config = ProxyConfig.load(
        environ={"CHAT_PROXY_LLAMACPP_LAUNCH_TEMPLATE": json.dumps(template)},
        staging_dir=staging,
    )
    backend = LlamaCppBackend(config)
    entry = ModelEntry.model_validate(
        {
            "name": "holder",
            "backend": "llamacpp",
            "vram_estimate_mb": mb,
            "backend_config": {"model_path": "none"},
            "gpus": [target],
        }
    )

    class OneEntryRegistry:
        names = ["holder"]

        def get(self, name: str) -> ModelEntry:
            return entry

        def __iter__(self) -> Any:
            return iter([entry])

    lifecycle = Lifecycle(
        {"llamacpp": backend},
        staging_dir=staging,
        registry=lambda: OneEntryRegistry(),  # type: ignore[arg-type,return-value]
        gpu_gate=lambda residency: VramArbiter(
            probe, residency, staging_dir=staging, headroom_mb=0, vram_timeout_s=30
        ),
    )
    arbiter = lifecycle.gpu_gate
    assert isinstance(arbiter, VramArbiter)
    started = time.monotonic()
    await lifecycle.activate(entry)
    everywhere = await probe.devices()
    held = everywhere[target]
    pid = backend.pid_of("holder")
    seen = held.processes.get(pid) if pid else None
    steps["child_started_s"] = round(time.monotonic() - started, 2)
    steps["nvml_sees_child"] = {"pid": pid, "used_mb": seen, "device": target}
    steps["child_on_other_devices"] = [d.index for d in everywhere if pid in d.processes]
    steps["learned_footprint_mb"] = arbiter.learned_mb.get("holder")
    steps["used_mb_while_held"] = held.used_mb
    await arbiter.snapshot()
    await arbiter.holdings()
    ledger = arbiter.status()["devices"]
    steps["ledger"] = [
        {k: d[k] for k in ("index", "total_mb", "used_mb", "ours_mb", "foreign_mb", "models")}
        for d in ledger
    ]
    evict_started = time.monotonic()
    lease = await arbiter.leases.grant(
        "gpu-check",
        "evict the holder",
        restart_model=False,
        ttl_s=60,
        need_mb=None,
        device=target,
    )
    after = await on_target()
    steps["lease_evicted"] = lease.evicted
    steps["lease_device"] = lease.device
    steps["memory_back_s"] = round(time.monotonic() - evict_started, 3)
    steps["used_mb_after"] = after.used_mb
    steps["child_gone"] = pid not in after.processes
    await arbiter.leases.release(lease.token)

    # A crash: kill -9 of the engine while ready. The exit watch marks it crashed; NVML must
    # show its memory back without any stop from us.
    await lifecycle.activate(entry)
    crashed_pid = backend.pid_of("holder")
    assert crashed_pid is not None
    killed = time.monotonic()
    os.kill(crashed_pid, signal.SIGKILL)
    for _ in range(2000):  # 10 s at most
        if lifecycle.state(entry) == "crashed":
            break
        await asyncio.sleep(0.005)
    steps["crash_state"] = lifecycle.state(entry)
    steps["crash_detected_s"] = round(time.monotonic() - killed, 3)
    freed = None
    while time.monotonic() - killed < 30:
        snap = await on_target()
        if crashed_pid not in snap.processes:
            freed = snap
            break
        await asyncio.sleep(0.02)
    steps["crash_memory_back_s"] = round(time.monotonic() - killed, 3) if freed else None
    steps["crash_used_mb_after"] = freed.used_mb if freed else None
    await lifecycle.shutdown()
    steps["sleep"] = await sleep_and_wake(mb, target, probe, staging)
    report["ok"] = bool(
        seen
        and seen >= mb * 0.9
        and steps["child_on_other_devices"] == [target]
        and any(m["name"] == "holder" for m in ledger[target]["models"])
        and lease.evicted == ["holder"]
        and lease.device == target
        and pid not in after.processes
        and after.used_mb <= before.used_mb + 256
        and steps["crash_state"] == "crashed"
        and steps["crash_detected_s"] < 1
        and freed is not None
        and freed.used_mb <= before.used_mb + 256
        and steps["sleep"]["ok"]
    )
    return report


async def sleep_and_wake(mb: int, target: int, probe: Any, staging: Path) -> dict[str, Any]:
    """Step 6: the holder as a sleep-mode vLLM entry of the real executor, put to sleep and
    woken through the executor's own calls; NVML says where the memory is at each step."""
    import shutil

    from imageworks.vllm_executor.app import Executor
    from imageworks.vllm_executor.config import ExecutorConfig

    configs = staging / "executor-configs"
    configs.mkdir(parents=True, exist_ok=True)
    repo = Path(SCRIPT).parents[1]
    shutil.copy(repo / "configs" / "deployment_profiles.json", configs)
    holder = {
        "name": "sleeper",
        "backend": "vllm",
        "backend_config": {"model_path": "none", "sleep_mode": True},
        "chat_template": {"source": "builtin", "name": "chatml"},
    }
    (configs / "model_registry.curated.json").write_text(json.dumps([holder]))
    template = ["{python}", SCRIPT, "--hold", str(mb), "--port", "{port}", "{sleep_args}"]
    executor = Executor(
        ExecutorConfig.load(
            {},
            launch_template=template,
            registry_dir=configs,
            staging_dir=staging / "executor",
            start_timeout_s=120,
        )
    )
    found: dict[str, Any] = {}

    async def used_by(pid: int) -> int:
        return int((await probe.devices())[target].processes.get(pid, 0))

    try:
        run = await executor.activate("sleeper", devices=[target])
        pid = run["pid"]
        found["awake_mb"] = await used_by(pid)
        slept = await executor.sleep("sleeper")
        found["sleep_ms"], found["host_mb"] = slept["sleep_ms"], slept["host_mb"]
        found["asleep_mb"] = await used_by(pid)
        woke = await executor.wake("sleeper")
        found["wake_ms"] = woke["wake_ms"]
        found["woken_mb"] = await used_by(pid)
    except Exception as exc:  # reported, not raised: the other steps' figures still count
        found["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await executor.deactivate()
    found["ok"] = bool(
        "error" not in found
        and found["awake_mb"] >= mb * 0.9
        and found["asleep_mb"] <= found["awake_mb"] - mb * 0.9
        and found["woken_mb"] >= mb * 0.9
        and (found["host_mb"] or 0) >= mb * 0.9
        and found["wake_ms"] is not None
    )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=4096, help="MiB the child holds")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--enable-sleep-mode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold is not None:
        hold_gpu_memory(args.hold, args.port, args.enable_sleep_mode)
        return 0
    try:
        from imageworks.chat_proxy.arbiter.gpu import NvmlProbe

        NvmlProbe()
    except Exception as exc:
        print(f"no usable NVIDIA GPU here: {exc}", file=sys.stderr)
        return 2
    report = asyncio.run(check(args.mb))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
