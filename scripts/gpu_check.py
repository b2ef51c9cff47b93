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


def hold_gpu_memory(mb: int, port: int) -> None:  # the template passes --port after --hold
    """The child: allocate ``mb`` MiB on GPU 0, then answer /health until killed."""
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
    check(cuda.cuMemsetD8_v2(pointer, 1, ctypes.c_size_t(mb * 1024 * 1024)), "cuMemsetD8")
    print(f"holding {mb} MiB on the GPU", flush=True)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

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
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=4096, help="MiB the child holds")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold is not None:
        hold_gpu_memory(args.hold, args.port)
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
