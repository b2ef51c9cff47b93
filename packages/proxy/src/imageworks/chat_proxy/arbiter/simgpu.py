"""A simulated multi-device GPU: one JSON file that processes allocate memory from.

Tests run the proxy, the executor and fake engines as separate processes; they share this
file (``CHAT_PROXY_GPU_SIM``), each change made under an exclusive ``flock`` on a lock file
beside it. Memory is held per process id, as NVML reports it. A process that exits keeps its
memory for ``release_delay_s`` more (a real driver takes a moment to give it back), so the
arbiter's wait for freed memory is exercised too.

File shape::

    {"devices": [{"name": "simulated GPU 0", "total_mb": 24576}, ...],
     "release_delay_s": 0.5,
     "allocations": [{"pid": 123, "device": 0, "mb": 8192, "label": "vllm", "freed_at": null}]}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot
from imageworks.chat_proxy.process import pid_alive

SIM_VARIABLE = "CHAT_PROXY_GPU_SIM"


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
        with self.lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path.read_text())
        now = time.time()
        delay = float(data.get("release_delay_s") or 0.0)
        kept = []
        for item in data["allocations"]:
            if item["freed_at"] is None and not pid_alive(item["pid"]):
                item["freed_at"] = now  # the process is gone: its memory starts coming back
            if item["freed_at"] is None or now < item["freed_at"] + delay:
                kept.append(item)
        data["allocations"] = kept
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
            snapshots.append(
                GpuSnapshot(
                    device["total_mb"],
                    min(device["total_mb"], self._used(data, index)),
                    processes,
                    device["name"],
                    index,
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

    def set_release_delay(self, seconds: float) -> None:
        with self._locked():
            data = self._load()
            data["release_delay_s"] = seconds
            self._write(data)

    def totals(self) -> list[int]:
        return [int(d["total_mb"]) for d in json.loads(self.path.read_text())["devices"]]
