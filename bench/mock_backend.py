"""The benchmark's mock OpenAI backend, as its own process (pinned to the load core).

    python -m bench.mock_backend --port N

The model name picks the profile: ``m0`` answers a tiny chat.completion at once; ``m60``
after 60 ms; ``s20`` streams a role chunk, 64 content deltas 20 ms apart, and ``[DONE]``;
``s20-first`` is the opening of ``s20`` alone (role chunk, first delta 20 ms later, ``[DONE]``),
so that time to first token can be sampled many times without waiting out 1.3 s streams.
Responses are prebuilt bytes so the mock stays far faster than anything measured through it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

from aiohttp import web

DELTAS, PACE_S = 64, 0.020


def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "ok"},
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    ).encode()


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    data = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "s20",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


COMPLETIONS = {name: _completion(name) for name in ("m0", "m60")}
ROLE = _chunk({"role": "assistant", "content": ""})
DELTA = [_chunk({"content": f" t{i}"}) for i in range(DELTAS)]
FINISH = _chunk({}, "stop")


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = body.get("model", "m0")
    if model in ("s20", "s20-first") and body.get("stream"):
        deltas = DELTA if model == "s20" else DELTA[:1]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:  # small paced writes must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await response.prepare(request)
        await response.write(ROLE)
        start = time.perf_counter()
        for i, delta in enumerate(deltas):
            # Pace against the clock, not sleep-after-write, so the schedule does not drift.
            await asyncio.sleep(max(0.0, start + (i + 1) * PACE_S - time.perf_counter()))
            await response.write(delta)
        await response.write(FINISH + b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    if model == "m60":
        await asyncio.sleep(0.060)
    return web.Response(
        body=COMPLETIONS.get(model, COMPLETIONS["m0"]), content_type="application/json"
    )


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "bench"}
                for m in ("m0", "m60", "s20", "s20-first")
            ],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
