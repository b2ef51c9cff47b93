"""The supervision module against real child processes (``sh``, ``sleep``): spawning and its
log, the identity a record carries across a supervisor crash, stopping a whole process group,
watching for an exit, and the record files. Each test takes well under a second."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imageworks.chat_proxy.supervision import process as process_module
from imageworks.chat_proxy.supervision.process import (
    ManagedProcess,
    ProcessRecord,
    RecordStore,
    StartFailed,
    StartTimedOut,
    free_port,
    safe_name,
    tail,
)
from imageworks.chat_proxy.supervision.procfs import (
    argv_matches,
    cmdline,
    find_launched,
    group_members,
    listening_pid,
    pid_alive,
    session_leader,
    start_ticks,
)
from testkit.entries import eventually

pytestmark = pytest.mark.subprocess

# Ignores SIGTERM, and so does its worker (an ignored signal stays ignored across exec).
DEAF = (
    "import signal, subprocess, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "subprocess.Popen(['sleep', '60'])\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def unique_sleep() -> list[str]:
    """A ``sleep`` whose argv no other process on this machine has."""
    return ["sleep", f"60.{uuid.uuid4().int % 10**9:09d}"]


@pytest.fixture
def started() -> Iterator[list[ManagedProcess]]:
    """Processes a test starts. At the end each group still running is killed, by the test
    itself rather than by the code under test (a mutant must not leave a process behind)."""
    processes: list[ManagedProcess] = []
    yield processes
    for process in processes:
        if process.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, signal.SIGKILL)  # also if it never got a group of its own
            if process._proc is not None:
                process._proc.wait()
            assert eventually(lambda p=process: not group_members(p.pid or 0))  # type: ignore[misc]


def open_fds() -> set[str]:
    return {entry.name for entry in Path("/proc/self/fd").iterdir()}


async def until(predicate: Callable[[], object]) -> bool:
    """``eventually`` off the event loop, for waits the loop must keep running through."""
    return await asyncio.to_thread(eventually, predicate)


async def spawn(started: list[ManagedProcess], argv: list[str], tmp_path: Path) -> ManagedProcess:
    process = ManagedProcess(argv, tmp_path / "logs" / f"{uuid.uuid4().hex}.log")
    started.append(process)
    await process.spawn()
    return process


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A ``sleep`` that is not a session leader (started in the test's own session)."""
    child = subprocess.Popen(unique_sleep())
    yield child
    child.kill()
    child.wait()


# --- spawning ----------------------------------------------------------------------------------


async def test_spawn_writes_the_header_before_the_childs_output_and_appends(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    log_path = tmp_path / "deep" / "dir" / "engine.log"
    log_path.parent.mkdir(parents=True)
    log_path.write_text("earlier run\n")
    process = ManagedProcess(["sh", "-c", "echo from-the-child; echo oops >&2"], log_path)
    started.append(process)
    await process.spawn()
    assert process.pid is not None and process.pid > 0
    assert process.started_ticks == start_ticks(process.pid) or process.returncode is not None
    assert eventually(lambda: process.returncode == 0)
    lines = log_path.read_text().splitlines()
    assert lines[0] == "earlier run"
    assert re.fullmatch(r"--- \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d starting: .*", lines[1])
    assert lines[1].endswith(" starting: sh -c echo from-the-child; echo oops >&2")
    assert lines[2:] == ["from-the-child", "oops"]


async def test_spawn_creates_the_log_directory_and_passes_env_and_cwd(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    log_path = tmp_path / "a" / "b" / "engine.log"
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "IW_TEST_VALUE": "seen"}
    process = ManagedProcess(
        ["sh", "-c", 'echo "$IW_TEST_VALUE"; pwd; exit 3'], log_path, env=env, cwd=work
    )
    started.append(process)
    await process.spawn()
    assert eventually(lambda: process.returncode == 3)
    assert log_path.read_text().splitlines()[1:] == ["seen", str(work)]
    assert process.alive is False


async def test_a_log_that_cannot_be_opened_fails_the_start_and_spawns_nothing(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "marker"
    process = ManagedProcess(["touch", str(marker)], tmp_path)  # the log path is a directory
    with pytest.raises(StartFailed, match="cannot open the engine log"):
        await process.spawn()
    assert process.pid is None and process.returncode is None and not process.alive
    assert not marker.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_a_log_that_cannot_be_written_fails_the_start_and_spawns_nothing(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "marker"
    log_path = tmp_path / "engine.log"
    log_path.symlink_to("/dev/full")
    process = ManagedProcess(["touch", str(marker)], log_path)
    with pytest.raises(StartFailed) as failed:
        await process.spawn()
    assert str(failed.value) == f"cannot start 'touch' (log {log_path}): No space left on device"
    assert process.pid is None and process.returncode is None
    assert not marker.exists()


async def test_a_missing_program_fails_the_start(tmp_path: Path) -> None:
    log_path = tmp_path / "engine.log"
    process = ManagedProcess([str(tmp_path / "no-such-engine"), "--flag"], log_path)
    with pytest.raises(StartFailed, match=r"cannot start .*no-such-engine") as failed:
        await process.spawn()
    assert str(log_path) in str(failed.value)
    assert process.pid is None
    assert "starting:" in log_path.read_text()  # the header was written; no child exists


def test_start_failed_carries_the_log_tail() -> None:
    assert str(StartFailed("died")) == "died"
    failed = StartFailed("died", "line 1\nline 2")
    assert failed.log_tail == "line 1\nline 2"
    assert str(failed) == "died; last log lines:\nline 1\nline 2"


# --- records and identity ----------------------------------------------------------------------


def test_a_record_round_trips_through_its_bytes() -> None:
    record = ProcessRecord(4242, 987654, ["llama-server", "-m", "x"], "/l/x.log", {"port": 8080})
    assert ProcessRecord.loads(record.dumps()) == record
    assert ProcessRecord.loads(record.dumps().decode()) == record
    assert not record.pending
    assert ProcessRecord(0, None, ["x", "y"], "").pending


def test_an_old_record_without_start_time_or_extras_still_loads() -> None:
    loaded = ProcessRecord.loads('{"pid": "17", "argv": ["a", 2]}')
    assert loaded == ProcessRecord(17, None, ["a", "2"], "", {})
    assert ProcessRecord.loads('{"pid": 1, "argv": [], "extra": null}') == ProcessRecord(
        1, None, [], "", {}
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        b'{"argv": ["a"]}',
        b'{"pid": 1}',
        b'{"pid": "one", "argv": ["a"]}',
        b'{"pid": null, "argv": ["a"]}',
        b'{"pid": 1, "argv": 5}',
        b'{"pid": 1, "argv": ["a"], "extra": 5}',
    ],
)
def test_a_malformed_record_loads_as_none(raw: bytes) -> None:
    assert ProcessRecord.loads(raw) is None


async def test_a_live_session_leader_we_started_matches_its_record(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    process = await spawn(started, unique_sleep(), tmp_path)
    assert process.pid is not None
    record = process.record(port=1234)
    assert record.pid == process.pid and record.argv == process.argv
    assert record.start_ticks == start_ticks(process.pid) and record.start_ticks is not None
    assert record.log_path == str(process.log_path) and record.extra == {"port": 1234}
    assert eventually(record.matches)  # seen failing once right after the spawn, under load
    assert dataclasses.replace(record, start_ticks=None).matches()  # a record from before ticks
    assert not dataclasses.replace(record, start_ticks=record.start_ticks + 1).matches()
    assert not dataclasses.replace(record, argv=["sleep", "61"]).matches()
    assert not dataclasses.replace(record, pid=0).matches()
    assert not dataclasses.replace(record, pid=0, start_ticks=None).matches()
    assert not dataclasses.replace(record, pid=os.getpid()).matches()
    process.kill_now()
    assert eventually(lambda: process.returncode is not None)
    assert not record.matches()  # gone


def test_a_process_that_does_not_lead_its_session_never_matches(
    stranger: subprocess.Popen[bytes],
) -> None:
    pid = stranger.pid
    assert eventually(lambda: cmdline(pid) == stranger.args)
    assert not session_leader(pid)
    assert not ProcessRecord(pid, start_ticks(pid), list(stranger.args), "").matches()  # type: ignore[arg-type]


def test_argv_matches_the_launched_command_or_its_tail_after_a_wrapper() -> None:
    launched = ["env", "A=1", "nice", "llama-server", "-m", "x.gguf"]
    assert argv_matches(launched, list(launched))
    assert argv_matches(launched, ["llama-server", "-m", "x.gguf"])
    assert argv_matches(["a", "b"], ["a", "b"])
    assert not argv_matches(launched, ["x.gguf"])  # one word is too little to trust
    assert not argv_matches(launched, [])
    assert not argv_matches(launched, None)
    assert not argv_matches(launched, ["llama-server", "-m", "y.gguf"])
    assert not argv_matches(launched, ["extra", *launched])  # longer than what we launched
    assert not argv_matches(["a", "b"], ["b", "b"])


def test_proc_readers_on_a_pid_that_is_gone() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert not pid_alive(child.pid)
    assert start_ticks(child.pid) is None
    assert cmdline(child.pid) is None
    assert not session_leader(child.pid)
    assert pid_alive(os.getpid())
    assert cmdline(os.getpid()) == sys.orig_argv


def test_an_exited_child_not_yet_reaped_is_not_alive() -> None:
    child = subprocess.Popen(["true"])
    try:
        assert eventually(lambda: not pid_alive(child.pid))
        assert Path(f"/proc/{child.pid}").exists()  # a zombie: still in /proc, not running
    finally:
        child.wait()


def test_cmdline_reads_a_process_argv(stranger: subprocess.Popen[bytes]) -> None:
    assert eventually(lambda: cmdline(stranger.pid) == list(stranger.args))  # type: ignore[arg-type]
    spaced = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "a b"])
    try:
        assert eventually(lambda: (cmdline(spaced.pid) or [])[-1:] == ["a b"])
    finally:
        spaced.kill()
        spaced.wait()


async def test_find_launched_finds_the_session_leader_running_the_command(
    tmp_path: Path, started: list[ManagedProcess], stranger: subprocess.Popen[bytes]
) -> None:
    argv = unique_sleep()
    assert find_launched(argv) == []
    process = await spawn(started, argv, tmp_path)
    assert eventually(lambda: find_launched(argv) == [process.pid])
    assert find_launched(["nice", "-n", "0", *argv]) == [process.pid]  # a wrapper's tail
    assert find_launched(list(stranger.args)) == []  # type: ignore[arg-type]
    process.kill_now()
    assert eventually(lambda: process.returncode is not None)
    assert find_launched(argv) == []


def test_find_launched_skips_an_exited_leader_not_yet_reaped() -> None:
    argv = ["sh", "-c", f"exit 0 # {uuid.uuid4().hex}"]
    child = subprocess.Popen(argv, start_new_session=True)
    try:
        assert eventually(lambda: not pid_alive(child.pid))
        assert Path(f"/proc/{child.pid}").exists()
        assert find_launched(argv) == []
        assert group_members(child.pid) == []  # a zombie is no member
    finally:
        child.wait()


async def test_group_members_lists_the_live_processes_of_one_group(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    pidfile = tmp_path / "worker.pid"
    process = await spawn(started, ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], tmp_path)
    assert process.pid is not None
    assert eventually(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    worker = int(pidfile.read_text())
    assert eventually(
        lambda: sorted(group_members(process.pid or 0)) == sorted([process.pid, worker])
    )
    assert os.getpid() not in group_members(process.pid)
    assert group_members(os.getpgid(os.getpid())) != [] and process.pid not in group_members(
        os.getpgid(os.getpid())
    )


# --- adopting ----------------------------------------------------------------------------------


async def test_an_adopted_process_is_watched_by_pid_and_reads_minus_one_once_gone(
    tmp_path: Path,
) -> None:
    argv = unique_sleep()
    child = await asyncio.to_thread(subprocess.Popen, argv, start_new_session=True)
    try:
        assert eventually(lambda: cmdline(child.pid) == argv)
        record = ProcessRecord(child.pid, start_ticks(child.pid), argv, str(tmp_path / "x.log"))
        assert record.matches()
        adopted = ManagedProcess.adopt(record)
        assert adopted.pid == child.pid and adopted.started_ticks == record.start_ticks
        assert adopted.argv == argv and adopted.log_path == tmp_path / "x.log"
        assert adopted.record() == record
        assert adopted.alive and adopted.returncode is None
        assert await adopted.stop(grace=5) == -1  # not our child: the code is unknown
        assert child.poll() == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    assert not adopted.alive


def test_a_process_never_started_has_no_code_and_is_not_alive(tmp_path: Path) -> None:
    process = ManagedProcess(["x"], tmp_path / "x.log")
    assert process.returncode is None and not process.alive and process.stopping is False
    process.kill_now()
    assert process.stopping


async def test_stop_of_a_process_never_started_returns_none(tmp_path: Path) -> None:
    process = ManagedProcess(["x"], tmp_path / "x.log")
    assert await process.stop(grace=0.1) is None
    assert process.stopping


# --- stopping ----------------------------------------------------------------------------------


async def test_stop_terminates_the_whole_group(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    pidfile = tmp_path / "worker.pid"
    process = await spawn(started, ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], tmp_path)
    assert eventually(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    worker = int(pidfile.read_text())
    assert process.stopping is False
    assert await process.stop(grace=5) == -signal.SIGTERM
    assert process.stopping and not process.alive
    assert not pid_alive(worker)
    assert group_members(process.pid or 0) == []


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    process = await spawn(started, [sys.executable, "-c", DEAF], tmp_path)
    assert eventually(lambda: "ready" in process.log_path.read_text().splitlines())
    assert await process.stop(grace=0.2) == -signal.SIGKILL
    assert group_members(process.pid or 0) == []


async def test_workers_die_also_when_the_leader_already_exited(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    pidfile = tmp_path / "worker.pid"
    process = await spawn(
        started, ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; exit 7"], tmp_path
    )
    assert eventually(lambda: process.returncode == 7)
    worker = int(pidfile.read_text())
    assert pid_alive(worker) and group_members(process.pid or 0) == [worker]
    assert await process.stop(grace=5) == 7
    assert eventually(lambda: not pid_alive(worker))
    assert group_members(process.pid or 0) == []


async def test_kill_now_kills_the_group_without_waiting(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    process = await spawn(started, [sys.executable, "-c", DEAF], tmp_path)
    process.kill_now()
    assert process.stopping
    assert eventually(lambda: process.returncode == -signal.SIGKILL)


async def test_a_pid_whose_start_time_changed_is_never_signalled(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    process = await spawn(started, unique_sleep(), tmp_path)
    assert process.started_ticks is not None
    ours = process.started_ticks
    process.started_ticks = ours + 1  # as if the pid now belonged to someone else
    process._signal(signal.SIGKILL)
    process.kill_now()
    process.started_ticks = ours
    # Neither SIGKILL went out: the stop below is what ends it, with SIGTERM.
    assert await process.stop(grace=5) == -signal.SIGTERM


async def test_a_process_with_no_known_start_time_is_still_signalled(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    process = await spawn(started, unique_sleep(), tmp_path)
    process.started_ticks = None  # adopted from a record written before start times were kept
    assert await process.stop(grace=5) == -signal.SIGTERM


# --- watching and health -----------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd on this platform")
async def test_watch_calls_back_once_with_the_exit_code(
    tmp_path: Path, started: list[ManagedProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the fallback poll at an hour, only the pidfd can wake the watcher within the bound.
    monkeypatch.setattr(process_module, "POLL_S", 3600.0)
    process = await spawn(
        started, ["sh", "-c", "trap 'exit 5' TERM; echo ready; sleep 60 & wait"], tmp_path
    )
    calls: list[int | None] = []
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_exit(code: int | None) -> None:
        calls.append(code)
        if not ended.done():
            ended.set_result(None)

    fds = open_fds()
    process.watch(on_exit)
    process.watch(on_exit)  # a second watch is the same watch
    assert await until(lambda: "ready" in process.log_path.read_text().splitlines())
    assert calls == []
    os.kill(process.pid or 0, signal.SIGTERM)
    await asyncio.wait_for(ended, timeout=10)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.gather(*others)
    assert calls == [5]
    assert open_fds() == fds  # the pidfd is closed


async def test_watch_of_a_process_never_started_does_nothing(tmp_path: Path) -> None:
    process = ManagedProcess(["x"], tmp_path / "x.log")
    process.watch(lambda code: None)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_wait_healthy_fails_fast_with_the_log_tail_when_the_child_exits(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    process = await spawn(started, ["sh", "-c", "echo 'model file missing'; exit 4"], tmp_path)
    url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(StartFailed, match="exited with code 4 during start") as failed:
        await process.wait_healthy(url, timeout=10, interval=0.01)
    assert failed.value.log_tail.splitlines()[-1] == "model file missing"
    assert "starting: sh -c" in failed.value.log_tail


async def test_wait_healthy_returns_once_the_url_answers_200(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    port = free_port()
    (tmp_path / "health").write_text("ok")
    process = ManagedProcess(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        tmp_path / "server.log",
        cwd=tmp_path,
    )
    started.append(process)
    await process.spawn()
    await process.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=10, interval=0.02)
    assert process.alive


async def test_wait_healthy_keeps_polling_past_a_non_200(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    port = free_port()
    server = ManagedProcess(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        tmp_path / "server.log",
        cwd=tmp_path,
    )
    started.append(server)
    await server.spawn()
    waiting = asyncio.create_task(
        server.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=10, interval=0.02)
    )
    # /health is a 404 until the file exists; the wait goes on until it answers 200.
    assert await until(lambda: '"GET /health HTTP/1.1" 404' in server.log_path.read_text())
    assert not waiting.done()
    (tmp_path / "health").write_text("ok")
    await asyncio.wait_for(waiting, timeout=30)
    assert server.alive


async def test_wait_healthy_gives_up_at_the_deadline_and_stops_the_process(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    process = await spawn(started, unique_sleep(), tmp_path)
    url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(StartTimedOut, match=f"not healthy at {url} within 0 s"):
        await process.wait_healthy(url, timeout=0.2, interval=0.01)
    assert process.stopping and process.returncode == -signal.SIGTERM


# --- record files, names, tails ----------------------------------------------------------------


def test_the_record_store_saves_drops_and_loads_by_model_name(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "staging" / "records")
    assert store.load_all() == {}  # no directory yet
    one = ProcessRecord(11, 5, ["a", "b"], "/l/1.log", {"port": 1})
    two = ProcessRecord(12, 6, ["c", "d"], "/l/2.log")
    store.save("org/m", one)
    store.save("org_m", two)
    assert store.path("org/m") != store.path("org_m")
    assert store.path("org/m") == tmp_path / "staging" / "records" / "org%2Fm.json"
    assert store.load_all() == {"org/m": one, "org_m": two}
    store.drop("org/m")
    store.drop("never-saved")
    store.path("a-directory").mkdir()
    store.drop("a-directory")  # cannot be removed: dropping is best effort
    assert store.load_all() == {"org_m": two}
    store.save("org_m", one)  # replaced, not added
    assert store.load_all() == {"org_m": one}


def test_an_unreadable_record_is_dropped_and_the_rest_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RecordStore(tmp_path)
    good = ProcessRecord(11, 5, ["a", "b"], "")
    store.save("good", good)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.txt").write_text("{not json")
    (tmp_path / "dir.json").mkdir()  # cannot be read: skipped, not fatal
    assert store.load_all() == {"good": good}
    assert not (tmp_path / "bad.json").exists()
    assert f"ignoring an unreadable engine record {tmp_path / 'bad.json'}" in caplog.messages
    assert (tmp_path / "other.txt").exists()  # not a record file: left alone


def test_safe_name_gives_distinct_names_a_distinct_file_name() -> None:
    assert safe_name("org/m") == "org%2Fm"
    assert safe_name("org_m") == "org_m"
    assert safe_name("../x") == "..%2Fx"
    assert "/" not in safe_name("a/b/c")


def test_tail_gives_the_last_lines_of_the_last_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"".join(f"line {i}\n".encode() for i in range(30)) + b"bad \xff\n")
    assert tail(path).splitlines() == [f"line {i}" for i in range(11, 30)] + ["bad \ufffd"]
    assert tail(path, lines=2) == "line 29\nbad \ufffd"
    assert tail(path, lines=100, max_bytes=16) == "8\nline 29\nbad \ufffd"
    assert tail(tmp_path / "missing.log") == ""
    big = tmp_path / "big.log"
    big.write_bytes(b"a" * 100 + b"\n" + b"b" * 10000)
    assert tail(big, lines=5) == "b" * 8192  # only the last 8 KiB are read
    short = tmp_path / "short.log"
    short.write_text("only\n")
    assert tail(short) == "only"


def test_free_port_is_a_port_that_can_be_bound() -> None:
    import socket

    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_the_process_listening_on_a_port_is_found_and_a_closed_port_is_nobody() -> None:
    """How the GPU ledger finds the Ollama server's pid (its per-device memory is where
    Ollama put its models): a child listening on a port, found by that port."""
    port = free_port()
    code = (
        "import socket, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        assert listening_pid(port) == child.pid
    finally:
        child.kill()
        child.communicate()
    assert listening_pid(port) is None


def test_the_proc_readers_survive_a_command_name_with_parentheses_and_spaces(
    tmp_path: Path,
) -> None:
    odd = tmp_path / "x) (y z"
    odd.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(odd), "60"], start_new_session=True)
    try:
        assert eventually(lambda: cmdline(child.pid) == [str(odd), "60"])
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert "(x) (y z)" in stat
        assert start_ticks(child.pid) == int(stat.rsplit(")", 1)[1].split()[19])
        assert pid_alive(child.pid) and group_members(child.pid) == [child.pid]
        record = ProcessRecord(child.pid, start_ticks(child.pid), [str(odd), "60"], "")
        assert record.matches()
    finally:
        child.kill()
        child.wait()


async def test_the_child_gets_no_stdin_and_none_of_our_inheritable_fds(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    our_stdin = os.dup(0)
    os.dup2(read_end, 0)  # were stdin inherited, the child would see this pipe
    try:
        process = await spawn(
            started,
            ["sh", "-c", f"readlink /proc/self/fd/0; test -e /proc/self/fd/{write_end}; echo $?"],
            tmp_path,
        )
        assert await until(lambda: process.returncode == 0)
    finally:
        os.dup2(our_stdin, 0)
        os.close(our_stdin)
        os.close(read_end)
        os.close(write_end)
    assert process.log_path.read_text().splitlines()[1:] == ["/dev/null", "1"]


async def test_stop_waits_for_a_worker_that_outlives_its_leader(
    tmp_path: Path, started: list[ManagedProcess]
) -> None:
    pidfile = tmp_path / "worker.pid"
    deaf = DEAF.replace("subprocess.Popen(['sleep', '60'])\n", "")
    process = await spawn(
        started,
        ["sh", "-c", f'{sys.executable} -c "{deaf}" & echo $! > {pidfile}; wait'],
        tmp_path,
    )
    assert await until(lambda: "ready" in process.log_path.read_text().splitlines())
    worker = int(pidfile.read_text())
    # The leader dies of SIGTERM; the worker ignores it, so the group is SIGKILLed.
    assert await process.stop(grace=0.2) == -signal.SIGTERM
    assert not pid_alive(worker)
    assert group_members(process.pid or 0) == []
