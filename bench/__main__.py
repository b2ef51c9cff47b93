"""The performance harness: our proxy against a direct connection and LiteLLM, same run.

    uv run python -m bench            # full run, a few minutes; installs LiteLLM on first use
    uv run python -m bench --quick    # < 60 s smoke run (CI): checks that everything works
    uv run python -m bench --soak 600 # add a 10-minute soak for RSS growth

Arms: direct (the mock), the proxy under uvicorn (the default) and hypercorn, a bare Starlette +
aiohttp pass-through (the design card's stack with no features), LiteLLM; then an overload
arm: the default proxy with a concurrency limit, and without one, at twice the capacity the
default proxy was measured to have (M60).

Rig (performance-anchors.md §6): the mock and this load generator on core 0, each proxy on
core 1 (taskset), one worker. Arms are interleaved round by round, the order reversed every
other round; latency figures are the median over rounds of each round's percentile. Writes
``bench/results/<stamp>.json`` (raw percentiles per arm, ratios, versions, machine) and ``.md``
(the table), and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.arms import LITELLM_VERSION, Arm, BarePassThrough, LiteLLM, Mock, OurProxy

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {
        name: version(name)
        for name in ("starlette", "uvicorn", "httptools", "hypercorn", "aiohttp", "uvloop")
    }
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "versions": versions,
        "litellm": LITELLM_VERSION,
        "load_tool": "bench.loadgen (aiohttp)",
    }


def in_turn(arms: list[Arm], index: int) -> list[Arm]:
    """The arms in round ``index``'s order: reversed every other round, so that no arm always
    runs right after the one before it (the direct arm leaves the proxies' core idle, and the
    arm after it met a cold core every round)."""
    return arms if index % 2 == 0 else arms[::-1]


async def latency_rounds(arms: list[Arm], rounds: int, per_round: int) -> dict[str, Any]:
    per_arm: dict[str, list[dict[str, float]]] = {a.name: [] for a in arms}
    async with loadgen.session() as http:
        for index in range(rounds):
            for arm in in_turn(arms, index):
                sample = loadgen.Latency()
                await loadgen.closed_loop(http, arm.url, "m0", per_round, sample)
                per_arm[arm.name].append(sample.summary())
    return {
        name: {
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
            "errors": sum(int(r["errors"]) for r in runs),
            "rounds": runs,
        }
        for name, runs in per_arm.items()
    }


async def m60_rounds(arms: list[Arm], rounds: int, per_round: int) -> dict[str, Any]:
    per_arm: dict[str, list[float]] = {a.name: [] for a in arms}
    async with loadgen.session() as http:
        for index in range(rounds):
            for arm in in_turn(arms, index):
                sample = loadgen.Latency()
                await loadgen.closed_loop(http, arm.url, "m60", per_round, sample)
                per_arm[arm.name].append(loadgen.pct(sample.samples_ms, 99))
    return {name: {"p99_ms": round(statistics.median(v), 3)} for name, v in per_arm.items()}


async def stream_rounds(arms: list[Arm], rounds: int, per_round: int) -> dict[str, Any]:
    streams: dict[str, list[loadgen.Stream]] = {a.name: [] for a in arms}
    async with loadgen.session() as http:
        for index in range(rounds):
            for arm in in_turn(arms, index):
                for _ in range(per_round):
                    streams[arm.name].append(await loadgen.one_stream(http, arm.url))
    return {name: loadgen.stream_summary(s) for name, s in streams.items()}


async def concurrent_rounds(arms: list[Arm], count: int, rounds: int) -> dict[str, Any]:
    """``count`` concurrent S20 streams per arm, ``rounds`` times, interleaved: one run's frame
    rate moves by +-5% between runs of the same arm (its ramp-up is most of what it measures),
    so each arm's figure is its median run; its errors are summed and its gap is the worst."""
    runs: dict[str, list[dict[str, Any]]] = {a.name: [] for a in arms}
    for index in range(rounds):
        for arm in in_turn(arms, index):
            runs[arm.name].append(await loadgen.concurrent_streams(arm.url, count))
    out: dict[str, Any] = {}
    for name, results in runs.items():
        rates = [r["frames_per_s"] for r in results]
        gaps = [r["max_gap_ms"] for r in results if r["max_gap_ms"] is not None]
        out[name] = {
            "streams": count,
            "rounds": len(results),
            "errors": sum(r["errors"] for r in results),
            "max_gap_ms": max(gaps) if gaps else None,
            "frames_per_s": statistics.median(rates),
            "frames_per_s_each": rates,
        }
    return out


async def ttft_rounds(arms: list[Arm], rounds: int, per_round: int) -> dict[str, Any]:
    """Time to first token on the opening of S20 (``s20-first``), many samples per arm."""
    samples: dict[str, list[float]] = {a.name: [] for a in arms}
    async with loadgen.session() as http:
        for index in range(rounds):
            for arm in in_turn(arms, index):
                for _ in range(per_round):
                    stream = await loadgen.one_stream(http, arm.url, "s20-first")
                    samples[arm.name].append(stream.ttft_ms)
    return {
        name: {
            "n": len(values),
            "p50_ms": round(loadgen.pct(values, 50), 3),
            "p99_ms": round(loadgen.pct(values, 99), 3),
        }
        for name, values in samples.items()
    }


def added(result: dict[str, Any], arm: str, key: str, base: str = "direct") -> float | None:
    if arm not in result or base not in result:
        return None
    return round(result[arm][key] - result[base][key], 3)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def table(report: dict[str, Any]) -> str:
    c1, st, ft, tp, conc, rss = (
        report[k]
        for k in ("c1_m0", "stream_s20", "ttft_s20", "throughput_m60", "streams", "rss_mb")
    )
    arms = list(c1)
    rows = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]

    def row(label: str, values: list[Any]) -> None:
        rows.append(
            f"| {label} | " + " | ".join("—" if v is None else str(v) for v in values) + " |"
        )

    row("c=1 M0 p50 ms", [c1[a]["p50_ms"] for a in arms])
    row("c=1 M0 p99 ms", [c1[a]["p99_ms"] for a in arms])
    row("added p50 ms (vs direct)", [added(c1, a, "p50_ms") for a in arms])
    row("added p99 ms (vs direct)", [added(c1, a, "p99_ms") for a in arms])
    row("c=1 M60 p99 ms", [report["c1_m60"].get(a, {}).get("p99_ms") for a in arms])
    row("S20 TTFT p50 ms", [ft.get(a, {}).get("p50_ms") for a in arms])
    row("S20 added TTFT p50 ms", [added(ft, a, "p50_ms") for a in arms])
    row("S20 added TTFT p99 ms", [added(ft, a, "p99_ms") for a in arms])
    row("S20 inter-chunk gap p99 ms", [st.get(a, {}).get("gap_p99_ms") for a in arms])
    row("S20 added gap p99 ms", [added(st, a, "gap_p99_ms") for a in arms])
    row("S20 chunks out (in: 66)", [st.get(a, {}).get("chunks_min") for a in arms])
    row("M60 max RPS (p99<100 ms, 0 errors)", [tp.get(a, {}).get("max_rps") for a in arms])
    row(
        f"{report['stream_count']} concurrent S20 streams: errors",
        [conc.get(a, {}).get("errors") for a in arms],
    )
    row("  frames/s", [conc.get(a, {}).get("frames_per_s") for a in arms])
    row("  max gap ms", [conc.get(a, {}).get("max_gap_ms") for a in arms])
    row("RSS idle MB", [rss.get(a, {}).get("idle") for a in arms])
    row("RSS after load MB", [rss.get(a, {}).get("loaded") for a in arms])
    if "soak" in report:
        row("RSS after soak MB", [report["soak"].get(a) for a in arms])
    lines = ["\n".join(rows), "", "Ratios (budgets from issues 7 and 14):", ""]
    for name, value in report["ratios"].items():
        lines.append(f"- {name}: {value}")
    if "overload_m60" in report:
        o = report["overload_m60"]
        lines += [
            "",
            f"Overload (M60, open loop at twice the default proxy's capacity of "
            f"{o['capacity_rps']} RPS; max_concurrency = queue = {o['limit']}):",
            "",
        ]
        lines.append(
            "| arm | rate | sent | admitted | admitted p50 ms | admitted p99 ms | 429 "
            "| with Retry-After | timed out (10 s) | other errors |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for name, o in report["overload_m60"].items():
            if not isinstance(o, dict):
                continue
            lines.append(
                f"| {name} | {o['rate']} | {o['sent']} | {o['admitted']} | "
                f"{o['admitted_p50_ms']} | {o['admitted_p99_ms']} | {o['rejected_429']} | "
                f"{o['with_retry_after']} | {o['timed_out']} | {o['other_errors']} |"
            )
    return "\n".join(lines)


def ratios(report: dict[str, Any], proxy: str) -> dict[str, Any]:
    c1, st, ft, tp = (report[k] for k in ("c1_m0", "stream_s20", "ttft_s20", "throughput_m60"))
    out: dict[str, Any] = {
        "added_p50_ms (budget <= 0.6)": added(c1, proxy, "p50_ms"),
        "added_p99_ms (budget <= 1.0)": added(c1, proxy, "p99_ms"),
        "m60_p99_over_direct (budget <= 1.03)": ratio(
            report["c1_m60"][proxy]["p99_ms"], report["c1_m60"]["direct"]["p99_ms"]
        ),
        "added_ttft_p50_ms (budget <= 0.6)": added(ft, proxy, "p50_ms"),
        "added_gap_p99_ms (budget <= 0.5)": added(st, proxy, "gap_p99_ms"),
        "chunks_out_equal_in": st[proxy]["chunks_min"]
        == st[proxy]["chunks_max"]
        == st["direct"]["chunks_min"],
        f"{report['stream_count']}_streams_errors (budget 0)": report["streams"]
        .get(proxy, {})
        .get("errors"),
        f"{report['stream_count']}_streams_frames_vs_direct (budget >= 0.95)": ratio(
            report["streams"].get(proxy, {}).get("frames_per_s"),
            report["streams"].get("direct", {}).get("frames_per_s"),
        ),
        "idle_rss_mb (budget <= 80)": report["rss_mb"].get(proxy, {}).get("idle"),
    }
    if "starlette-aiohttp" in c1:
        bare = "starlette-aiohttp"
        out["p50_minus_bare_starlette_aiohttp_ms (budget <= 0.1)"] = added(
            c1, proxy, "p50_ms", base=bare
        )
        out["added_p50_vs_bare_starlette_aiohttp (budget < 1)"] = ratio(
            added(c1, proxy, "p50_ms"), added(c1, bare, "p50_ms")
        )
        out["added_p99_vs_bare_starlette_aiohttp (budget < 1)"] = ratio(
            added(c1, proxy, "p99_ms"), added(c1, bare, "p99_ms")
        )
    if "litellm" in c1:
        out["added_p50_vs_litellm (budget <= 0.35)"] = ratio(
            added(c1, proxy, "p50_ms"), added(c1, "litellm", "p50_ms")
        )
        out["added_p99_vs_litellm (budget <= 0.35)"] = ratio(
            added(c1, proxy, "p99_ms"), added(c1, "litellm", "p99_ms")
        )
        out["throughput_vs_litellm (budget >= 3)"] = ratio(
            tp.get(proxy, {}).get("max_rps"), tp.get("litellm", {}).get("max_rps")
        )
    return out


async def run(
    args: argparse.Namespace,
    arms: list[Arm],
    proxies: list[Arm],
    limited_proxy: Callable[[int], Arm],
    overload_arms: list[Arm],
) -> dict[str, Any]:
    quick = args.quick
    report: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    report["rss_mb"] = {a.name: {"idle": a.rss()} for a in proxies}
    await latency_rounds(arms, 1, 20 if quick else 200)  # warm-up, discarded
    report["c1_m0"] = await latency_rounds(arms, 3 if quick else 10, 30 if quick else 100)
    report["c1_m60"] = await m60_rounds(arms, 1 if quick else 5, 10 if quick else 60)
    report["ttft_s20"] = await ttft_rounds(arms, 2 if quick else 10, 3 if quick else 10)
    report["stream_s20"] = await stream_rounds(arms, 1 if quick else 3, 1 if quick else 4)
    report["throughput_m60"] = {}
    for arm in arms:
        report["throughput_m60"][arm.name] = await loadgen.max_rate(
            arm.url,
            start=50 if quick else 100,
            seconds=1 if quick else 4,
            ceiling=100 if quick else 6400,
        )
    count = args.streams or (120 if quick else 256)
    report["stream_count"] = count
    report["streams"] = await concurrent_rounds(arms, count, 1 if quick else 3)
    for arm in proxies:
        report["rss_mb"][arm.name]["loaded"] = arm.rss()
    # Overload: twice the capacity just measured, against the default proxy with a
    # concurrency limit sized to what is in flight at capacity (M60 answers in 60 ms), its
    # queue as long, and against the same proxy with no limit.
    capacity = max(float(report["throughput_m60"][proxies[0].name]["max_rps"]), 50.0)
    limit = args.overload_limit or max(4, round(capacity * 0.065))
    limited = limited_proxy(limit)
    overload_arms.append(limited)
    report["overload_m60"] = {"capacity_rps": capacity, "limit": limit}
    for arm in (limited, proxies[0]):
        report["overload_m60"][arm.name] = await loadgen.overload(
            arm.url, "m60", 2 * capacity, 1 if quick else 10
        )
    if args.soak:
        report["soak"] = await soak(proxies, args.soak)
    report["ratios"] = {
        p.name: ratios(report, p.name)
        for p in proxies
        if p.name not in ("litellm", "starlette-aiohttp")
    }
    return report


async def soak(proxies: list[Arm], seconds: float) -> dict[str, float | None]:
    """Steady M0 + S20 load on every proxy for ``seconds``; RSS at the end."""
    deadline = time.monotonic() + seconds
    async with loadgen.session() as http:
        while time.monotonic() < deadline:
            for arm in proxies:
                await loadgen.closed_loop(http, arm.url, "m0", 50, loadgen.Latency())
                await loadgen.one_stream(http, arm.url)
    return {arm.name: arm.rss() for arm in proxies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a < 60 s smoke run")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM arm")
    parser.add_argument("--streams", type=int, help="concurrent streams (default 256; quick 120)")
    parser.add_argument("--soak", type=float, default=0, help="seconds of soak for RSS growth")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--overload-limit",
        type=int,
        default=0,
        help="max_concurrency (and queue) of the overload arm's proxy (default: what is in "
        "flight at the measured capacity)",
    )
    args = parser.parse_args()
    pinned = (os.cpu_count() or 1) >= 2
    if pinned:
        os.sched_setaffinity(0, {0})  # the load generator shares core 0 with the mock
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        mock = Mock(0 if pinned else None)
        arms: list[Arm] = [mock]
        overload_arms: list[Arm] = []
        try:
            arms.append(OurProxy(mock, workdir, 1 if pinned else None, "uvicorn"))  # default
            arms.append(BarePassThrough(mock, 1 if pinned else None))
            if not args.quick:
                arms.append(OurProxy(mock, workdir, 1 if pinned else None, "hypercorn"))
                arms.append(
                    OurProxy(mock, workdir, 1 if pinned else None, "hypercorn", loop="asyncio")
                )
                if not args.no_litellm:
                    arms.append(
                        LiteLLM(
                            mock,
                            workdir,
                            1 if pinned else None,
                            REPO / "bench" / ".venvs" / f"litellm-{LITELLM_VERSION}",
                        )
                    )
            proxies = arms[1:]

            def limited_proxy(limit: int) -> Arm:
                return OurProxy(
                    mock,
                    workdir,
                    1 if pinned else None,
                    "uvicorn",
                    name="proxy-uvicorn-limited",
                    settings={
                        "CHAT_PROXY_MAX_CONCURRENCY": str(limit),
                        "CHAT_PROXY_MAX_QUEUE": str(limit),
                    },
                )

            report = asyncio.run(run(args, arms, proxies, limited_proxy, overload_arms))
        finally:
            for arm in reversed([*arms, *overload_arms]):
                arm.stop()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["pinned"] = pinned
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"{stamp}.json").write_text(json.dumps(report, indent=2))
    markdown = table(report)
    (args.out / f"{stamp}.md").write_text(markdown + "\n")
    print(markdown)
    print(
        f"\n{report['mode']} run in {report['seconds']} s; raw results in "
        f"{args.out / (stamp + '.json')}"
    )
    failures = [
        (arm, k)
        for arm, values in report["ratios"].items()
        for k, v in values.items()
        if k.startswith(("chunks_out", f"{report['stream_count']}_streams_errors"))
        and v not in (True, 0)
    ]
    if failures:  # correctness, not speed: a cut or coalesced stream fails even the smoke run
        raise SystemExit(f"stream fidelity failed: {failures}")


if __name__ == "__main__":
    main()
