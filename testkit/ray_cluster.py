"""A local Ray head on the CPU, on loopback, for the ``ray`` backend's tests, the scaling docs'
example and the bench: ``ray start --head --block`` in its own session, every port chosen free,
stopped with everything it started (found by a marker in their environment, never by name).

``RayHead.start()`` raises ``RayUnavailable`` with the reason where Ray is not installed or does
not come up, so callers can skip with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from testkit.servers import free_port

MARKER = "IMAGEWORKS_RAY_HEAD"
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0


class RayUnavailable(RuntimeError):
    """Ray cannot run here; the message says why."""


class RayHead:
    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        self.dashboard_port = free_port()
        self.serve_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.serve_url = f"http://127.0.0.1:{self.serve_port}"
        # Unix socket paths under it must stay short (108 bytes), so not pytest's tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="iwray-", dir="/tmp"))
        self.process: subprocess.Popen[bytes] | None = None
        self._exited_early = False  # the last ``ray start`` exited (rather than timed out)

    def start(self, attempts: int = 3) -> RayHead:
        """A head on loopback; ``ray start`` exits with 1 now and then on a loaded machine (its
        own start-up deadlines), so an exit is tried again, and only the last one's log is
        the reason given."""
        for _ in range(attempts - 1):
            try:
                return self._start_once()
            except RayUnavailable:
                if not self._exited_early:
                    raise
                self.temp_dir = Path(tempfile.mkdtemp(prefix="iwray-", dir="/tmp"))
        return self._start_once()

    def _start_once(self) -> RayHead:
        ray = Path(sys.executable).with_name("ray")
        if not ray.exists():
            raise RayUnavailable("the ray CLI is not installed (the dev group's ray[serve])")
        ports = {
            "--port": free_port(),
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--metrics-export-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        low = free_port()
        argv = [
            str(ray),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=1",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            # Worker ports from a small range of our own rather than Ray's 10002-19999.
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 200}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        env = {
            **os.environ,
            MARKER: self.marker,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Serve applications under testkit/ are imported by Ray's workers.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self._exited_early = False
        log = (self.temp_dir / "ray-start.log").open("wb")
        self.process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                self._exited_early = True
                raise RayUnavailable(f"ray start exited with {self.process.returncode}: {tail}")
            if self.serve_api_answers():
                return self
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise RayUnavailable(f"the Ray dashboard did not answer in {START_TIMEOUT_S:.0f} s: {tail}")

    def serve_api_answers(self) -> bool:
        try:
            with urllib.request.urlopen(
                self.dashboard_url + "/api/serve/applications/", timeout=2
            ) as answer:
                json.loads(answer.read())
                return True
        except (OSError, ValueError):
            return False

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.temp_dir / "ray-start.log").read_text(errors="replace")[-1500:]
        return ""

    def processes(self) -> list[int]:
        """Every live process this head started (they inherit the marker)."""
        needle = f"{MARKER}={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            except OSError:
                continue
            if state != "Z":
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """``ray start --block`` stops its processes on SIGTERM; stragglers (workers in their
        own process groups) are killed by pid, so nothing outlives the head."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        deadline = time.monotonic() + 15
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.3)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
