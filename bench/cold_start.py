"""Cold start of the embedded model through the proxy (issue 4).

    uv run python -m bench.cold_start [--runs 3]

Each run starts a fresh ``imageworks-chat-proxy`` process over the shipped registry and
measures: process start to the first 200 from /v1/healthz; then, for a streamed chat request
to gemma3-270m, the time to the first content token (this includes launching the llama.cpp
server and loading the model); then the same for a second, warm request.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from testkit.servers import free_port

REPO = Path(__file__).resolve().parents[1]


def first_token_s(url: str) -> float:
    body = {
        "model": "gemma3-270m",
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Tell me about cats."}],
    }
    started = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(" ", ""):
                return time.perf_counter() - started
    raise RuntimeError("no content token in the stream")


def one_run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "configs", root / "configs")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        proxy = subprocess.Popen(
            [sys.executable, "-m", "imageworks.chat_proxy.cli", "--port", str(port)],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")},
        )
        try:
            while True:
                try:
                    if httpx.get(url + "/v1/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.01)
            healthy = time.perf_counter() - started
            cold = first_token_s(url)
            warm = first_token_s(url)
        finally:
            proxy.send_signal(signal.SIGINT)
            proxy.wait(60)
        return {
            "proxy_start_to_healthy_s": healthy,
            "cold_first_token_s": cold,
            "warm_first_token_s": warm,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    summary = {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
    print(json.dumps({"runs": runs, "median": summary}, indent=2))
    print(
        f"\nmedian over {args.runs} runs: proxy healthy in {summary['proxy_start_to_healthy_s']} s;"
        f" first token cold {summary['cold_first_token_s']} s,"
        f" warm {summary['warm_first_token_s']} s"
    )


if __name__ == "__main__":
    main()
