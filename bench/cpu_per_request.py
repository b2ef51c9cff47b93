"""CPU time the proxy process spends per forwarded request and per stream.

    uv run python -m bench.cpu_per_request [--server uvicorn] [--requests 3000]

Latency on a shared 2-core machine moves with its neighbours; the proxy's own CPU time
(user + system, from /proc/<pid>/stat, its threads included) over a few thousand requests
does not, so this is the figure to compare when changing the request path. Same rig as
``python -m bench``: the mock and this client on core 0, the proxy alone on core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from bench import loadgen
from bench.arms import Mock, OurProxy

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


async def measure(proxy: OurProxy, requests: int, streams: int, rounds: int) -> dict[str, float]:
    assert proxy.process is not None
    pid = proxy.process.pid
    per_request, per_stream = [], []
    async with loadgen.session() as http:
        await loadgen.closed_loop(http, proxy.url, "m0", 300, loadgen.Latency())  # warm-up
        for _ in range(rounds):
            before = cpu_seconds(pid)
            await loadgen.closed_loop(http, proxy.url, "m0", requests, loadgen.Latency())
            per_request.append((cpu_seconds(pid) - before) / requests * 1e6)
            before = cpu_seconds(pid)
            await loadgen.concurrent_streams(proxy.url, streams)
            per_stream.append((cpu_seconds(pid) - before) / streams * 1e6)
    return {
        "us_per_request": round(statistics.median(per_request)),
        "us_per_stream": round(statistics.median(per_stream)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="uvicorn", choices=["uvicorn", "hypercorn"])
    parser.add_argument("--requests", type=int, default=3000, help="M0 requests a round")
    parser.add_argument("--streams", type=int, default=64, help="S20 streams a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pinned = (os.cpu_count() or 1) >= 2
    if pinned:
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory() as tmp:
        mock = Mock(0 if pinned else None)
        proxy: OurProxy | None = None
        try:
            proxy = OurProxy(mock, Path(tmp), 1 if pinned else None, args.server)
            result = asyncio.run(measure(proxy, args.requests, args.streams, args.rounds))
        finally:
            if proxy is not None:
                proxy.stop()
            mock.stop()
    print(
        f"{proxy.name}: {result['us_per_request']} us of CPU per M0 request, "
        f"{result['us_per_stream']} us per S20 stream (66 chunks); "
        f"median of {args.rounds} rounds"
    )


if __name__ == "__main__":
    main()
