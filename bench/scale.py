"""Added latency of going beyond one box (issue 15), all arms in the same run, interleaved:

    uv run python -m bench.scale [--rounds 8] [--per-round 40] [--no-ray]

- ``direct``: the mock backend (``m0``: a tiny chat.completion at once);
- ``proxy``: one proxy over the mock (box B);
- ``peer-hop``: another proxy (box A) that has no such model and forwards to B as a peer;
- ``serve-direct``: a Ray Serve application (``testkit.ray_app``, relaying to the same mock) on a
  local CPU Ray head, called at its route prefix;
- ``proxy-ray``: the same application through a proxy with a ``backend: "ray"`` entry.

Closed loop at c=1; each figure is the median over rounds of each round's p50/p99. The ratios
compare each arm with the one it adds a hop to (peer-hop / proxy, proxy-ray / serve-direct).
Not pinned to cores: this measures the hop, not the proxy's CPU cost (``python -m bench`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen
from bench.arms import Mock
from testkit.processes import proxy_env, write_registry
from testkit.ray_cluster import RayHead, RayUnavailable
from testkit.servers import free_port, wait_for_port

MODEL = "m0"
QUIET = ("--log-level", "warning")


def entry(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "capabilities": {"text": True}, **fields}


def start_proxy(
    root: Path, entries: list[dict[str, Any]], **env: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The proxy's command line over a registry of its own, quiet (its output is not read)."""
    write_registry(root, entries)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "imageworks.chat_proxy.cli", *QUIET, "--port", str(port)],
        cwd=root,
        env=proxy_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout=60)
    return process, f"http://127.0.0.1:{port}"


def warm(url: str, model: str, prefix: str = "") -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.monotonic() + 600
    while True:
        answer = httpx.post(url + prefix + "/v1/chat/completions", json=body, timeout=600)
        if answer.status_code == 200 or time.monotonic() > deadline:
            answer.raise_for_status()
            return
        time.sleep(0.5)


async def measure(arms: dict[str, str], rounds: int, per_round: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    async with loadgen.session() as http:
        for _ in range(rounds):
            for name, url in arms.items():  # interleaved: every arm sees the same conditions
                latency = loadgen.Latency()
                await loadgen.closed_loop(http, url, MODEL, per_round, latency)
                results[name].append(latency.summary())
    return {
        name: {
            "p50_ms": round(statistics.median(r["p50_ms"] for r in rounds_), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in rounds_), 3),
            "errors": sum(int(r["errors"]) for r in rounds_),
        }
        for name, rounds_ in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=40)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray arms")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    mock = Mock(core=None)
    processes = []
    head: RayHead | None = None
    try:
        direct = entry(MODEL, backend="openai", backend_config={"base_url": mock.url + "/v1"})
        box_b, url_b = start_proxy(work / "b", [direct])
        processes.append(box_b)
        peers = json.dumps([{"name": "b", "url": url_b}])
        box_a, url_a = start_proxy(work / "a", [], CHAT_PROXY_PEERS=peers)
        processes.append(box_a)
        arms = {"direct": mock.url, "proxy": url_b, "peer-hop": url_a}
        warm(url_a, MODEL)
        ray_note = None
        if not args.no_ray:
            try:
                head = RayHead().start()
            except RayUnavailable as exc:
                ray_note = f"Ray arms skipped: {exc}"
            if head is not None:
                on_ray = entry(
                    MODEL,
                    backend="ray",
                    ray={"import_path": "testkit.ray_app:build", "args": {"engine_url": mock.url}},
                )
                box_c, url_c = start_proxy(
                    work / "c",
                    [on_ray],
                    CHAT_PROXY_RAY_DASHBOARD_URL=head.dashboard_url,
                    CHAT_PROXY_RAY_SERVE_URL=head.serve_url,
                )
                processes.append(box_c)
                warm(url_c, MODEL)  # deploys the application
                arms["serve-direct"] = head.serve_url + "/imageworks-m0"
                arms["proxy-ray"] = url_c
        figures = asyncio.run(measure(arms, args.rounds, args.per_round))
        ratios = {"peer-hop / proxy": _ratio(figures, "peer-hop", "proxy")}
        if "proxy-ray" in figures:
            ratios["proxy-ray / serve-direct"] = _ratio(figures, "proxy-ray", "serve-direct")
        report = {"figures": figures, "ratios": ratios, "note": ray_note}
        print(json.dumps(report, indent=2))
    finally:
        for process in processes:
            process.terminate()
            process.wait(60)
        if head is not None:
            head.stop()
        mock.stop()


def _ratio(figures: dict[str, Any], arm: str, base: str) -> dict[str, float]:
    return {
        q: round(figures[arm][q] / figures[base][q], 2)
        for q in ("p50_ms", "p99_ms")
        if figures[base][q]
    }


if __name__ == "__main__":
    main()
