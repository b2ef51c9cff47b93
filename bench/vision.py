"""Image preparation: time per photograph, bytes and image tokens saved, and whether text
requests wait while photographs are prepared (issue 17; a benchmark, not a test).

    uv run python -m bench.vision [--rounds 30] [--quick]

1. Preparation: 12 MP (4000x3000, ~6 MB) and 24 MP (6000x4000) camera JPEGs (made here, with
   grain so they compress like photographs), each fitted to the default target (1536 px) by
   ``images.prepare_inline`` exactly as the proxy does it, data URL in and data URL out, in
   this process pinned to one core. Image tokens are estimated for a Qwen2.5-VL class model
   (one token per 28x28 pixels after its processor's own resize, capped at 12.8 MP).
2. The event loop: a proxy process (pinned to another core where there is one) in front of a
   fake vLLM; text requests one after another, first alone, then while ten 24 MP photographs
   are being prepared (sent at once by a separate process). The added latency of the text
   requests is the figure: it stays near zero only if image work never holds the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from imageworks.chat_proxy.vision.images import Fit, prepare_inline
from testkit.fake_engine import FakeEngine, entry_for
from testkit.images import data_url, jpeg_bytes, photo
from testkit.processes import start_proxy
from testkit.servers import AiohttpServer

TARGET = 1536
SIZES = {"12 MP": (4000, 3000), "24 MP": (6000, 4000)}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def qwen_tokens(width: int, height: int, factor: int = 28, max_pixels: int = 12_845_056) -> int:
    """Image tokens of a Qwen2.5-VL class model (its processor's smart_resize)."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    return (h // factor) * (w // factor)


def pin(core: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[core % len(cores)]})


def photograph(width: int, height: int) -> bytes:
    return jpeg_bytes(photo(width, height, grain=40), quality=95, orientation=6)


def preparation(rounds: int) -> dict[str, dict[str, float]]:
    pin(0)
    results: dict[str, dict[str, float]] = {}
    for label, (width, height) in SIZES.items():
        raw = photograph(width, height)
        url = data_url(raw, "image/jpeg")
        fit = Fit(TARGET, 90)
        prepare_inline(url, fit)  # warm up (imports, allocator)
        times, cpu = [], []
        for _ in range(rounds):
            started, started_cpu = time.perf_counter(), time.thread_time()
            prepared = prepare_inline(url, fit)
            times.append((time.perf_counter() - started) * 1000)
            cpu.append((time.thread_time() - started_cpu) * 1000)
        scale = TARGET / max(width, height)
        out_w, out_h = round(height * scale), round(width * scale)  # upright: portrait
        results[label] = {
            "bytes_in": len(raw),
            "bytes_out": prepared.bytes_out,
            "p50_ms": statistics.median(times),
            "p99_ms": percentile(times, 99),
            # CPU time of this thread: the cost on one core, whatever else the machine runs.
            "cpu_p50_ms": statistics.median(cpu),
            "cpu_p99_ms": percentile(cpu, 99),
            "tokens_in": qwen_tokens(height, width),
            "tokens_out": qwen_tokens(out_w, out_h),
        }
    return results


def send_images(url: str, body: bytes, count: int, started: Any) -> None:
    """In a process of its own: ``count`` image requests at once (the bench's own client
    must not compete with the text requests it measures for one interpreter)."""

    async def run() -> None:
        async with aiohttp.ClientSession() as session:

            async def one() -> None:
                async with session.post(
                    url, data=body, headers={"content-type": "application/json"}
                ) as response:
                    assert response.status == 200, await response.text()
                    await response.read()

            started.set()
            await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(run())


async def text_latencies(
    session: aiohttp.ClientSession, url: str, until: Any = None, count: int = 0
) -> list[float]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    latencies = []
    while (until is not None and until()) or len(latencies) < count:
        started = time.perf_counter()
        async with session.post(url, json=body) as response:
            await response.read()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def loop_blocking(images: int) -> dict[str, Any]:
    engine = FakeEngine("vllm")
    server = AiohttpServer(engine.app())
    with tempfile.TemporaryDirectory() as tmp:
        entry = entry_for("m", server.url, capabilities={"text": True, "vision": True})
        process, proxy_url = start_proxy(Path(tmp), [entry])
        try:
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(process.pid, {cores[-1]})
            chat = proxy_url + "/v1/chat/completions"
            raw = photograph(*SIZES["24 MP"])
            part = {"type": "image_url", "image_url": {"url": data_url(raw, "image/jpeg")}}
            body = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
            payload = json.dumps(body).encode()

            async def measure() -> dict[str, Any]:
                async with aiohttp.ClientSession() as session:
                    await text_latencies(session, chat, count=20)  # warm up
                    alone = await text_latencies(session, chat, count=200)
                    context = multiprocessing.get_context("spawn")
                    started = context.Event()
                    sender = context.Process(
                        target=send_images, args=(chat, payload, images, started)
                    )
                    sender.start()
                    await asyncio.get_running_loop().run_in_executor(None, started.wait)
                    began = time.perf_counter()
                    during = await text_latencies(session, chat, until=sender.is_alive)
                    batch_s = time.perf_counter() - began
                    sender.join()
                    return {
                        "alone": alone,
                        "during": during,
                        "batch_s": batch_s,
                        "exit": sender.exitcode,
                    }

            result = asyncio.run(measure())
        finally:
            process.terminate()
            process.communicate(timeout=30)
            server.stop()
    result["image_bytes"] = len(raw)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 2 images: a smoke run")
    args = parser.parse_args()
    rounds, images = (3, 2) if args.quick else (args.rounds, args.images)

    print(f"Preparation, one core, target {TARGET} px, {rounds} rounds:")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(
        "| image | bytes in | bytes out | wall p50 ms | wall p99 ms | CPU p50 ms | CPU p99 ms "
        "| image tokens in -> out |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in preparation(rounds).items():
        print(
            f"| {label} | {r['bytes_in']:,} | {r['bytes_out']:,} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['cpu_p50_ms']:.0f} | {r['cpu_p99_ms']:.0f} | "
            f"{r['tokens_in']:,} -> {r['tokens_out']:,} |"
        )
    blocking = loop_blocking(images)
    assert blocking["exit"] == 0, "the image requests failed"
    alone, during = blocking["alone"], blocking["during"]
    print(
        f"\nText requests while {images} x {blocking['image_bytes']:,}-byte 24 MP photographs "
        f"were prepared ({blocking['batch_s']:.2f} s for the batch):"
    )
    print("| text requests | n | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    for label, values in (("alone", alone), ("during image preparation", during)):
        print(
            f"| {label} | {len(values)} | {statistics.median(values):.2f} | "
            f"{percentile(values, 99):.2f} | {max(values):.2f} |"
        )


if __name__ == "__main__":
    main()
