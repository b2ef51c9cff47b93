"""CPU time the proxy process spends per forwarded request and per stream.

    uv run python -m bench.cpu_per_request [--server uvicorn] [--requests 3000] [--bare]

Latency on a shared 2-core machine moves with its neighbours; the proxy's own CPU time
(user + system, from /proc/<pid>/stat, its threads included) over a few thousand requests
does not, so this is the figure to compare when changing the request path. Same rig as
``python -m bench``: the mock and this client on core 0, the proxy alone on core 1. ``--bare``
measures the bare Starlette + aiohttp pass-through (``bench.bare_passthrough``) beside it,
round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.arms import Arm, BarePassThrough, Mock, OurProxy

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


async def measure(arms: list[Arm], requests: int, streams: int, rounds: int) -> dict[str, Any]:
    per_request: dict[str, list[float]] = {arm.name: [] for arm in arms}
    per_stream: dict[str, list[float]] = {arm.name: [] for arm in arms}
    async with loadgen.session() as http:
        for arm in arms:  # warm-up
            await loadgen.closed_loop(http, arm.url, "m0", 300, loadgen.Latency())
        for _ in range(rounds):
            for arm in arms:
                assert arm.process is not None
                pid = arm.process.pid
                before = cpu_seconds(pid)
                await loadgen.closed_loop(http, arm.url, "m0", requests, loadgen.Latency())
                per_request[arm.name].append((cpu_seconds(pid) - before) / requests * 1e6)
                before = cpu_seconds(pid)
                await loadgen.concurrent_streams(arm.url, streams)
                per_stream[arm.name].append((cpu_seconds(pid) - before) / streams * 1e6)
    return {
        arm.name: {
            "us_per_request": round(statistics.median(per_request[arm.name])),
            "us_per_stream": round(statistics.median(per_stream[arm.name])),
        }
        for arm in arms
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="uvicorn", choices=["uvicorn", "hypercorn"])
    parser.add_argument("--requests", type=int, default=3000, help="M0 requests a round")
    parser.add_argument("--streams", type=int, default=64, help="S20 streams a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare", action="store_true", help="measure the bare arm beside it")
    args = parser.parse_args()
    pinned = (os.cpu_count() or 1) >= 2
    if pinned:
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory() as tmp:
        mock = Mock(0 if pinned else None)
        arms: list[Arm] = []
        try:
            arms.append(OurProxy(mock, Path(tmp), 1 if pinned else None, args.server))
            if args.bare:
                arms.append(BarePassThrough(mock, 1 if pinned else None))
            result = asyncio.run(measure(arms, args.requests, args.streams, args.rounds))
        finally:
            for arm in arms:
                arm.stop()
            mock.stop()
    for name, figures in result.items():
        print(
            f"{name}: {figures['us_per_request']} us of CPU per M0 request, "
            f"{figures['us_per_stream']} us per S20 stream (66 chunks); "
            f"median of {args.rounds} rounds"
        )


if __name__ == "__main__":
    main()
