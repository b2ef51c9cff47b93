"""N clients across two models that share one GPU slot (the executor), so every change of
model is a swap: no request may fail and no stream may be cut.

The executor launches fake engines as real processes (fast to start), so the test exercises
real process starts, stops, health waits and draining many times in a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest

from testkit.fake_engine import sse_events
from testkit.processes import FAKE_ENGINE_TEMPLATE, Executor

REPO = Path(__file__).resolve().parents[1]
CLIENTS, ROUNDS = 6, 4
pytestmark = pytest.mark.subprocess


def entry(name: str) -> dict[str, object]:
    # served id "slow": ten content chunks 50 ms apart, so streams overlap the swaps
    return {
        "name": name,
        "backend": "vllm",
        "served_model_id": "slow",
        "backend_config": {
            "model_path": f"/weights/{name}",
            "extra_args": ["--startup-delay", "0.3"],
        },
        "chat_template": {"source": "external", "path": "t.jinja"},
    }


async def client(url: str, number: int) -> list[tuple[str, bool, int, list[str]]]:
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for round_ in range(ROUNDS):
            model = "left" if (number + round_) % 2 else "right"
            body = {
                "model": model,
                "stream": (number % 3) != 0,
                "messages": [{"role": "user", "content": f"client {number} round {round_}"}],
            }
            answer = await http.post("/v1/chat/completions", json=body)
            stream = body["stream"] is True
            events = sse_events(answer.text) if stream else [answer.text]
            results.append((model, stream, answer.status_code, events))
    return results


def test_no_request_fails_and_no_stream_is_cut_across_swaps(tmp_path: Path, proxy_factory) -> None:
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "deployment_profiles.json", tmp_path / "configs")
    (tmp_path / "configs" / "model_registry.curated.json").write_text(
        json.dumps([entry("left"), entry("right")])
    )
    executor = Executor(tmp_path, template=FAKE_ENGINE_TEMPLATE)
    try:
        proxy = proxy_factory([entry("left"), entry("right")], vllm_remote_url=executor.url)

        async def everyone() -> list[list[tuple[str, bool, int, list[str]]]]:
            return await asyncio.gather(*[client(proxy.url, n) for n in range(CLIENTS)])

        outcomes = [r for per_client in asyncio.run(everyone()) for r in per_client]
        assert len(outcomes) == CLIENTS * ROUNDS
        assert {stream for _, stream, _, _ in outcomes} == {True, False}
        for model, stream, status, events in outcomes:
            assert status == 200, (model, events)
            if stream:  # role, ten chunks, finish, [DONE]; no error event
                assert events[-1] == "[DONE]" and len(events) == 13, events
                assert not any('"error"' in e for e in events)
                text = "".join(
                    json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                )
                assert text == "".join(f" w{i}" for i in range(10)), events
            else:
                message = json.loads(events[0])["choices"][0]["message"]
                assert message["content"] == "".join(f" w{i}" for i in range(10))
        proxy.server.stop()
        starts = [r for r in proxy.records("autostart") if r["result"] == "ready"]
        assert len(starts) >= 3, "the test should force several swaps"
        print(f"{len(starts)} model starts for {len(outcomes)} requests")
        assert all(r["status"] == 200 for r in proxy.records())
    finally:
        executor.stop()
