"""Request rates, latency percentiles and tokens/s from the proxy's request records
(``/admin/requests``). Plain data in, plain data out: no Streamlit, no HTTP.

Only the records' numbers, model, status and error code are used; a record never carries prompt
text, and the error message (which may quote a backend) is left out of everything shown.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# The columns of the recent-requests table: nothing that could hold prompt text.
TABLE_COLUMNS = (
    "ts",
    "model",
    "logical_name",
    "endpoint",
    "stream",
    "status",
    "error_code",
    "queue_ms",
    "load_ms",
    "ttft_ms",
    "total_ms",
    "prompt_tokens",
    "completion_tokens",
    "tokens_per_s",
)


@dataclass(frozen=True)
class Bucket:
    start: datetime
    requests: int
    rps: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    tokens_per_s: float | None  # tokens generated in the window per second of the window
    width_s: int = 10


def when(record: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every value shown was really measured)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _served(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests that got an answer: a refusal's few microseconds are no latency."""
    return [r for r in records if not r.get("error_code")]


def _numbers(records: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), int | float)]


def buckets(records: list[dict[str, Any]], width_s: int = 10) -> list[Bucket]:
    """Records grouped into ``width_s`` windows, oldest first; empty windows in between are
    kept (a gap in traffic shows as zero, not as a line across it)."""
    timed = [(t, r) for r in records if (t := when(r)) is not None]
    if not timed:
        return []
    groups: dict[int, list[dict[str, Any]]] = {}
    for moment, record in timed:
        groups.setdefault(int(moment.timestamp()) // width_s, []).append(record)
    first, last = min(groups), max(groups)
    result = []
    for key in range(first, last + 1):
        group = groups.get(key, [])
        served = _served(group)
        latency, ttft = _numbers(served, "total_ms"), _numbers(served, "ttft_ms")
        tokens = _numbers(served, "completion_tokens")
        result.append(
            Bucket(
                datetime.fromtimestamp(key * width_s, UTC),
                len(group),
                len(group) / width_s,
                percentile(latency, 50),
                percentile(latency, 95),
                percentile(ttft, 50),
                percentile(ttft, 95),
                sum(tokens) / width_s if tokens else None,
                width_s,
            )
        )
    return result


def summary(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Percentiles over the served requests given (the recent window the proxy keeps)."""
    served = _served(records)
    latency, ttft = _numbers(served, "total_ms"), _numbers(served, "ttft_ms")
    rates = _numbers(served, "tokens_per_s")
    return {
        "latency_p50_ms": percentile(latency, 50),
        "latency_p95_ms": percentile(latency, 95),
        "latency_p99_ms": percentile(latency, 99),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p95_ms": percentile(ttft, 95),
        "tokens_per_s_p50": percentile(rates, 50),
    }


def _status(value: Any) -> int:
    """An HTTP status as recorded; 0 when the record holds something else."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def errors_by_code(records: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(error code, HTTP status, count), most frequent first."""
    counts = Counter(
        (str(r["error_code"]), _status(r.get("status"))) for r in records if r.get("error_code")
    )
    return [(code, status, n) for (code, status), n in counts.most_common()]


def table(
    records: list[dict[str, Any]],
    *,
    models: list[str] | None = None,
    errors_only: bool = False,
    stream: bool | None = None,
) -> list[dict[str, Any]]:
    """The recent-requests table, filtered, newest first, with only the safe columns."""
    rows = []
    for record in records:
        if models and record.get("logical_name") not in models:
            continue
        if errors_only and not record.get("error_code"):
            continue
        if stream is not None and bool(record.get("stream")) is not stream:
            continue
        rows.append({column: record.get(column) for column in TABLE_COLUMNS})
    return rows
