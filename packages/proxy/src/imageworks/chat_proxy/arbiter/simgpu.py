"""A simulated multi-device GPU: one JSON file that processes allocate memory from.

Tests run the proxy, the executor and fake engines as separate processes; they share this
file (``CHAT_PROXY_GPU_SIM``), each change made under an exclusive ``flock`` on a lock file
beside it. Memory is held per process id, as NVML reports it. A process that exits keeps its
memory for ``release_delay_s`` more (a real driver takes a moment to give it back), so the
arbiter's wait for freed memory is exercised too.

File shape::

    {"devices": [{"name": "simulated GPU 0", "total_mb": 24576}, ...],
     "release_delay_s": 0.5,
     "allocations": [{"pid": 123, "device": 0, "mb": 8192, "label": "vllm", "freed_at": null}],
     "host": [{"pid": 123, "mb": 6144, "label": "vllm-sleep"}]}

``host`` (optional) is host RAM a process holds for the simulation: a vLLM asleep keeps its
weights there (sleep level 1). It goes when the process does (the OS reclaims it at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.chat_proxy.supervision.procfs import pid_alive

SIM_VARIABLE = "CHAT_PROXY_GPU_SIM"


class SimGpuError(RuntimeError):
    """The simulated GPU's file is missing or not in the shape above; the message says where."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape_error(data: Any) -> str | None:
    """What is wrong with the file's content (None: nothing). A test facility, but one a test
    (or a hand) can break: a clear message beats a KeyError from the middle of a request."""
    if not isinstance(data, dict):
        return "it is not a JSON object"
    devices, allocations = data.get("devices"), data.get("allocations")
    if not isinstance(devices, list) or not all(
        isinstance(d, dict)
        and _is_int(d.get("total_mb"))
        and d["total_mb"] > 0
        and isinstance(d.get("name", ""), str)
        for d in devices
    ):
        return '\'devices\' must be a list of {"name", "total_mb" > 0}'
    if not isinstance(allocations, list) or not all(
        isinstance(a, dict)
        and _is_int(a.get("pid"))
        and a["pid"] > 0
        and _is_int(a.get("device"))
        and 0 <= a["device"] < len(devices)
        and _is_int(a.get("mb"))
        and a["mb"] >= 0
        and isinstance(a.get("label"), str)
        and (a.get("freed_at") is None or isinstance(a["freed_at"], (int, float)))
        for a in allocations
    ):
        return (
            "'allocations' must be a list of {\"pid\" > 0, \"device\" (an index of 'devices'), "
            '"mb" >= 0, "label", "freed_at": null or a time}'
        )
    host = data.get("host", [])
    if not isinstance(host, list) or not all(
        isinstance(h, dict)
        and _is_int(h.get("pid"))
        and h["pid"] > 0
        and _is_int(h.get("mb"))
        and h["mb"] >= 0
        and isinstance(h.get("label"), str)
        for h in host
    ):
        return '\'host\' must be a list of {"pid" > 0, "mb" >= 0, "label"}'
    delay = data.get("release_delay_s", 0)
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay < 3600:
        return "'release_delay_s' must be a number of seconds"
    return None


def telemetry(device: dict[str, Any], used_mb: int) -> tuple[float, float, float]:
    """The simulated card's utilisation, temperature and power: what the file sets for the
    device (``utilization_pct``, ``temperature_c``, ``power_w``, written by a test or a fake
    engine), else figures that follow its memory in use (a loaded card runs warmer)."""
    share = used_mb / device["total_mb"] if device["total_mb"] else 0.0
    utilization = float(device.get("utilization_pct", round(100 * share, 1)))
    temperature = float(device.get("temperature_c", round(30 + 0.4 * utilization, 1)))
    power = float(device.get("power_w", round(60 + 3 * utilization, 1)))
    return utilization, temperature, power


class SimGpu:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    @classmethod
    def create(cls, path: Path, totals_mb: list[int], *, release_delay_s: float = 0.0) -> SimGpu:
        sim = cls(path)
        with sim._locked():
            sim._write(
                {
                    "devices": [
                        {"name": f"simulated GPU {i}", "total_mb": total}
                        for i, total in enumerate(totals_mb)
                    ],
                    "release_delay_s": release_delay_s,
                    "allocations": [],
                }
            )
        return sim

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            handle = self.lock_path.open("a")
        except OSError as exc:
            raise SimGpuError(f"the simulated GPU's lock file is unusable: {exc}") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read_file(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise SimGpuError(f"the simulated GPU file {self.path} is unreadable: {exc}") from None
        if (wrong := _shape_error(data)) is not None:
            raise SimGpuError(f"the simulated GPU file {self.path} is broken: {wrong}")
        return dict(data)

    def _load(self) -> dict[str, Any]:
        data = self._read_file()
        now = time.time()
        delay = float(data.get("release_delay_s") or 0.0)
        kept = []
        for item in data["allocations"]:
            if item["freed_at"] is None and not pid_alive(item["pid"]):
                item["freed_at"] = now  # the process is gone: its memory starts coming back
            if item["freed_at"] is None or now < item["freed_at"] + delay:
                kept.append(item)
        data["allocations"] = kept
        data["host"] = [h for h in data.get("host", []) if pid_alive(h["pid"])]
        return data

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)

    @staticmethod
    def _used(data: dict[str, Any], device: int) -> int:
        return sum(a["mb"] for a in data["allocations"] if a["device"] == device)

    def read(self) -> list[GpuSnapshot]:
        with self._locked():
            data = self._load()
            self._write(data)
        snapshots = []
        for index, device in enumerate(data["devices"]):
            processes: dict[int | str, int] = {}
            for item in data["allocations"]:
                if item["device"] == index:
                    processes[item["pid"]] = processes.get(item["pid"], 0) + item["mb"]
            used = min(device["total_mb"], self._used(data, index))
            snapshots.append(
                GpuSnapshot(
                    device["total_mb"],
                    used,
                    processes,
                    device["name"],
                    index,
                    *telemetry(device, used),
                )
            )
        return snapshots

    def allocate(
        self, device: int, mb: int, *, pid: int, label: str, need_free_mb: int | None = None
    ) -> bool:
        """Hold ``mb`` on ``device`` for ``pid``; refused (False) when less than ``need_free_mb``
        (default: ``mb``) is free, as a CUDA allocation would fail."""
        with self._locked():
            data = self._load()
            if not 0 <= device < len(data["devices"]):
                raise SimGpuError(f"the simulated GPU has no device {device}")
            total = data["devices"][device]["total_mb"]
            free = total - self._used(data, device)
            if free < (mb if need_free_mb is None else need_free_mb):
                self._write(data)
                return False
            data["allocations"].append(
                {"pid": pid, "device": device, "mb": mb, "label": label, "freed_at": None}
            )
            self._write(data)
            return True

    def free(self, pid: int, label: str | None = None) -> None:
        """Give back what ``pid`` holds (only ``label``'s part, if named), after the delay."""
        with self._locked():
            data = self._load()
            for item in data["allocations"]:
                if item["pid"] == pid and label in (None, item["label"]) and not item["freed_at"]:
                    item["freed_at"] = time.time()
            self._write(data)

    def hold_host(self, mb: int, *, pid: int, label: str) -> None:
        """``pid`` holds ``mb`` of host RAM (replacing what it held under ``label``)."""
        with self._locked():
            data = self._load()
            data["host"] = [h for h in data["host"] if (h["pid"], h["label"]) != (pid, label)]
            data["host"].append({"pid": pid, "mb": mb, "label": label})
            self._write(data)

    def free_host(self, pid: int, label: str | None = None) -> None:
        """Give back the host RAM ``pid`` holds (only ``label``'s part, if named): at once."""
        with self._locked():
            data = self._load()
            data["host"] = [
                h for h in data["host"] if h["pid"] != pid or label not in (None, h["label"])
            ]
            self._write(data)

    def host_held(self) -> dict[int, int]:
        """Host RAM per process, MiB."""
        with self._locked():
            data = self._load()
        held: dict[int, int] = {}
        for item in data["host"]:
            held[item["pid"]] = held.get(item["pid"], 0) + item["mb"]
        return held

    def set_release_delay(self, seconds: float) -> None:
        with self._locked():
            data = self._load()
            data["release_delay_s"] = seconds
            self._write(data)

    def totals(self) -> list[int]:
        return [int(d["total_mb"]) for d in self._read_file()["devices"]]


class SimProbe:
    """The simulated GPU (this module), read like NVML: per device, per process."""

    kind = "sim"
    measures = True

    def __init__(self, path: Path) -> None:
        self.sim = SimGpu(path)
        self.sim.totals()  # a missing or broken file fails at start-up, not on first use

    async def devices(self) -> list[GpuSnapshot]:
        try:
            return await asyncio.to_thread(self.sim.read)
        except SimGpuError as exc:  # broken since start-up: the request says so, not a 500
            raise BackendUnavailable(str(exc)) from None
