"""One proxy per staging dir: the engine records, the lease and the autostart logs there belong
to one supervisor. A second proxy on the same dir would adopt, stop and restart the first one's
engines behind its back, so it refuses to start instead (an advisory ``flock``, released by the
kernel when the holder dies, so a crashed proxy never blocks the next one)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_FILE = "proxy.lock"


class StagingBusy(RuntimeError):
    pass


class StagingLock:
    def __init__(self, staging_dir: Path) -> None:
        self.path = staging_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> StagingLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StagingBusy(
                f"another chat proxy (pid {holder}) uses the staging dir {self.path.parent}; "
                "stop it, or give this one its own CHAT_PROXY_STAGING_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
