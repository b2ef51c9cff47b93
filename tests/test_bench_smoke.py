"""The benchmark harness's quick mode works end to end (no timing is asserted: CI machines are
shared; the numbers are for docs/performance.md, produced by the full run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess


def test_quick_benchmark_runs_and_reports_every_measure(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (raw,) = tmp_path.glob("*.json")
    report = json.loads(raw.read_text())
    arms = {"direct", "proxy-uvicorn", "starlette-aiohttp"}
    for measure in ("c1_m0", "c1_m60", "ttft_s20", "stream_s20", "throughput_m60", "streams"):
        assert set(report[measure]) == arms, measure
    # Fidelity is checked even in the smoke run: every stream whole, none coalesced.
    assert report["stream_s20"]["proxy-uvicorn"]["chunks_min"] == 66
    assert report["streams"]["proxy-uvicorn"]["errors"] == 0
    assert report["stream_count"] > 100  # above aiohttp's default connection limit
    assert report["rss_mb"]["proxy-uvicorn"]["idle"] > 0
    overload = report["overload_m60"]
    assert {"proxy-uvicorn-limited", "proxy-uvicorn"} <= set(overload)
    for arm in (overload["proxy-uvicorn-limited"], overload["proxy-uvicorn"]):
        assert arm["admitted"] + arm["rejected_429"] + arm["timed_out"] == arm["sent"]
        assert arm["rejected_429"] == arm["with_retry_after"]
    assert "| c=1 M0 p50 ms |" in (tmp_path / raw.name.replace(".json", ".md")).read_text()


def test_cpu_per_request_tool_runs() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cpu_per_request",
            "--requests",
            "200",
            "--streams",
            "4",
            "--rounds",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "us of CPU per M0 request" in result.stdout


def test_crash_recovery_bench_runs_and_reports_every_measure() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.crash", "--runs", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert set(report["summary"]) == {
        "cold_start_s",
        "detected_s_median",
        "detected_s_max",
        "served_s_median",
        "served_minus_cold_s",
    }
    assert report["runs"][0]["detected_s"] < report["runs"][0]["served_s"]
    assert "kill -9 to 'crashed'" in result.stdout


def test_quick_vision_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.vision", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| 12 MP |" in result.stdout and "| 24 MP |" in result.stdout
    assert "| during image preparation |" in result.stdout


@pytest.mark.parametrize(
    ("arm", "count", "lines"),
    [
        ("tiers", ("--swaps", "2"), ("swap by stop: 2 swaps", "swap by sleep: 2 swaps")),
        ("interleaved", ("--rounds", "2"), ("interleaved without collation", "with collation")),
    ],
)
def test_swap_arms_run(arm: str, count: tuple[str, str], lines: tuple[str, str]) -> None:
    """bench.swap's issue-26 arms on the fakes: swap by stop vs by sleep, and two clients
    alternating with and without collation (each reports its figures)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.swap", "--arm", arm, *count],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in lines:
        assert line in result.stdout, result.stdout
    if arm == "tiers":
        assert "'sleep'" in result.stdout  # the sleep arm's evictions were by sleep


def test_the_paired_comparison_of_two_trees_runs(tmp_path: Path) -> None:
    """``bench.ab`` with the same tree on both sides, one short round (no timing asserted)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--b", str(REPO), "--rounds", "1", "--no-streams"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["A", "B"], result.stdout
    assert "cpu_us" in lines[1] and "(x" in lines[1] and "p50_ms" in lines[1]
