"""Real vLLM (CPU) under the executor: cold start and the swap between two real models.

    scripts/real-engines.sh                      # once
    uv run python -m bench.real_engines [--runs 1]

Starts the real executor (its default template, vLLM from the real-engines environment) over a
registry of two vLLM models, SmolLM2-135M-Instruct (chat) and all-MiniLM-L6-v2 (embeddings),
then measures through ``/admin/activate``: the cold start of the chat model (spawn to healthy),
the swap to the embedding model (the chat vLLM stopped, the other started and healthy), and the
swap back; and the first chat answer's latency once warm. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
from tests.real_engine.conftest import (
    CHAT,
    CPU_ENV,
    EMBED,
    chat_entry,
    embed_entry,
    manifest_or_reason,
)

from testkit.processes import Executor, write_registry


def timed_activate(executor: Executor, model: str) -> float:
    started = time.perf_counter()
    answer = httpx.post(executor.url + "/admin/activate", json={"model": model}, timeout=600)
    answer.raise_for_status()
    return time.perf_counter() - started


def run_once(manifest: dict[str, str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_registry(root, [chat_entry(manifest), embed_entry(manifest)])
        executor = Executor(
            root,
            template="",
            env={
                **CPU_ENV,
                "IMAGEWORKS_VLLM_PYTHON": manifest["python"],
                "IMAGEWORKS_VLLM_START_TIMEOUT_S": "600",
            },
        )
        try:
            cold = timed_activate(executor, CHAT)
            base = httpx.get(executor.url + "/admin/state").json()["base_url"]
            started = time.perf_counter()
            httpx.post(
                base + "/chat/completions",
                json={
                    "model": CHAT,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 8,
                },
                timeout=60,
            ).raise_for_status()
            first_answer = time.perf_counter() - started
            to_embed = timed_activate(executor, EMBED)
            back = timed_activate(executor, CHAT)
            httpx.post(executor.url + "/admin/deactivate", json={}, timeout=60)
        finally:
            executor.stop()
    return {
        "cold_start_s": round(cold, 1),
        "first_chat_s": round(first_answer, 2),
        "swap_chat_to_embed_s": round(to_embed, 1),
        "swap_embed_to_chat_s": round(back, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    manifest, reason = manifest_or_reason()
    if manifest is None:
        raise SystemExit(reason)
    for _ in range(args.runs):
        print(json.dumps(run_once(manifest)), flush=True)


if __name__ == "__main__":
    main()
