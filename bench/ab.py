"""Two versions of the proxy side by side: paired, interleaved rounds on the bench's rig.

    uv run python -m bench.ab --b ../other-checkout [--a .] [--rounds 16] [--bare] [--no-streams]

Each tree's ``packages/proxy/src`` goes first on the proxy's ``PYTHONPATH`` (the rest of the
environment is this checkout's). Every round runs each arm in turn (the order alternating),
600 M0 requests at c=1 and 64 concurrent S20 streams; the figures are the median per arm and,
for B (and the bare arm), the median of the per-round ratio or difference to A: on a shared
machine the absolute figures drift by 20% within minutes, the paired ones far less. An A/A run
(the same tree twice) gave +-3% CPU and +-50 us p50 on this 2-core VM: smaller effects need
more rounds, or are not there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from bench import loadgen
from bench.arms import Arm, BarePassThrough, Mock, OurProxy
from bench.cpu_per_request import cpu_seconds

REQUESTS, STREAMS = 600, 64


async def measure(arms: list[Arm], rounds: int, streams: bool) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {
        a.name: {"cpu_us": [], "stream_cpu_us": [], "p50_ms": [], "p99_ms": []} for a in arms
    }
    async with loadgen.session() as http:
        for arm in arms:  # warm-up
            await loadgen.closed_loop(http, arm.url, "m0", 300, loadgen.Latency())
        for index in range(rounds):
            order = arms if index % 2 == 0 else arms[::-1]
            for arm in order:
                assert arm.process is not None
                sample, before = loadgen.Latency(), cpu_seconds(arm.process.pid)
                await loadgen.closed_loop(http, arm.url, "m0", REQUESTS, sample)
                spent = cpu_seconds(arm.process.pid) - before
                figures[arm.name]["cpu_us"].append(spent / REQUESTS * 1e6)
                figures[arm.name]["p50_ms"].append(loadgen.pct(sample.samples_ms, 50))
                figures[arm.name]["p99_ms"].append(loadgen.pct(sample.samples_ms, 99))
            for arm in order if streams else ():
                assert arm.process is not None
                before = cpu_seconds(arm.process.pid)
                await loadgen.concurrent_streams(arm.url, STREAMS)
                spent = cpu_seconds(arm.process.pid) - before
                figures[arm.name]["stream_cpu_us"].append(spent / STREAMS * 1e6)
    return figures


def summary(figures: dict[str, dict[str, list[float]]]) -> list[str]:
    base = figures["A"]
    lines = []
    for name, own in figures.items():
        parts = [name]
        for key in ("cpu_us", "stream_cpu_us"):
            if own[key]:
                paired = statistics.median(v / w for v, w in zip(own[key], base[key], strict=True))
                parts.append(f"{key} {statistics.median(own[key]):.0f} (x{paired:.3f})")
        for key in ("p50_ms", "p99_ms"):
            paired = statistics.median(v - w for v, w in zip(own[key], base[key], strict=True))
            parts.append(f"{key} {statistics.median(own[key]):.3f} ({paired * 1000:+.0f} us)")
        lines.append("  ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default=".", help="tree A (the baseline)")
    parser.add_argument("--b", required=True, help="tree B")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--bare", action="store_true", help="the bare arm beside them")
    parser.add_argument("--no-streams", action="store_true")
    args = parser.parse_args()
    pinned = (os.cpu_count() or 1) >= 2
    if pinned:
        os.sched_setaffinity(0, {0})
    core = 1 if pinned else None
    with tempfile.TemporaryDirectory() as tmp:
        mock = Mock(0 if pinned else None)
        arms: list[Arm] = []
        try:
            for name, tree in (("A", args.a), ("B", args.b)):
                source = Path(tree).resolve() / "packages" / "proxy" / "src"
                settings = {"PYTHONPATH": str(source)}
                arms.append(
                    OurProxy(mock, Path(tmp), core, "uvicorn", name=name, settings=settings)
                )
            if args.bare:
                arms.append(BarePassThrough(mock, core))
            figures = asyncio.run(measure(arms, args.rounds, not args.no_streams))
        finally:
            for arm in arms:
                arm.stop()
            mock.stop()
    print("\n".join(summary(figures)))


if __name__ == "__main__":
    main()
