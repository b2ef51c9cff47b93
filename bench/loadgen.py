"""The load generator: closed-loop latency at c=1, streaming fidelity, open-loop throughput,
and many concurrent streams. Everything is measured on the client side with perf_counter."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Latency:
    samples_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, float]:
        return {
            "n": len(self.samples_ms),
            "errors": self.errors,
            "p50_ms": round(pct(self.samples_ms, 50), 3),
            "p99_ms": round(pct(self.samples_ms, 99), 3),
        }


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=120)
    )


async def one_request(http: aiohttp.ClientSession, url: str, model: str) -> float:
    started = time.perf_counter()
    async with http.post(url + "/v1/chat/completions", json={**CHAT, "model": model}) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
    return (time.perf_counter() - started) * 1000


async def closed_loop(
    http: aiohttp.ClientSession, url: str, model: str, count: int, into: Latency
) -> None:
    for _ in range(count):
        try:
            into.samples_ms.append(await one_request(http, url, model))
        except Exception:
            into.errors += 1


@dataclass
class Stream:
    ttft_ms: float
    gaps_ms: list[float]
    chunks: int
    total_ms: float
    done: bool


async def one_stream(http: aiohttp.ClientSession, url: str, model: str = "s20") -> Stream:
    """An S20 stream: TTFT is the first content delta (the role chunk comes at once)."""
    started = time.perf_counter()
    first: float | None = None
    last: float | None = None
    gaps: list[float] = []
    chunks = 0
    done = False
    buffer = b""
    async with http.post(
        url + "/v1/chat/completions", json={**CHAT, "model": model, "stream": True}
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        async for piece in response.content.iter_any():
            now = time.perf_counter()
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                if event == b"data: [DONE]":
                    done = True
                    continue
                chunks += 1
                if b'"content": " t' in event or b'"content":" t' in event:
                    if first is None:
                        first = now
                    elif last is not None:
                        gaps.append((now - last) * 1000)
                    last = now
    return Stream(
        ((first or time.perf_counter()) - started) * 1000,
        gaps,
        chunks,
        (time.perf_counter() - started) * 1000,
        done,
    )


async def open_loop(url: str, model: str, rate: float, seconds: float) -> Latency:
    """Fire at a fixed rate regardless of answers (no coordinated omission)."""
    result = Latency()
    async with session() as http:
        tasks = []
        started = time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one_request(http, url, model)))
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, float):
                result.samples_ms.append(outcome)
            else:
                result.errors += 1
    return result


async def max_rate(url: str, *, start: float, seconds: float, ceiling: float) -> dict[str, object]:
    """Highest open-loop rate (M60) with p99 < 100 ms and no errors: double, then bisect."""
    good, bad, steps = 0.0, None, []
    rate = start
    while rate <= ceiling:
        run = await open_loop(url, "m60", rate, seconds)
        ok = run.errors == 0 and pct(run.samples_ms, 99) < 100
        steps.append({"rate": rate, "ok": ok, **run.summary()})
        if not ok:
            bad = rate
            break
        good, rate = rate, rate * 2
    for _ in range(3 if bad else 0):
        rate = (good + bad) / 2  # type: ignore[operator]
        run = await open_loop(url, "m60", rate, seconds)
        ok = run.errors == 0 and pct(run.samples_ms, 99) < 100
        steps.append({"rate": round(rate, 1), "ok": ok, **run.summary()})
        good, bad = (rate, bad) if ok else (good, rate)
    return {"max_rps": round(good, 1), "steps": steps}


async def concurrent_streams(url: str, count: int) -> dict[str, object]:
    async with session() as http:
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *[one_stream(http, url) for _ in range(count)], return_exceptions=True
        )
        elapsed = time.perf_counter() - started
    streams = [o for o in outcomes if isinstance(o, Stream)]
    errors = len(outcomes) - len(streams) + sum(1 for s in streams if not s.done)
    gaps = [g for s in streams for g in s.gaps_ms]
    return {
        "streams": count,
        "errors": errors,
        "max_gap_ms": round(max(gaps), 2) if gaps else None,
        "gap_p99_ms": round(pct(gaps, 99), 2) if gaps else None,
        "frames_per_s": round(sum(s.chunks for s in streams) / elapsed, 1),
    }


def stream_summary(streams: list[Stream]) -> dict[str, float]:
    gaps = [g for s in streams for g in s.gaps_ms]
    return {
        "n": len(streams),
        "ttft_p50_ms": round(pct([s.ttft_ms for s in streams], 50), 3),
        "ttft_p99_ms": round(pct([s.ttft_ms for s in streams], 99), 3),
        "gap_p50_ms": round(pct(gaps, 50), 3),
        "gap_p99_ms": round(pct(gaps, 99), 3),
        "chunks_min": min(s.chunks for s in streams),
        "chunks_max": max(s.chunks for s in streams),
        "total_p50_ms": round(statistics.median(s.total_ms for s in streams), 2),
        "all_done": all(s.done for s in streams),
    }


async def overload(
    url: str, model: str, rate: float, seconds: float, timeout: float = 10.0
) -> dict[str, object]:
    """Open-loop load at ``rate`` (meant: twice the measured capacity): the admitted requests'
    latency, and how the excess was turned away (429 with Retry-After) or timed out."""
    admitted: list[float] = []
    counts = {"rejected_429": 0, "with_retry_after": 0, "timed_out": 0, "other_errors": 0}

    async def one(http: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        try:
            async with http.post(
                url + "/v1/chat/completions",
                json={**CHAT, "model": model},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                await response.read()
                if response.status == 200:
                    admitted.append((time.perf_counter() - started) * 1000)
                elif response.status == 429:
                    counts["rejected_429"] += 1
                    counts["with_retry_after"] += "retry-after" in response.headers
                else:
                    counts["other_errors"] += 1
        except TimeoutError:
            counts["timed_out"] += 1
        except Exception:
            counts["other_errors"] += 1

    async with session() as http:
        tasks = []
        started = time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(http)))
        await asyncio.gather(*tasks)
    return {
        "rate": round(rate, 1),
        "sent": int(rate * seconds),
        "admitted": len(admitted),
        "admitted_p50_ms": round(pct(admitted, 50), 2),
        "admitted_p99_ms": round(pct(admitted, 99), 2),
        **counts,
    }
