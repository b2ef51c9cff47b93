"""What Linux's /proc says of a process: is it alive, when did it start, what runs in it, who
leads its session and group, who listens on a port. How the supervisor tells its own engines
from a stranger that got the same pid, and finds what an earlier proxy left running.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a running process? A zombie (exited, not yet reaped: an adopted process's
    parent is init, not us) counts as gone."""
    try:
        # no mutate: signal 0 -> 1 would send SIGHUP to every process find_launched looks at
        os.kill(pid, 0)  # pragma: no mutate
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is None or fields[0] != "Z"


def start_ticks(pid: int) -> int | None:
    """When the kernel started ``pid`` (clock ticks since boot): with the pid, an identity."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def cmdline(pid: int) -> list[str] | None:
    """A process's argv from /proc, or None if it is gone (or this is not Linux)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def session_leader(pid: int) -> bool:
    try:
        return os.getsid(pid) == pid
    except OSError:
        return False


def argv_matches(launched: list[str], live: list[str] | None) -> bool:
    """``live`` is ``launched``, or its tail after a wrapper exec'd the real program."""
    if not live or len(live) < 2:
        return False
    return launched[-len(live) :] == live


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
                found.append(int(entry.name))
    return found


def find_launched(argv: list[str]) -> list[int]:
    """Session leaders running ``argv`` (or its tail): a pending record's process."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and session_leader(int(entry.name))
        and pid_alive(int(entry.name))
        and argv_matches(argv, cmdline(int(entry.name)))
    ]


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this host, if this user can see it (from
    /proc: the socket's inode, then the process holding it). Blocking: call in a thread."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and fields[1].endswith(f":{port:04X}"):
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if str(fd.readlink()) in inodes:
                        return int(entry.name)
    return None
