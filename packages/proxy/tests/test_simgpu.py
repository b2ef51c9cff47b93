"""The simulated GPU file: per-device, per-process memory shared by processes, memory coming
back a while after a process exits, and the probe reading it like NVML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imageworks.chat_proxy.arbiter.simgpu import SimGpu, SimGpuError, SimProbe
from testkit.entries import eventually
from testkit.processes import REPO, write_registry


@pytest.mark.subprocess
def test_allocations_are_per_device_and_refused_when_they_do_not_fit(tmp_path: Path) -> None:
    sim = SimGpu.create(tmp_path / "gpu.json", [24000, 16000])
    me = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert sim.allocate(0, 20000, pid=me.pid, label="a")
        assert not sim.allocate(0, 5000, pid=me.pid, label="b")  # 4000 free on device 0
        assert sim.allocate(1, 5000, pid=me.pid, label="b")
        # vLLM's rule: needs 12000 free to start although it will hold only 1000.
        assert not sim.allocate(1, 1000, pid=me.pid, label="c", need_free_mb=12000)
        zero, one = sim.read()
        assert (zero.index, zero.total_mb, zero.used_mb, zero.free_mb) == (0, 24000, 20000, 4000)
        assert zero.processes == {me.pid: 20000} and one.processes == {me.pid: 5000}
        assert zero.name == "simulated GPU 0" and one.name == "simulated GPU 1"
        sim.free(me.pid, "b")
        assert sim.read()[1].used_mb == 0 and sim.read()[0].used_mb == 20000
    finally:
        me.kill()
        me.communicate()


@pytest.mark.subprocess
def test_memory_comes_back_a_delay_after_the_process_exits(tmp_path: Path) -> None:
    sim = SimGpu.create(tmp_path / "gpu.json", [8000], release_delay_s=600)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert sim.allocate(0, 6000, pid=child.pid, label="engine")
    child.kill()
    child.communicate()
    assert sim.read()[0].used_mb == 6000  # gone, but the driver has not given it back yet
    sim.set_release_delay(0.2)
    assert eventually(lambda: sim.read()[0].used_mb == 0, 10)


async def test_the_sim_probe_reads_every_device(tmp_path: Path) -> None:
    SimGpu.create(tmp_path / "gpu.json", [24000, 24000, 48000])
    devices = await SimProbe(tmp_path / "gpu.json").devices()
    assert [(d.index, d.total_mb, d.free_mb) for d in devices] == [
        (0, 24000, 24000),
        (1, 24000, 24000),
        (2, 48000, 48000),
    ]


BROKEN = [
    "not json{",
    "[]",
    '{"devices": "x", "allocations": []}',
    '{"devices": [{"name": "g", "total_mb": 1000}]}',
    '{"devices": [{"name": "g", "total_mb": -5}], "allocations": []}',
    '{"devices": [{"name": "g", "total_mb": 1000}], "allocations": '
    '[{"pid": "x", "device": 0, "mb": 1, "label": "a", "freed_at": null}]}',
    '{"devices": [{"name": "g", "total_mb": 1000}], "allocations": '
    '[{"pid": 1, "device": 3, "mb": 1, "label": "a", "freed_at": null}]}',
]


@pytest.mark.parametrize("content", BROKEN)
def test_a_broken_file_is_a_clear_error_at_every_use(tmp_path: Path, content: str) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(content)
    sim = SimGpu(path)
    for use in (sim.totals, sim.read, lambda: sim.allocate(0, 1, pid=1, label="x")):
        with pytest.raises(
            SimGpuError, match=r"simulated GPU file .*gpu\.json is (unreadable|broken)"
        ):
            use()


@pytest.mark.subprocess
def test_the_proxy_refuses_to_start_on_a_broken_file_in_one_line(tmp_path: Path) -> None:
    write_registry(tmp_path, [])
    (tmp_path / "gpu.json").write_text('{"devices": "x"}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update(CHAT_PROXY_GPU_PROBE="sim", CHAT_PROXY_GPU_SIM=str(tmp_path / "gpu.json"))
    done = subprocess.run(
        [sys.executable, "-m", "imageworks.chat_proxy.cli", "--port", "0"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "CHAT_PROXY_GPU_SIM: the simulated GPU file" in done.stderr
    assert "'devices' must be a list" in done.stderr


def test_a_file_broken_while_the_proxy_runs_is_a_502_not_a_500(
    proxy_factory: Any, tmp_path: Path
) -> None:
    sim = SimGpu.create(tmp_path / "gpu.json", [8000])
    proxy = proxy_factory([], probe=SimProbe(sim.path))
    assert proxy.client.get("/v1/gpu/status").status_code == 200
    sim.path.write_text('{"devices": [{"name": "g", "total_mb": 8000}]}')
    response = proxy.client.get("/v1/gpu/status")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "backend_unavailable" and "'allocations' must be" in error["message"]


@pytest.mark.subprocess
def test_an_exact_fit_is_allocated_and_one_process_s_allocations_add_up(tmp_path: Path) -> None:
    sim = SimGpu.create(tmp_path / "gpu.json", [10000])
    me = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert sim.allocate(0, 4000, pid=me.pid, label="weights")
        assert sim.allocate(0, 6000, pid=me.pid, label="cache")  # exactly what is free
        (device,) = sim.read()
        assert device.processes == {me.pid: 10000} and device.free_mb == 0
        assert not sim.allocate(0, 1, pid=me.pid, label="more")
    finally:
        me.kill()
        me.communicate()


@pytest.mark.subprocess
def test_a_release_delay_set_later_holds_memory_back(tmp_path: Path) -> None:
    sim = SimGpu.create(tmp_path / "gpu.json", [8000])
    sim.set_release_delay(600)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert sim.allocate(0, 6000, pid=child.pid, label="engine")
    child.kill()
    child.communicate()
    assert sim.read()[0].used_mb == 6000


def test_the_simulated_card_reports_telemetry_that_follows_its_load(tmp_path) -> None:
    from imageworks.chat_proxy.arbiter.simgpu import SimGpu

    sim = SimGpu.create(tmp_path / "sim.json", [10000, 10000])
    assert sim.allocate(0, 5000, pid=os.getpid(), label="m")  # a live pid: it stays
    busy, idle = sim.read()
    assert (busy.utilization_pct, busy.temperature_c, busy.power_w) == (50.0, 50.0, 210.0)
    assert (idle.utilization_pct, idle.temperature_c, idle.power_w) == (0.0, 30.0, 60.0)
    data = json.loads(sim.path.read_text())
    data["devices"][1].update(utilization_pct=97, temperature_c=83, power_w=690)
    sim.path.write_text(json.dumps(data))  # what a test (or a fake engine) sets wins
    assert sim.read()[1].power_w == 690.0 and sim.read()[1].temperature_c == 83.0
