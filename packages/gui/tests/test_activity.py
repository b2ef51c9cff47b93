"""The Activity page's arithmetic over request records (plain data, no Streamlit)."""

from __future__ import annotations

from imageworks.gui import activity


def record(ts: str, **fields: object) -> dict[str, object]:
    return {"ts": ts, "logical_name": "m", "stream": False, "status": 200, **fields}


RECORDS = [
    record("2026-12-01T10:00:01.000Z", total_ms=100.0, ttft_ms=10.0, completion_tokens=20),
    record("2026-12-01T10:00:05.000Z", total_ms=300.0, ttft_ms=30.0, completion_tokens=40),
    record("2026-12-01T10:00:31.000Z", total_ms=200.0, ttft_ms=20.0, stream=True),
    record("2026-12-01T10:00:32.000Z", total_ms=0.5, status=404, error_code="err_model_not_found"),
]


def test_windows_keep_gaps_and_leave_refusals_out_of_latency() -> None:
    windows = activity.buckets(RECORDS, 10)
    assert [w.requests for w in windows] == [2, 0, 0, 2]  # the quiet 20 s show as zero
    assert windows[0].rps == 0.2 and windows[0].tokens_per_s == 6.0  # 60 tokens in 10 s
    assert windows[0].latency_p50_ms == 100.0 and windows[0].latency_p95_ms == 300.0
    assert windows[1].latency_p50_ms is None
    assert windows[3].latency_p50_ms == 200.0  # the 404's half millisecond is no latency


def test_summary_errors_and_table_filters() -> None:
    stats = activity.summary(RECORDS)
    assert stats["latency_p50_ms"] == 200.0 and stats["ttft_p95_ms"] == 30.0
    assert activity.errors_by_code(RECORDS) == [("err_model_not_found", 404, 1)]
    assert len(activity.table(RECORDS, errors_only=True)) == 1
    assert len(activity.table(RECORDS, stream=True)) == 1
    assert activity.table(RECORDS, models=["other"]) == []
    prompt = {**RECORDS[0], "error_message": "echo: my secret prompt", "messages": ["x"]}
    (row,) = activity.table([prompt])
    assert "error_message" not in row and "messages" not in row
    assert activity.percentile([], 50) is None
    assert activity.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
