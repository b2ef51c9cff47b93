"""Fake LLM engines that speak the real protocols, for tests and the benchmark.

One aiohttp app per flavour: ``vllm`` (errors nested as vLLM 0.32 has them; asked for usage, a
last chunk with it and no ``usage`` key before), ``llamacpp`` (``timings``, nested errors,
``/health``) and ``ollama`` (its OpenAI layer at ``/v1`` plus ``/api/tags``, ``/api/ps``,
``/api/generate``, ``/api/chat``).

The served model id picks the behaviour, so a registry entry's ``served_model_id`` is the
test's script:

=================  ===============================================================
``<anything>``     a normal answer ("Hello from <flavour>!"), tool calls if tools were sent
``slow``           10 content chunks, 50 ms apart
``fail-400``       HTTP 400 in the flavour's error shape; ``fail-500`` likewise
``die``            streams three chunks, then drops the connection
``hang``           accepts the request and never answers
``hang-stream``    sends the role chunk, then nothing
``no-usage``       never reports usage
``json-for-stream`` answers a stream request with plain JSON
``function-call``  answers (streamed or not) with a legacy ``function_call``
``function-call-trickle`` the same, its second event sent in 10-byte pieces 0.1 s apart
``json-prose``     a plain answer whose prose holds a JSON object with a "name"
=================  ===============================================================
Every request is recorded (``requests``: the parsed body and the exact bytes); handlers cut off
by a client that left are listed in ``cancelled`` by their ``x-request-id``. The Ollama flavour
checks image parts as Ollama's OpenAI layer does (only ``data:image/{jpeg,jpg,png,webp};base64``
URLs, 400 otherwise).

The vLLM flavour has vLLM's sleep routes (``POST /sleep?level=1``, ``POST /wake_up``, ``GET
/is_sleeping``) only where vLLM has them: with ``VLLM_SERVER_DEV_MODE=1`` in its environment
(else 404), and they refuse unless it was started with ``--enable-sleep-mode``. On the simulated
GPU, sleep level 1 gives its VRAM back and holds its weights in host RAM (``--sim-weights-mb``),
level 2 discards them; a wake takes ``--sim-wake-s`` (level 2: four times that, the weights
are read again) and takes the VRAM back, failing as CUDA would when it is not free. A sleeping
engine answers inference with 503.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from imageworks.chat_proxy.arbiter.simgpu import SIM_VARIABLE, SimGpu

ANSWER_WORDS = ["Hello", " from", " {flavour}", "!"]
# The "type" vLLM 0.32 gives an error of each status (its exception's name).
_VLLM_ERROR_TYPES = {
    404: "NotFoundError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    peer: Any = None  # the client's (host, port): the same port means a reused connection
    raw: bytes = b""  # the body exactly as it arrived
    query: str = ""  # the query string as it arrived


@dataclass
class FakeEngine:
    flavour: str = "vllm"
    requests: list[Recorded] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    # Ollama: tags that are "pulled" and those resident in (fake) VRAM.
    tags: list[str] = field(default_factory=lambda: ["qwen2.5vl:7b", "llama3.1:8b"])
    loaded: dict[str, float] = field(default_factory=dict)
    vram_mb: dict[str, int] = field(default_factory=dict)  # per tag; 4096 when not listed
    unload_requests: list[str] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # Responses by id
    # The simulated GPU this engine's models take memory from (a process on its own only).
    sim: SimGpu | None = None
    sim_devices: tuple[int, ...] = (0,)
    # vLLM's sleep mode: routes only in dev mode, working only with --enable-sleep-mode.
    dev_mode: bool = False
    sleep_mode: bool = False
    reserved: dict[int, int] = field(default_factory=dict)  # device -> MiB held as "vllm"
    weights_mb: int = 0  # what sleep level 1 parks in host RAM
    wake_s: float = 0.2
    sleep_s: float = 0.05
    sleeping: int = 0  # 0 awake, else the level it sleeps at

    def holdings(self) -> dict[str, int]:
        """What this fake Ollama holds in (fake) VRAM, for a FakeProbe."""
        return {f"ollama:{tag}": self.vram_mb.get(tag, 4096) for tag in self.loaded}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        # The other surfaces: Responses (kept, like an engine with a store), Anthropic
        # Messages, rerank, audio, and raw engine routes (the allowed and the dangerous ones:
        # a request that reaches /sleep is recorded like any other, so a test can see it).
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_route("*", "/v1/responses/{rid}", self.response_by_id)
        app.router.add_route("*", "/v1/responses/{rid}/{action}", self.response_by_id)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_post("/v1/rerank", self.rerank)
        app.router.add_post("/v1/audio/transcriptions", self.transcribe)
        app.router.add_post("/v1/audio/translations", self.transcribe)
        app.router.add_post("/v1/audio/speech", self.speech)
        if self.flavour == "vllm" and self.dev_mode:  # vLLM's sleep routes (dev mode only)
            app.router.add_post("/sleep", self.sleep)
            app.router.add_post("/wake_up", self.wake_up)
            app.router.add_get("/is_sleeping", self.is_sleeping)
        for path in ("/tokenize", "/sleep", "/collective_rpc", "/props", "/slots/0"):
            if not (path == "/sleep" and self.dev_mode):
                app.router.add_route("*", path, self.raw_route)
        if self.flavour == "ollama":
            app.router.add_get("/api/tags", self.api_tags)
            app.router.add_get("/api/ps", self.api_ps)
            app.router.add_get("/api/version", self.api_version)
            app.router.add_post("/api/generate", self.api_generate)
            app.router.add_post("/api/chat", self.api_generate)
        return app

    # --- vLLM's sleep mode (dev-mode routes) ---------------------------------------------------

    def _no_sleep_mode(self) -> web.Response | None:
        if self.sleep_mode:
            return None
        return self.error(400, "Sleep mode is not enabled: start vLLM with --enable-sleep-mode")

    async def sleep(self, request: web.Request) -> web.Response:
        if (refused := self._no_sleep_mode()) is not None:
            return refused
        try:
            level = int(request.query.get("level", "1"))
        except ValueError:
            level = 0
        if level not in (1, 2):
            return self.error(400, "level must be 1 or 2")
        if not self.sleeping:
            await asyncio.sleep(self.sleep_s)
            if self.sim is not None:
                self.sim.free(os.getpid(), "vllm")
                if level == 1 and self.weights_mb:
                    self.sim.hold_host(self.weights_mb, pid=os.getpid(), label="vllm-sleep")
            self.sleeping = level
        return web.Response(status=200)

    async def wake_up(self, request: web.Request) -> web.Response:
        if (refused := self._no_sleep_mode()) is not None:
            return refused
        if self.sleeping:
            await asyncio.sleep(self.wake_s * (4 if self.sleeping == 2 else 1))
            if self.sim is not None:
                taken: list[int] = []
                for device, mb in self.reserved.items():
                    if not self.sim.allocate(device, mb, pid=os.getpid(), label="vllm"):
                        if taken:  # all or nothing, like a failed CUDA wake
                            self.sim.free(os.getpid(), "vllm")
                        return self.error(500, f"CUDA out of memory waking on device {device}")
                    taken.append(device)
                self.sim.free_host(os.getpid(), "vllm-sleep")
            self.sleeping = 0
        return web.Response(status=200)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": bool(self.sleeping)})

    def _asleep(self) -> web.Response | None:
        if not self.sleeping:
            return None
        return self.error(503, "the engine is sleeping (POST /wake_up first)")

    # --- helpers -----------------------------------------------------------------------------

    def load(self, tag: str) -> bool:
        """Ollama loads ``tag`` (on the simulated GPU, on the visible device with the most free
        memory, as Ollama places its own models); False when it does not fit."""
        if tag not in self.loaded and self.sim is not None and tag in self.tags:
            free = {s.index: s.free_mb for s in self.sim.read() if s.index in self.sim_devices}
            device = max(free, key=lambda d: (free[d], -d))
            mb = self.vram_mb.get(tag, 4096)
            if not self.sim.allocate(device, mb, pid=os.getpid(), label=f"ollama:{tag}"):
                return False
        self.loaded[tag] = time.time()
        return True

    def unload(self, tag: str) -> None:
        if self.loaded.pop(tag, None) is not None and self.sim is not None:
            self.sim.free(os.getpid(), f"ollama:{tag}")

    def error(self, status: int, message: str, anthropic: bool = False) -> web.Response:
        if self.flavour == "vllm" and anthropic:
            # vLLM's /v1/messages: its own errors in Anthropic's envelope (a body its request
            # model refuses still comes in the OpenAI one).
            kind = _VLLM_ERROR_TYPES.get(status, "BadRequestError")
            return web.json_response(
                {"type": "error", "error": {"type": kind, "message": message}}, status=status
            )
        if self.flavour == "vllm":
            # vLLM 0.32 (nested since 0.10.1; before it the same keys flat, with "object").
            body: dict[str, Any] = {
                "error": {
                    "message": message,
                    "type": _VLLM_ERROR_TYPES.get(status, "BadRequestError"),
                    "param": None,
                    "code": status,
                }
            }
        elif self.flavour == "ollama":
            body = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        else:
            body = {"error": {"code": status, "message": message, "type": "invalid_request_error"}}
        return web.json_response(body, status=status)

    async def record(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        body: dict[str, Any] = json.loads(raw)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Recorded(request.path, headers, body, peer, raw, request.query_string))
        return body

    def chunk(
        self,
        model: str,
        cid: str,
        delta: dict[str, Any] | None,
        finish: str | None = None,
    ) -> bytes:
        data: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if self.flavour == "llamacpp":
            data["system_fingerprint"] = "b0-fake"
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = max(1, len(json.dumps(body.get("messages") or body.get("prompt") or "")) // 4)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # --- OpenAI-compatible endpoints ---------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        if (asleep := self._asleep()) is not None:
            return asleep
        model = str(body.get("model"))
        rid = request.headers.get("x-request-id", "")
        if self.flavour == "ollama" and model not in self.tags and not _scripted(model):
            return self.error(404, f'model "{model}" not found, try pulling it first')
        if model.startswith("fail-"):
            return self.error(int(model[5:]), f"scripted failure {model}")
        if self.flavour == "ollama" and (problem := _ollama_image_problem(body)):
            return self.error(400, problem)
        if self.flavour == "ollama" and not self.load(model):
            return self.error(500, f"model {model!r} does not fit in GPU memory")
        try:
            if model == "hang":
                await asyncio.sleep(3600)
            words = [w.format(flavour=self.flavour) for w in ANSWER_WORDS]
            if model == "slow":
                words = [f" w{i}" for i in range(10)]
            if model == "json-prose":
                words = ["Here is the record: ", '{"name": "Alice", "age": 30}', " as asked."]
            if model in ("function-call", "function-call-trickle"):
                return await self.function_call(request, body, model)
            # As the real engines: a request with tools gets a call, unless the last turn is the
            # tool's result or tool_choice is "none" (then it answers in words, and a client's
            # tool loop ends); prose models answer in prose.
            tools = body.get("tools") and model != "json-prose" and _wants_a_call(body)
            if (problem := self.sampling_problem(body)) is not None:
                return self.error(400, problem)
            if not tools and (schema := _response_schema(body)) is not None:
                words = [json.dumps(_instance_of(schema))]
            if body.get("stream") and model != "json-for-stream":
                return await self.stream_chat(request, body, model, words, bool(tools))
            return web.json_response(self.full_chat(body, model, words, bool(tools)))
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise

    def sampling_problem(self, body: dict[str, Any]) -> str | None:
        """vLLM refuses several choices under greedy sampling (temperature 0), in its words;
        llama.cpp serves them (identical)."""
        n = _choices(body)
        if self.flavour == "vllm" and n > 1 and body.get("temperature") == 0:
            return f"n must be 1 when using greedy sampling, got {n}."
        return None

    def full_chat(
        self, body: dict[str, Any], model: str, words: list[str], tools: bool
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(words)}
        finish = "stop"
        if tools:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            }
            finish = "tool_calls"
        data: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": i, "message": message, "finish_reason": finish}
                for i in range(_choices(body))
            ],
        }
        if model != "no-usage":
            data["usage"] = self.usage(body, len(words))
        return data

    async def stream_chat(
        self, request: web.Request, body: dict[str, Any], model: str, words: list[str], tools: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        cid = "chatcmpl-fakestream"
        await response.write(self.chunk(model, cid, {"role": "assistant", "content": ""}))
        if model == "hang-stream":
            await asyncio.sleep(3600)
        pieces: list[dict[str, Any]]
        if tools:
            pieces = [
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                },
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
            ]
            finish = "tool_calls"
        else:
            pieces = [{"content": w} for w in words]
            finish = "stop"
        for index, delta in enumerate(pieces):
            if model == "slow":
                await asyncio.sleep(0.05)
            await response.write(self.chunk(model, cid, delta))
            if model == "die" and index == 2:
                assert request.transport is not None
                await asyncio.sleep(0.05)  # let the chunks already written reach the client
                request.transport.abort()  # an engine crash: the socket just goes away
                return response
        await response.write(self.chunk(model, cid, {}, finish))
        if include_usage and model != "no-usage":
            usage_chunk = json.loads(self.chunk(model, cid, None)[6:])
            usage_chunk["usage"] = self.usage(body, len(pieces))
            await response.write(b"data: " + json.dumps(usage_chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        # Real servers end the chunked body in a later write than [DONE]; so does this one.
        await asyncio.sleep(0.005)
        await response.write_eof()
        return response

    async def function_call(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        """The legacy answer shape: ``function_call`` with ``finish_reason: function_call``."""
        if not body.get("stream"):
            message = {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "function_call"}],
                    "usage": self.usage(body, 5),
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        cid = "chatcmpl-fakestream"
        deltas: list[dict[str, Any]] = [
            {"role": "assistant", "content": None},
            {"function_call": {"name": "get_weather", "arguments": ""}},
            {"function_call": {"arguments": '{"city": '}},
            {"function_call": {"arguments": '"Paris"}'}},
        ]
        events = [self.chunk(model, cid, d) for d in deltas]
        events.append(self.chunk(model, cid, {}, "function_call") + b"data: [DONE]\n\n")
        # Written in pieces that cut events in two, as a network read may. Trickled, the second
        # event comes in 10-byte pieces 0.1 s apart: longer to arrive whole than a short read
        # limit, though no piece is late.
        trickled = events.pop(1) if model == "function-call-trickle" else b""
        parts = [events[0], trickled, b"".join(events[1:])] if trickled else [b"".join(events)]
        for part in parts:
            size = 10 if part is trickled else 37
            for start in range(0, len(part), size):
                if part is trickled:
                    await asyncio.sleep(0.1)
                await response.write(part[start : start + size])
        await response.write_eof()
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        if (asleep := self._asleep()) is not None:
            return asleep
        model = str(body.get("model"))
        if model.startswith("fail-"):
            return self.error(int(model[5:]), f"scripted failure {model}")
        text = f"completion from {self.flavour}"
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for word in text.split():
                data = {
                    "id": "cmpl-fake",
                    "object": "text_completion",
                    "model": model,
                    "choices": [{"index": 0, "text": word + " ", "finish_reason": None}],
                }
                await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": self.usage(body, 3),
            }
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self.record(request)
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        return web.json_response(
            {
                "object": "list",
                "model": body.get("model"),
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                    for i in range(len(items))
                ],
                "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": tag, "object": "model", "created": 0, "owned_by": self.flavour}
                    for tag in self.tags
                ],
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    # --- Responses, Anthropic Messages, rerank, audio, raw routes -----------------------------

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        model = str(body.get("model"))
        if model.startswith("fail-"):
            return self.error(int(model[5:]), f"scripted failure {model}")
        rid = f"resp_{self.flavour}_{len(self.stored)}"
        text = "".join(w.format(flavour=self.flavour) for w in ANSWER_WORDS)
        usage = {"input_tokens": 7, "output_tokens": 4, "total_tokens": 11}
        response: dict[str, Any] = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": usage,
        }
        self.stored[rid] = {"response": response, "input": body.get("input")}
        if not body.get("stream"):
            return web.json_response(response)
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": {**response, "status": "in_progress"}}),
            *[("response.output_text.delta", {"item_id": "msg_1", "delta": d}) for d in text],
            ("response.completed", {"response": response}),
        ]
        if model == "die":
            events = events[:3]
        return await self.typed_stream(request, events, die=model == "die")

    async def typed_stream(
        self, request: web.Request, events: list[tuple[str, dict[str, Any]]], die: bool = False
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for number, (kind, data) in enumerate(events):
            payload = json.dumps({"type": kind, "sequence_number": number, **data})
            await response.write(f"event: {kind}\ndata: {payload}\n\n".encode())
        if die:
            assert request.transport is not None
            await asyncio.sleep(0.05)
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def response_by_id(self, request: web.Request) -> web.Response:
        self.requests.append(Recorded(request.path, dict(request.headers), None, None, b""))
        rid, action = request.match_info["rid"], request.match_info.get("action", "")
        stored = self.stored.get(rid)
        if stored is None:
            return self.error(404, f"no response {rid}")
        if action == "input_items":
            return web.json_response({"object": "list", "data": [stored["input"]]})
        if request.method == "DELETE":
            del self.stored[rid]
            return web.json_response({"id": rid, "object": "response", "deleted": True})
        if action == "cancel":
            return web.json_response({**stored["response"], "status": "cancelled"})
        return web.json_response(stored["response"])

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        model = str(body.get("model"))
        if model.startswith("fail-"):
            return self.error(int(model[5:]), f"scripted failure {model}", anthropic=True)
        if model == "hang":
            await asyncio.sleep(3600)
        text = "".join(w.format(flavour=self.flavour) for w in ANSWER_WORDS)
        message: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 9, "output_tokens": 4},
        }
        if not body.get("stream"):
            return web.json_response(message)
        start = {**message, "content": [], "stop_reason": None}
        start["usage"] = {"input_tokens": 9, "output_tokens": 1}
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"message": start}),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            *[
                ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
                for w in (text[:5], text[5:])
            ],
            ("content_block_stop", {"index": 0}),
            (
                "message_delta",
                {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}},
            ),
            ("message_stop", {}),
        ]
        if model == "die":
            return await self.typed_stream(request, events[:3], die=True)
        return await self.typed_stream(request, events)

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = await self.record(request)
        return web.json_response({"input_tokens": len(json.dumps(body.get("messages"))) // 4})

    async def rerank(self, request: web.Request) -> web.Response:
        body = await self.record(request)
        documents = body.get("documents") or []
        results = [{"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(documents))]
        return web.json_response(
            {
                "id": "rerank-1",
                "model": body.get("model"),
                "results": results,
                "usage": {"total_tokens": 5 * len(documents)},
            }
        )

    async def transcribe(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Recorded(request.path, headers, None, None, raw))
        form = _form(request.headers["content-type"], raw)
        heard = f"heard {len(form.get('file', b''))} bytes"
        return web.json_response(
            {
                "text": f"{heard} with {form.get('model', b'').decode()}",
                "usage": {"type": "tokens", "input_tokens": 3, "output_tokens": 2},
            }
        )

    async def speech(self, request: web.Request) -> web.Response:
        body = await self.record(request)
        audio = b"RIFF" + bytes(range(256)) * 4 + str(body.get("input")).encode()
        return web.Response(body=audio, content_type="audio/wav")

    async def raw_route(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Recorded(request.path, headers, None, None, raw))
        if request.path == "/tokenize":
            content = json.loads(raw or b"{}").get("content", "")
            return web.json_response({"tokens": [ord(c) for c in content]})
        if request.path == "/sleep":  # recorded, and 404 as vLLM answers without dev mode
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.json_response({"path": request.path, "method": request.method})

    # --- Ollama's native API -----------------------------------------------------------------

    async def api_tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": t, "model": t} for t in self.tags]})

    async def api_ps(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "models": [
                    {"name": t, "model": t, "size_vram": self.vram_mb.get(t, 4096) * 1024 * 1024}
                    for t in self.loaded
                ]
            }
        )

    async def api_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.0"})

    async def api_generate(self, request: web.Request) -> web.Response:
        body = await self.record(request)
        model = str(body.get("model"))
        if model not in self.tags:
            return web.json_response({"error": f'model "{model}" not found'}, status=404)
        if body.get("keep_alive") in (0, "0", "0s"):
            self.unload_requests.append(f"{request.path} {model}")
            if request.path == "/api/generate" and model.startswith("generate-broken"):
                return web.json_response({"error": "scripted generate failure"}, status=500)
            if not model.startswith("sticky"):  # "sticky" models answer but stay loaded
                self.unload(model)
        elif not self.load(model):
            return web.json_response({"error": "model does not fit in GPU memory"}, status=500)
        return web.json_response(
            {
                "model": model,
                "done": True,
                "done_reason": "unload" if model not in self.loaded else "stop",
                "response": "",
            }
        )


def _form(content_type: str, raw: bytes) -> dict[str, bytes]:
    """The fields of a multipart body (the standard library's MIME parser)."""
    import email
    import email.policy

    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw, policy=email.policy.HTTP
    )
    fields: dict[str, bytes] = {}
    for part in message.walk():
        payload = part.get_payload(decode=True)
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = payload
    return fields


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _wants_a_call(body: dict[str, Any]) -> bool:
    if body.get("tool_choice") == "none":
        return False
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    return bool(body.get("tool_choice") == "required" or last.get("role") != "tool")


def _response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema ``response_format`` asks for (``json_object``: any object)."""
    wanted = body.get("response_format")
    if not isinstance(wanted, dict):
        return None
    if wanted.get("type") == "json_object":
        return {"type": "object", "properties": {"answer": {"type": "string"}}}
    if wanted.get("type") == "json_schema":
        schema = (wanted.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else {"type": "object"}
    return None


def _instance_of(schema: dict[str, Any]) -> Any:
    """A value that satisfies a simple JSON schema, as a constrained engine's answer would."""
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {k: _instance_of(v if isinstance(v, dict) else {}) for k, v in properties.items()}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "Paris"


def _scripted(model: str) -> bool:
    return model.startswith("fail-") or model in {
        "slow",
        "die",
        "hang",
        "hang-stream",
        "no-usage",
        "json-for-stream",
        "function-call",
        "json-prose",
    }


_OLLAMA_IMAGE_PREFIXES = (
    "data:;base64,",
    *(f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp")),
)


def _ollama_image_problem(body: dict[str, Any]) -> str | None:
    """What Ollama's OpenAI layer (openai/openai.go) refuses in a message's parts."""
    for message in body.get("messages") or ():
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type")
            if kind == "text":
                continue
            if kind != "image_url":
                return "invalid message format"
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith(_OLLAMA_IMAGE_PREFIXES):
                return "invalid image input"
            try:
                base64.b64decode(url.split(",", 1)[1], validate=True)
            except ValueError:
                return "invalid message format"
    return None


def entry_for(
    name: str, url: str, backend: str = "vllm", served: str | None = None, **fields: Any
) -> dict[str, Any]:
    """A registry entry pointing at a fake engine (its OpenAI base is ``url + '/v1'``)."""
    data: dict[str, Any] = {
        "name": name,
        "backend": backend,
        "served_model_id": served or name,
        "backend_config": {"base_url": url + "/v1"},
    }
    if backend == "vllm":
        data["chat_template"] = {"source": "external", "path": "configs/chat_templates/t.jinja"}
    data.update(fields)
    return data


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, in order (comments and blank lines dropped)."""
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def visible_devices() -> tuple[int, ...]:
    """The devices this process may use (``CUDA_VISIBLE_DEVICES``; unset: device 0)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return tuple(int(d) for d in raw.split(",") if d.strip()) or (0,)


def hold_like_vllm(sim: SimGpu, fraction: float, devices: tuple[int, ...]) -> dict[int, int]:
    """vLLM's start-up check, then its reservation: on each device, refuse when free memory is
    below ``fraction`` of the total, else hold exactly ``fraction`` of the total (returned)."""
    snaps = {s.index: s for s in sim.read()}
    held: dict[int, int] = {}
    for device in devices:
        want = int(fraction * snaps[device].total_mb)
        if not sim.allocate(device, want, pid=os.getpid(), label="vllm"):
            free = sim.read()[device].free_mb
            print(
                f"ValueError: Free memory on device {device} ({free} MiB) on startup is less "
                f"than desired GPU memory utilization ({fraction}, {want} MiB)",
                flush=True,
            )
            raise SystemExit(1)
        held[device] = want
    print(f"holding {fraction} of GPU {','.join(map(str, devices))}", flush=True)
    return held


def main(argv: list[str] | None = None) -> None:
    """Run a fake engine as its own process (for the executor's launch template in tests):
    ``python -m testkit.fake_engine --port N [--flavour vllm] [--startup-delay S] [--exit-code C]
    [--exit-after S]``. On a simulated GPU (``CHAT_PROXY_GPU_SIM``): ``--gpu-memory-utilization
    F`` holds F of each visible device like vLLM (refusing to start when less is free),
    ``--sim-vram-mb N`` holds N MiB (a llama.cpp model), ``--sim-model TAG=MB`` is an Ollama
    model of that size (loaded on use, unloaded by ``keep_alive: 0``). vLLM's sleep mode:
    ``--enable-sleep-mode`` (with ``VLLM_SERVER_DEV_MODE=1``), ``--sim-weights-mb N`` (host RAM
    held asleep; default half the reservation), ``--sim-wake-s S``, ``--sim-sleep-s S``.
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--flavour", default="vllm")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--exit-code", type=int, help="print a line and exit with this code")
    parser.add_argument(
        "--exit-after", type=float, help="serve, then die this many seconds later (a crash)"
    )
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--sim-vram-mb", type=int)
    parser.add_argument("--sim-model", action="append", default=[])
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--sim-weights-mb", type=int)
    parser.add_argument("--sim-wake-s", type=float, default=0.2)
    parser.add_argument("--sim-sleep-s", type=float, default=0.05)
    args, _unknown = parser.parse_known_args(argv)  # ignore vLLM's other flags
    print(f"fake {args.flavour} engine starting on {args.port}", flush=True)
    if args.exit_code is not None:
        print("fatal: scripted start failure (CUDA out of memory)", flush=True)
        raise SystemExit(args.exit_code)
    time.sleep(args.startup_delay)
    sim_path = os.environ.get(SIM_VARIABLE)
    sim = SimGpu(Path(sim_path)) if sim_path else None
    devices = visible_devices()
    reserved: dict[int, int] = {}
    if sim is not None and args.gpu_memory_utilization is not None:
        reserved = hold_like_vllm(sim, args.gpu_memory_utilization, devices)
    mb = args.sim_vram_mb
    if sim is not None and mb and not sim.allocate(devices[0], mb, pid=os.getpid(), label="model"):
        print("fatal: CUDA out of memory", flush=True)
        raise SystemExit(1)
    engine = FakeEngine(args.flavour, sim=sim, sim_devices=devices)
    engine.dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
    engine.sleep_mode = args.enable_sleep_mode
    engine.reserved = reserved
    weights = args.sim_weights_mb
    engine.weights_mb = sum(reserved.values()) // 2 if weights is None else weights
    engine.wake_s, engine.sleep_s = args.sim_wake_s, args.sim_sleep_s
    for item in args.sim_model:
        tag, _, mb = item.partition("=")
        engine.tags.append(tag)
        engine.vram_mb[tag] = int(mb)
    app = engine.app()
    if args.exit_after is not None:

        def crash() -> None:
            print("fatal: scripted crash", flush=True)
            os._exit(3)

        async def arm(app: web.Application) -> None:  # counted from when it serves
            asyncio.get_running_loop().call_later(args.exit_after, crash)

        app.on_startup.append(arm)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
