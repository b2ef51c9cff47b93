"""Engine processes: spawn, record, adopt, watch and stop. The one supervision module, used by
the proxy (llama.cpp servers) and by the vLLM executor (vLLM servers).

A process is started in its own session, so its whole group can be signalled and no grandchild
outlives it; its output is appended to a log file; ``wait_healthy`` returns once its health URL
answers 200 and fails at once, with the tail of its log, if it exits meanwhile.

Identity: a ``ProcessRecord`` (pid, the kernel's start time for that pid, argv) is written to the
staging dir while the process runs. After a crash of the supervisor, the next one adopts the
process only if all three still match, so a recycled pid is never mistaken for our engine.

Exits are observed, not polled by requests: ``watch`` waits on a pidfd (Linux 5.3+; the event
loop wakes the moment the process ends, adopted ones included), or polls every 0.25 s where
there is none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from imageworks.chat_proxy.supervision.procfs import (
    argv_matches,
    cmdline,
    group_members,
    pid_alive,
    session_leader,
    start_ticks,
)
from imageworks.model_loader.layers import write_atomic

log = logging.getLogger(__name__)

POLL_S = 0.25  # exit polling where pidfd is missing


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


@dataclass(frozen=True)
class ProcessRecord:
    """What identifies a running engine across a supervisor crash, plus what to reattach."""

    pid: int
    start_ticks: int | None
    argv: list[str]
    log_path: str
    extra: dict[str, Any] = field(default_factory=dict)

    def matches(self) -> bool:
        """Is the process with this pid still the one we started: alive, the same start time,
        leading its own session (we start every engine in one), and running our command (or
        its tail, when a wrapper such as ``env`` or ``nice`` exec'd it)?"""
        return (
            self.pid > 0
            and pid_alive(self.pid)
            # None: a record written before start times were kept (pid and argv must do)
            and self.start_ticks in (None, start_ticks(self.pid))
            and session_leader(self.pid)
            and argv_matches(self.argv, cmdline(self.pid))
        )

    @property
    def pending(self) -> bool:
        """Written before the spawn, so a supervisor killed between spawn and record can still
        find the process by its command line."""
        return self.pid == 0

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def loads(cls, raw: bytes | str) -> ProcessRecord | None:
        try:
            data = json.loads(raw)
            record = cls(
                pid=int(data["pid"]),
                start_ticks=data.get("start_ticks"),
                argv=[str(a) for a in data["argv"]],
                log_path=str(data.get("log_path", "")),
                extra=dict(data.get("extra") or {}),
            )
        except (ValueError, KeyError, TypeError):
            return None
        return record


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
        self.started_ticks: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._exit_code: int | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @classmethod
    def adopt(cls, record: ProcessRecord) -> ManagedProcess:
        """Take charge of a process started by an earlier incarnation of the supervisor (the
        caller has checked ``record.matches()``)."""
        managed = cls(record.argv, Path(record.log_path))
        managed.pid = record.pid
        managed.started_ticks = record.start_ticks
        return managed

    def record(self, **extra: Any) -> ProcessRecord:
        assert self.pid is not None
        return ProcessRecord(self.pid, self.started_ticks, self.argv, str(self.log_path), extra)

    @property
    def returncode(self) -> int | None:
        if self._exit_code is not None:
            return self._exit_code
        if self._proc is not None:
            code = self._proc.poll()  # reaps our child without blocking
        elif self.pid is None:
            return None
        else:  # adopted: not our child, so no exit code; gone, or its pid reused, is -1
            same = self.started_ticks is None or start_ticks(self.pid) == self.started_ticks
            code = None if pid_alive(self.pid) and same else -1
        self._exit_code = code
        return code

    @property
    def alive(self) -> bool:
        return self.pid is not None and self.returncode is None

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was asked for: an exit after that is not a crash."""
        return self._stopping

    async def spawn(self) -> None:
        """Start the process. Any failure here (a full disk for the log, a missing program)
        raises ``StartFailed`` and leaves no process behind."""
        header = f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(self.argv)}\n"
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = self.log_path.open("ab")
        except OSError as exc:
            raise StartFailed(f"cannot open the engine log {self.log_path}: {exc}") from exc
        try:
            # Write and flush before the child exists: a full disk fails here, with no child.
            log_file.write(header.encode())
            log_file.flush()
            # subprocess, not the loop's subprocess API: uvloop's ignores close_fds, and
            # hypercorn marks its listening sockets inheritable (for its workers), so a child
            # would keep our port open after we are gone.
            self._proc = await asyncio.to_thread(
                subprocess.Popen,
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=self.env,
                cwd=self.cwd,
            )
        except OSError as exc:
            raise StartFailed(
                f"cannot start {self.argv[0]!r} (log {self.log_path}): {exc.strerror or exc}"
            ) from exc
        finally:
            with contextlib.suppress(OSError):  # the child holds its own copy of the fd
                log_file.close()
        self.pid = self._proc.pid
        self.started_ticks = start_ticks(self.pid)

    def watch(self, on_exit: Callable[[int | None], None]) -> None:
        """Call ``on_exit(returncode)`` on the event loop as soon as the process ends."""
        if self._watch is None and self.pid is not None:
            self._watch = asyncio.get_running_loop().create_task(self._wait_exit(on_exit))

    async def _wait_exit(self, on_exit: Callable[[int | None], None]) -> None:
        assert self.pid is not None
        loop = asyncio.get_running_loop()
        try:
            fd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            fd = None
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:  # a pidfd is readable once the process has exited
            if not ended.done():
                ended.set_result(None)

        if fd is not None:
            loop.add_reader(fd, readable)
        try:
            while self.returncode is None:
                if fd is not None:
                    await asyncio.wait({ended}, timeout=POLL_S * 8)
                else:
                    await asyncio.sleep(POLL_S)
        finally:
            if fd is not None:
                loop.remove_reader(fd)
                os.close(fd)
        on_exit(self.returncode)

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
        """SIGTERM to the whole group, SIGKILL after ``grace`` seconds; returns the exit code.
        The group, not just the process: an engine's workers must not outlive it, also when
        the engine itself already died (a crash leaves them in its group)."""
        self._stopping = True
        if self.pid is None:
            return None
        self._signal(signal.SIGTERM)
        if not await self._wait(grace):
            self._signal(signal.SIGKILL)
            await self._wait(5.0)
        if self._watch is not None:
            self._watch.cancel()
        return self.returncode

    def kill_now(self) -> None:
        """SIGKILL the group without waiting (last resort, e.g. when a start is abandoned)."""
        self._stopping = True
        if self.pid is not None:
            self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        assert self.pid is not None
        ticks = start_ticks(self.pid)
        if ticks is not None and self.started_ticks is not None and ticks != self.started_ticks:
            return  # the pid is someone else's now (a pid in use as a group id is never reused)
        try:
            os.killpg(self.pid, sig)  # started with start_new_session: pgid == pid
        except ProcessLookupError:
            return
        except PermissionError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)

    async def _wait(self, timeout: float) -> bool:
        """Until the process has exited and its group is empty, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.returncode is None or await self._group_alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _group_alive(self) -> bool:
        """Is any process of the group still running? ``killpg(0)`` answers at once for the
        common case (an empty group); only when it finds someone is /proc scanned, in a
        thread (a scan reads every process's stat: too slow for the event loop), to tell
        live members from zombies."""
        if not self.pid:
            return False
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return bool(await asyncio.to_thread(group_members, self.pid))


def safe_name(name: str) -> str:
    """A file name for a model name: distinct names give distinct files ('org/m', 'org_m')."""
    return urllib.parse.quote(name, safe="")


class RecordStore:
    """One JSON file per running engine under a directory in the staging dir."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, key: str) -> Path:
        return self.directory / f"{safe_name(key)}.json"

    def save(self, key: str, record: ProcessRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path(key), record.dumps())

    def drop(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self.path(key).unlink(missing_ok=True)

    def load_all(self) -> dict[str, ProcessRecord]:
        found: dict[str, ProcessRecord] = {}
        with contextlib.suppress(OSError):
            for path in sorted(self.directory.glob("*.json")):
                with contextlib.suppress(OSError):
                    record = ProcessRecord.loads(path.read_bytes())
                    if record is None:
                        log.warning("ignoring an unreadable engine record %s", path)
                        path.unlink(missing_ok=True)
                    else:
                        found[urllib.parse.unquote(path.stem)] = record
        return found
