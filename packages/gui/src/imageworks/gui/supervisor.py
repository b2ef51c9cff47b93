"""Start and stop the proxy as a detached process, as Settings → Backends does.

It runs the same command an operator would (``imageworks-chat-proxy``), in its own session
so it outlives the console, with a pidfile under ``_staging/`` and its output in
``logs/chat_proxy.out``. Stop sends SIGINT (Ctrl+C: the proxy's graceful shutdown) and says so
if the process did not exit in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

PIDFILE = "chat_proxy.pid"


@dataclass(frozen=True)
class SupervisorStatus:
    running: bool
    pid: int | None
    log_path: Path


class ProxySupervisor:
    def __init__(self, proxy_url: str, workdir: Path | None = None) -> None:
        self.workdir = (workdir or Path.cwd()).resolve()
        self.pidfile = self.workdir / "_staging" / PIDFILE
        self.log_path = self.workdir / "logs" / "chat_proxy.out"
        url = urlparse(proxy_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 8100

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "imageworks.chat_proxy.cli",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]

    def status(self) -> SupervisorStatus:
        pid = self._pid()
        return SupervisorStatus(pid is not None, pid, self.log_path)

    def start(self) -> SupervisorStatus:
        current = self.status()
        if current.running:
            return current
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pidfile.write_text(str(process.pid))
        return SupervisorStatus(True, process.pid, self.log_path)

    def stop(self, timeout: float = 45.0) -> str:
        """SIGINT, then wait. Returns what happened, in words for the operator."""
        pid = self._pid()
        if pid is None:
            return "the proxy was not running (started from here)"
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                self.pidfile.unlink(missing_ok=True)
                return f"stopped (pid {pid})"
            time.sleep(0.1)
        return f"sent Ctrl+C to pid {pid}, but it has not exited after {timeout:.0f} s"

    def _pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _alive(pid) or not _is_proxy(pid):
            self.pidfile.unlink(missing_ok=True)  # stale: the process is gone or was reused
            return None
        return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):  # our own exited child: reap the zombie
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _is_proxy(pid: int) -> bool:
    try:
        return b"imageworks.chat_proxy.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
