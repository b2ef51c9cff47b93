"""One supervised server process: process group, log file, health wait, stop with escalation.

Used by the proxy for llama.cpp servers and by the vLLM executor. A process is started in its
own session (so its whole group can be signalled and no grandchild outlives it), its output is
appended to a log file, and ``start`` returns only once its health URL answers 200. If the
process exits while we wait, ``start`` fails at once with the tail of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp


class StartFailed(RuntimeError):
    """The process exited (or could not be spawned) before it became healthy."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message + (f"; last log lines:\n{log_tail}" if log_tail else ""))
        self.log_tail = log_tail


class StartTimedOut(RuntimeError):
    """The process stayed up but never became healthy in time (it has been stopped)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it; a tiny race is accepted)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 20, max_bytes: int = 8192) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a running process? A zombie (exited, not yet reaped: an adopted process's
    parent is init, not us) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def cmdline(pid: int) -> list[str] | None:
    """A process's argv from /proc, or None if it is gone (or this is not Linux)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


class ManagedProcess:
    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def adopt(cls, pid: int, argv: Sequence[str], log_path: Path) -> ManagedProcess:
        """Take charge of a process started by an earlier incarnation of the supervisor."""
        managed = cls(argv, log_path)
        managed.pid = pid
        return managed

    @property
    def returncode(self) -> int | None:
        if self._proc is not None:
            return self._proc.poll()  # reaps our child without blocking
        if self.pid is None:
            return None
        return None if pid_alive(self.pid) else -1

    @property
    def alive(self) -> bool:
        return self.pid is not None and self.returncode is None

    async def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"--- {stamp} starting: {' '.join(self.argv)}\n".encode())
            try:
                # subprocess, not the loop's subprocess API: uvloop's ignores close_fds, and
                # hypercorn marks its listening sockets inheritable (for its workers), so a
                # child would keep our port open after we are gone.
                self._proc = await asyncio.to_thread(
                    subprocess.Popen,
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    env=self.env,
                    cwd=self.cwd,
                )
            except OSError as exc:
                raise StartFailed(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from exc
        self.pid = self._proc.pid

    async def wait_healthy(self, url: str, timeout: float, interval: float = 0.1) -> None:
        """Poll ``url`` until it answers 200. Fails fast if the process exits meanwhile."""
        deadline = time.monotonic() + timeout
        probe_timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=probe_timeout) as session:
            while True:
                if self.returncode is not None:
                    raise StartFailed(
                        f"process exited with code {self.returncode} during start",
                        tail(self.log_path),
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                if time.monotonic() >= deadline:
                    await self.stop()
                    raise StartTimedOut(f"not healthy at {url} within {timeout:.0f} s")
                await asyncio.sleep(interval)

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to the whole group, SIGKILL after ``grace`` seconds; returns the exit code."""
        if self.pid is None:
            return None
        self._signal(signal.SIGTERM)
        if not await self._wait(grace):
            self._signal(signal.SIGKILL)
            await self._wait(5.0)
        return self.returncode

    def _signal(self, sig: int) -> None:
        assert self.pid is not None
        try:
            os.killpg(self.pid, sig)  # started with start_new_session: pgid == pid
        except ProcessLookupError:
            return
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"
