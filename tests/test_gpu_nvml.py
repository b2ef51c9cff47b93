"""The GPU path, on a machine with an NVIDIA GPU: NVML probe, a real CUDA allocation in a
child process, eviction by the arbiter and the memory coming back. Skips (saying why) where
there is no GPU, which includes CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imageworks.chat_proxy.arbiter.gpu import nvml_available

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.subprocess,  # scripts/gpu_check.py, and the engine it starts
    pytest.mark.skipif(
        not nvml_available(),
        reason="no NVIDIA GPU with NVML on this machine (the GPU check needs one)",
    ),
]


def test_gpu_check_script(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "gpu_check.py"),
            "--mb",
            "2048",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["steps"]["lease_evicted"] == ["holder"]
    assert report["steps"]["child_on_other_devices"] == [report["steps"]["lease_device"]]
    assert len(report["steps"]["ledger"]) == len(report["devices"])  # every device
    assert report["steps"]["nvml_sees_child"]["used_mb"] >= 2048 * 0.9
    assert report["steps"]["crash_state"] == "crashed"  # kill -9 seen by the exit watch
    assert report["steps"]["crash_memory_back_s"] is not None  # and its memory came back
    sleep = report["steps"]["sleep"]  # sleep frees the device memory, a timed wake takes it back
    assert sleep["ok"] is True and sleep["wake_ms"] is not None, sleep
    assert report["ok"] is True
