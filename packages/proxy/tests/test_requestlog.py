"""The JSONL writer: rotation under concurrent writers loses nothing and splits nothing."""

from __future__ import annotations

import errno
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from imageworks.chat_proxy.observe.requestlog import RequestLog
from testkit.entries import eventually


def all_records(path: Path) -> list[dict[str, object]]:
    files = sorted(path.parent.glob(path.name + "*"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def test_concurrent_writers_across_rotations_lose_and_split_nothing(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "chat_proxy.jsonl"
    log = RequestLog(path, max_bytes=20_000, backups=1000).start()
    writers, per_writer = 8, 500

    def write(worker: int) -> None:
        for i in range(per_writer):
            log.write({"event": "request", "request_id": f"{worker}-{i}", "pad": "x" * (i % 50)})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    files = list(path.parent.glob("chat_proxy.jsonl*"))
    assert len(files) > 10, "the test should exercise many rotations"
    assert all(f.stat().st_size <= 20_000 for f in files)
    ids = [r["request_id"] for r in all_records(path)]  # json.loads fails on a split line
    assert len(ids) == writers * per_writer == len(set(ids))


def test_only_the_configured_number_of_backups_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "chat_proxy.jsonl"
    log = RequestLog(path, max_bytes=2_000, backups=3).start()
    for i in range(500):
        log.write({"event": "request", "n": i})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat_proxy.jsonl",
        "chat_proxy.jsonl.1",
        "chat_proxy.jsonl.2",
        "chat_proxy.jsonl.3",
    ]
    newest = [json.loads(line)["n"] for line in path.read_text().splitlines()]
    assert newest[-1] == 499
    older = [
        json.loads(line)["n"] for line in (tmp_path / "chat_proxy.jsonl.1").read_text().splitlines()
    ]
    assert older[-1] == newest[0] - 1  # backups shift in order, nothing skipped between them


def test_records_get_a_utc_timestamp_and_recent_requests_are_kept(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "l.jsonl", max_bytes=10_000, backups=1, recent=2).start()
    for i in range(3):
        log.write({"event": "request", "n": i})
    log.event("registry_reload", "registry", version="abc")
    log.close()
    records = all_records(tmp_path / "l.jsonl")
    assert [r.get("n") for r in records] == [0, 1, 2, None]
    assert all(str(r["ts"]).endswith("Z") and "T" in str(r["ts"]) for r in records)
    assert records[-1]["component"] == "registry"
    assert [r["n"] for r in log.recent] == [1, 2]


def test_an_unserialisable_record_does_not_stop_the_writer(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "l.jsonl", max_bytes=10_000, backups=1).start()
    circular: dict[str, object] = {"event": "x"}
    circular["self"] = circular
    log.write(circular)
    log.write({"event": "request", "after": True})
    log.close()
    assert log.dropped == 1
    assert all_records(tmp_path / "l.jsonl")[-1]["after"] is True


def test_an_idle_log_writes_at_once_and_a_busy_one_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    log = RequestLog(path, max_bytes=10_000, backups=1, batch_s=60).start()
    log.write({"event": "request", "n": 0})
    deadline = time.monotonic() + 10
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r["n"] for r in all_records(path)] == [0]  # the writer was idle: written at once
    log.write({"event": "request", "n": 1})
    log.write({"event": "request", "n": 2})
    time.sleep(0.2)
    assert len(all_records(path)) == 1  # the writer rests for batch_s after each batch
    log.close()  # ... and close() writes what is pending
    assert [r["n"] for r in all_records(path)] == [0, 1, 2]


def test_an_event_record_has_exactly_its_fields(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "l.jsonl", max_bytes=10_000, backups=1).start()
    log.event("registry_reload", "registry", version="abc")
    log.close()
    (record,) = all_records(tmp_path / "l.jsonl")
    assert set(record) == {"ts", "event", "component", "version"}
    assert (record["event"], record["component"], record["version"]) == (
        "registry_reload",
        "registry",
        "abc",
    )


def test_the_writer_creates_missing_directories_and_is_a_named_daemon(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "l.jsonl"
    log = RequestLog(path, max_bytes=10_000, backups=1).start()
    writer = [t for t in threading.enumerate() if t.name == "request-log"]
    assert writer and all(t.daemon for t in writer)  # never keeps a dying process alive
    log.write({"event": "request"})
    log.close()
    log.close()  # twice is fine
    assert len(all_records(path)) == 1
    RequestLog(tmp_path / "never-started.jsonl", max_bytes=10, backups=0).close()


def test_a_second_batch_is_written_without_waiting_for_close(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    log = RequestLog(path, max_bytes=10_000, backups=1, batch_s=0.01).start()
    log.write({"event": "request", "n": 0})
    assert eventually(lambda: path.exists() and len(path.read_text().splitlines()) == 1)
    log.write({"event": "request", "n": 1})
    assert eventually(lambda: len(path.read_text().splitlines()) == 2)
    log.close()


def test_bad_records_are_counted_and_the_rest_of_their_batch_is_written(
    tmp_path: Path, caplog
) -> None:
    path = tmp_path / "l.jsonl"
    log = RequestLog(path, max_bytes=10_000, backups=1, batch_s=60).start()
    log.write({"event": "request", "n": 0})
    assert eventually(lambda: path.exists() and path.read_text())  # the writer now rests
    circular: dict[str, object] = {"event": "x"}
    circular["self"] = circular
    log.write(circular)
    log.write({"event": "request", "n": 1, "where": Path("/tmp/x"), "name": "café"})
    log.write(circular)
    log.write({"event": "request", "n": 2})
    log.close()  # one batch: bad, good, bad, good
    assert log.dropped == 2
    assert [r["n"] for r in all_records(path)] == [0, 1, 2]
    assert all_records(path)[1]["where"] == "/tmp/x"  # not JSON: written as its str()
    assert '"name": "café"' in path.read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("request log record could not be serialised") == 2


def test_a_write_that_fails_counts_its_records_as_dropped(tmp_path: Path, caplog) -> None:
    path = tmp_path / "l.jsonl"
    path.mkdir()  # a directory where the file should be: every open fails
    log = RequestLog(path, max_bytes=10_000, backups=1, batch_s=60).start()
    log.write({"event": "request", "n": 0})
    assert eventually(lambda: log.dropped == 1)
    log.write({"event": "request", "n": 1})
    log.write({"event": "request", "n": 2})
    log.close()
    assert log.dropped == 3
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "request log write failed; 1 record(s) dropped",
        "request log write failed; 2 record(s) dropped",
    ]


def line_of(n: int) -> bytes:
    record = {"event": "request", "ts": "2026-01-01T00:00:00.000Z", "n": n}
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


def test_a_file_may_be_filled_exactly_and_never_beyond(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    size = len(line_of(0))
    log = RequestLog(path, max_bytes=2 * size, backups=5, batch_s=60).start()
    log.write({"event": "request", "ts": "2026-01-01T00:00:00.000Z", "n": 0})
    assert eventually(lambda: path.exists() and path.read_text())
    for n in range(1, 7):  # one batch at close: it must be cut at the limit, between records
        log.write({"event": "request", "ts": "2026-01-01T00:00:00.000Z", "n": n})
    log.close()
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert files == {
        "l.jsonl.3": line_of(0) + line_of(1),
        "l.jsonl.2": line_of(2) + line_of(3),
        "l.jsonl.1": line_of(4) + line_of(5),
        "l.jsonl": line_of(6),
    }


def test_no_backups_means_the_full_file_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    size = len(line_of(0))
    log = RequestLog(path, max_bytes=size, backups=0, batch_s=0.01).start()
    for n in range(3):
        log.write({"event": "request", "ts": "2026-01-01T00:00:00.000Z", "n": n})
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["l.jsonl"]
    assert path.read_bytes() == line_of(2)


def test_a_log_directory_removed_while_running_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "l.jsonl"
    log = RequestLog(path, max_bytes=len(line_of(0)), backups=1, batch_s=0.01).start()
    log.write({"event": "request", "ts": "2026-01-01T00:00:00.000Z", "n": 0})
    assert eventually(lambda: path.exists() and path.read_text())
    shutil.rmtree(tmp_path / "a")  # an operator cleaned up logs/ under the running proxy
    log.write({"event": "request", "ts": "2026-01-01T00:00:00.000Z", "n": 1})
    log.close()
    assert log.dropped == 0 and path.read_bytes() == line_of(1)


def test_a_log_file_deleted_while_running_does_not_cost_records(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    log = RequestLog(path, max_bytes=len(line_of(0)), backups=0, batch_s=0.01).start()
    log.write({"event": "request", "ts": "2026-01-01T00:00:00.000Z", "n": 0})
    assert eventually(lambda: path.exists() and path.read_text())
    path.unlink()
    log.write({"event": "request", "ts": "2026-01-01T00:00:00.000Z", "n": 1})  # rotates
    log.close()
    assert log.dropped == 0 and path.read_bytes() == line_of(1)


class FullDisk:
    """A log file on a disk with ``room`` bytes left: a write takes what fits, the next one
    fails with ENOSPC, as write(2) does."""

    def __init__(self, path: Path, room: int) -> None:
        self.file = path.open("ab", buffering=0)
        self.room = room

    def write(self, data: Any) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = bytes(data[: self.room])
        self.room -= len(taken)
        return self.file.write(taken)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def test_a_full_disk_drops_whole_records_and_leaves_no_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "chat_proxy.jsonl"

    class OnAFullDisk(RequestLog):
        room = 150

        def _open(self) -> None:
            self._file = FullDisk(self.path, self.room)  # type: ignore[assignment]
            self._size = self._file.tell()

    log = OnAFullDisk(path, max_bytes=10_000_000, backups=1, batch_s=0)
    log.start()
    log.write({"event": "request", "request_id": "fits", "pad": "x" * 20})
    log.close()
    log = OnAFullDisk(path, max_bytes=10_000_000, backups=1, batch_s=0)
    log.room = 60  # room for part of the next record only
    log.start()
    log.write({"event": "request", "request_id": "lost", "pad": "y" * 100})
    log.close()
    assert log.dropped == 1
    log = OnAFullDisk(path, max_bytes=10_000_000, backups=1, batch_s=0)
    log.room = 10_000  # space again
    log.start()
    log.write({"event": "request", "request_id": "after"})
    log.close()
    ids = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]
    assert ids == ["fits", "after"]


def test_a_cut_that_fails_too_starts_the_next_batch_on_a_line_of_its_own(tmp_path: Path) -> None:
    """The disk fills mid-record and the file cannot even be cut back: the next record must
    not be glued to the partial line, and the partial line is the only thing lost."""
    path = tmp_path / "chat_proxy.jsonl"

    class Uncuttable(FullDisk):
        def truncate(self, size: int) -> int:
            raise OSError(errno.EIO, "cannot truncate")

    class Stuck(RequestLog):
        room = 40

        def _open(self) -> None:
            self._file = Uncuttable(self.path, self.room)  # type: ignore[assignment]
            self._size = self._file.tell()

    log = Stuck(path, max_bytes=10_000_000, backups=1, batch_s=0)
    log.start()
    log.write({"event": "request", "request_id": "torn", "pad": "z" * 100})
    assert eventually(lambda: log.dropped == 1)
    assert log._torn is True
    log._file.room = 10_000  # type: ignore[union-attr]
    log.write({"event": "request", "request_id": "after"})
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[0].startswith(b'{"event": "request", "request_id": "torn')  # the torn one
    assert not lines[0].endswith(b"}")
    assert json.loads(lines[1])["request_id"] == "after" and lines[2] == b""


def test_a_refusal_and_a_forwarded_request_share_one_field_list() -> None:
    from imageworks.chat_proxy.errors import InvalidRequest
    from imageworks.chat_proxy.observe.records import FIELDS, Facts, Outcome, RequestInfo, line

    error = InvalidRequest("no")
    forwarded = line(Facts.of(RequestInfo("r1", "chat", "127.0.0.1"), Outcome(error=error)))
    refused = line(
        Facts.of(RequestInfo("", "/admin/x", None), Outcome(error=error), forwarded=False)
    )
    assert list(forwarded) == [f.name for f in FIELDS if f.name not in _IMAGE_FIELDS]
    assert list(refused) == [k for k in forwarded if k != "queue_depth"]
    assert refused["status"] == forwarded["status"] == 400
    assert refused["error_message"] == "no" and refused["request_id"] == ""


_IMAGE_FIELDS = {
    "images",
    "images_resized",
    "images_fetched",
    "image_bytes_in",
    "image_bytes_out",
    "image_prep_ms",
    "messages_trimmed",
}


def test_flush_returns_once_everything_queued_before_it_is_written(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "chat_proxy.jsonl"
    log = RequestLog(path, max_bytes=10_000_000, backups=1, batch_s=60).start()
    try:
        log.write({"event": "request", "request_id": "first"})
        assert eventually(lambda: len(all_records(path)) == 1)  # written at once, then a rest
        for i in range(50):  # queued during the writer's 60 s rest
            log.write({"event": "request", "request_id": str(i)})
        started = time.monotonic()
        assert log.flush(timeout=5)
        assert time.monotonic() - started < 2  # the rest was cut short
        assert [r["request_id"] for r in all_records(path)] == ["first", *map(str, range(50))]
    finally:
        log.close()
    assert not log.flush()  # a stopped writer: nothing to wait for


def test_a_lone_surrogate_from_a_client_does_not_lose_its_record(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    log = RequestLog(path, max_bytes=10_000, backups=1).start()
    sent = json.loads('"gpt\\ud800-x"')  # a model name as a client's JSON may spell it
    log.write({"event": "request", "model": sent})
    log.close()
    assert log.dropped == 0
    (record,) = all_records(path)
    assert record["model"] == sent
