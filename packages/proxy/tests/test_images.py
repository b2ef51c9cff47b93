"""Unit tests: one image fitted (images.py), history trimming (history.py), the legacy
function_call conversion (toolcalls.py) and the engines' tool-calling launch flags."""

from __future__ import annotations

import asyncio
import json
import warnings
from typing import Any, Literal

import aiohttp
import pytest
from PIL import Image
from pydantic import ValidationError

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends.llamacpp import server_argv
from imageworks.chat_proxy.errors import InvalidRequest
from imageworks.chat_proxy.request.toolcalls import MAX_PENDING, StreamConverter, convert_answer
from imageworks.chat_proxy.supervision.launch import LaunchError
from imageworks.chat_proxy.vision import prepare as vision
from imageworks.chat_proxy.vision.history import trim_turns
from imageworks.chat_proxy.vision.images import (
    DataUrl,
    Fit,
    ImageError,
    open_inline,
    prepare_fetched,
    prepare_inline,
)
from imageworks.chat_proxy.vision.lifting import LIFT_MIN, LiftedBody
from imageworks.chat_proxy.vision.pool import WorkerPool
from imageworks.chat_proxy.vision.prepare import IMAGE_PARTS, VisionPolicy
from imageworks.chat_proxy.vision.remote import host_allowed
from imageworks.model_loader.schema import ModelEntry, RemoteImages
from imageworks.vllm_executor.launcher import DEFAULT_TEMPLATE, build_command
from testkit.images import (
    data_url,
    decode_data_url,
    image_part,
    jpeg_bytes,
    photo,
    png_bytes,
    png_declaring,
)

FIT = Fit(target_long_edge=256, jpeg_quality=85)


def test_an_image_within_the_target_is_not_touched() -> None:
    url = data_url(png_bytes(200, 100), "image/png")
    prepared = prepare_inline(url, FIT)
    assert prepared.url is None and not prepared.resized
    assert prepared.bytes_in == prepared.bytes_out == len(png_bytes(200, 100))


def test_no_target_means_no_resize_even_for_a_large_image() -> None:
    url = data_url(jpeg_bytes(photo(1200, 800, grain=0)), "image/jpeg")
    assert prepare_inline(url, Fit(0, 85)).url is None


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_before_resizing(orientation: int) -> None:
    url = data_url(jpeg_bytes(photo(1200, 800, grain=0), orientation=orientation), "image/jpeg")
    prepared = prepare_inline(url, FIT)
    assert prepared.resized and prepared.url is not None
    image = decode_data_url(prepared.url)
    turned = orientation in (6, 8)
    assert image.size == ((171, 256) if turned else (256, 171))
    # Where the stored top-left (red) quadrant is once upright.
    corner = {1: (10, 10), 3: (250, 165), 6: (165, 10), 8: (10, 250)}[orientation]
    r, _, b = image.getpixel(corner)[:3]
    assert r > 150 and b < 100


def test_a_transparent_image_stays_png_when_resized() -> None:
    prepared = prepare_inline(data_url(png_bytes(600, 300), "image/png"), FIT)
    assert prepared.url is not None and prepared.url.startswith("data:image/png;base64,")
    image = decode_data_url(prepared.url)
    assert image.size == (256, 128) and image.mode == "RGBA"


def test_an_engine_with_a_format_list_gets_only_those_formats() -> None:
    ollama = Fit(0, 85, frozenset({"JPEG", "PNG", "WEBP"}))
    gif = data_url(b"GIF89a" + png_bytes()[6:], "image/gif")  # not a GIF Pillow can read
    with pytest.raises(ImageError):
        prepare_inline(gif, ollama)
    from testkit.images import gif_bytes

    prepared = prepare_inline(data_url(gif_bytes(), "image/gif"), ollama)
    assert prepared.url is not None and decode_data_url(prepared.url).format in ("PNG", "JPEG")
    png = data_url(png_bytes(), "image/png")
    assert prepare_inline(png, ollama).url is None


def test_a_fetched_image_is_always_inlined() -> None:
    prepared = prepare_fetched(png_bytes(), FIT)
    assert prepared.url == data_url(png_bytes(), "image/png")


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,***",
        "data:image/png;base64,QUJD=X",
        "data:image/png,no-comma-base64-but-not-an-image",
        "nothing-like-a-data-url",
        "data:image/jpeg;base64," + "QUJD" * 100,
    ],
)
def test_unreadable_images_raise_image_error(url: str) -> None:
    with pytest.raises(ImageError):
        prepare_inline(url, FIT)


def test_a_truncated_jpeg_that_needs_resizing_is_an_image_error() -> None:
    raw = jpeg_bytes(photo(1200, 800, grain=0))
    with pytest.raises(ImageError, match="cannot be decoded"):
        prepare_inline(data_url(raw[: len(raw) // 3], "image/jpeg"), FIT)


@pytest.mark.parametrize("size", [(10_000, 10_000), (12_000, 12_000), (50_000, 50_000)])
@pytest.mark.parametrize("warning_action", ["error", "ignore"])
def test_a_decompression_bomb_is_refused_before_decoding(
    size: tuple[int, int], warning_action: Literal["error", "ignore"]
) -> None:
    """Between Pillow's threshold (89 MP) and twice it Pillow only warns and decodes anyway:
    refused whether warnings are errors (tests) or shown once and ignored (a server)."""
    url = data_url(png_declaring(*size), "image/png")
    with warnings.catch_warnings():
        warnings.simplefilter(warning_action, Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="pixels"):
            prepare_inline(url, FIT)


def test_base64_wrapped_in_lines_is_accepted_and_sizes_are_estimated_without_decoding() -> None:
    url = data_url(png_bytes(), "image/png")
    header, payload = url.split(",", 1)
    wrapped = header + "," + "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    assert DataUrl.parse(wrapped).data() == png_bytes()
    assert DataUrl.parse(url).decoded_size() == len(png_bytes())


def test_host_allow_list() -> None:
    remote = RemoteImages(allow_hosts=["images.example.com", "*.cdn.example.org"])
    assert host_allowed("https://images.example.com/a.jpg", remote)
    assert host_allowed("http://IMAGES.example.com:8080/a.jpg", remote)
    assert host_allowed("https://eu.cdn.example.org/a.jpg", remote)
    assert not host_allowed("https://cdn.example.org.evil.net/a.jpg", remote)
    assert not host_allowed("https://evilimages.example.com/a.jpg", remote)
    assert not host_allowed("https://evilcdn.example.org/a.jpg", remote)  # "*." means a subdomain
    assert not host_allowed("https://images.example.com@169.254.169.254/", remote)
    assert not host_allowed("file://images.example.com/etc/passwd", remote)


def test_the_policy_takes_the_entry_first_then_the_legacy_key_then_the_default() -> None:
    config = ProxyConfig.load(environ={})
    plain = ModelEntry(name="m", backend="vllm")
    legacy = ModelEntry(name="m", backend="vllm", metadata={"vision": {"target_long_edge": 896}})
    own = ModelEntry(
        name="m", backend="vllm", vision={"target_long_edge": 0}, metadata=legacy.metadata
    )
    assert VisionPolicy.of(plain, config).fit.target_long_edge == 1536
    assert VisionPolicy.of(legacy, config).fit.target_long_edge == 896
    assert VisionPolicy.of(own, config).fit.target_long_edge == 0
    assert not VisionPolicy.of(own, config).rewrites


def test_one_requests_images_go_to_the_pool_a_few_at_a_time_and_stop_at_the_first_bad_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 images in one request: never more than ``workers`` of them handed to the pool at
    once (other requests' images queue between them, memory stays flat), and once the first
    is found unreadable (the 400) the rest are not prepared at all."""
    started: list[int] = []
    in_pool = 0
    most_in_pool = 0

    def counting(url: str | bytes, fit: Fit) -> Any:
        started.append(1)
        return open_inline(url, fit)

    monkeypatch.setattr(vision, "open_inline", counting)
    prep = vision.ImagePrep(WorkerPool(workers=1))
    real_run = prep.run

    async def run(fn: Any, *args: Any, holding: int = 0) -> Any:
        nonlocal in_pool, most_in_pool
        in_pool += 1
        most_in_pool = max(most_in_pool, in_pool)
        try:
            return await real_run(fn, *args, holding=holding)
        finally:
            in_pool -= 1

    monkeypatch.setattr(prep, "run", run)
    entry = ModelEntry(name="m", backend="vllm", capabilities={"text": True, "vision": True})
    policy = VisionPolicy.of(entry, ProxyConfig.load(environ={}))
    good = image_part(data_url(png_bytes(8, 8), "image/png"))
    bad = image_part("data:image/png;base64," + "QUJD" * 10)

    async def send(parts: list[Any]) -> None:
        body = {"messages": [{"role": "user", "content": parts}]}
        async with aiohttp.ClientSession() as session:
            await prep.prepare(entry, body, policy, session, vision.ImageStats())

    try:
        asyncio.run(send([good] * 200))
        assert len(started) == 200 and most_in_pool == 1
        started.clear()
        with pytest.raises(InvalidRequest, match=r"messages\[0\]\.content\[0\]"):
            asyncio.run(send([bad] + [good] * 200))
    finally:
        prep.pool.executor.shutdown(wait=True)  # whatever was handed to the pool has run now
    assert len(started) == 1


# --- history ---------------------------------------------------------------------------------

IMG_A = {"type": "image_url", "image_url": {"url": "data:a"}}
IMG_B = {"type": "image_url", "image_url": {"url": "data:b"}}


def test_trimming_keeps_systems_and_the_last_turns_and_carries_user_images() -> None:
    messages: list[Any] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [IMG_A, {"type": "text", "text": "1"}]},
        {"role": "assistant", "content": [IMG_B]},  # not the user's: not carried
        {"role": "user", "content": [IMG_B]},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "3"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "sunny"},
    ]
    trimmed, dropped = trim_turns(messages, 1, IMAGE_PARTS)
    assert dropped == 4
    assert trimmed == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [IMG_A, IMG_B, {"type": "text", "text": "3"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "sunny"},
    ]
    assert messages[5] == {"role": "user", "content": "3"}  # the input is left alone
    two, dropped_two = trim_turns(messages, 2, IMAGE_PARTS)
    # The carried images go onto the last user message, not the first one kept.
    assert dropped_two == 2 and two[1] == {"role": "user", "content": [IMG_B]}
    assert two[3] == {"role": "user", "content": [IMG_A, {"type": "text", "text": "3"}]}


def test_trimming_a_conversation_already_short_enough_changes_nothing() -> None:
    messages: list[Any] = [
        {"role": "user", "content": [IMG_A]},
        {"role": "assistant", "content": "x"},
    ]
    assert trim_turns(messages, 1, IMAGE_PARTS) == (messages, 0)


# --- legacy function_call --------------------------------------------------------------------


def legacy_stream() -> bytes:
    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    return (
        event({"role": "assistant", "content": None})
        + event({"function_call": {"name": "f", "arguments": ""}})
        + event({"function_call": {"arguments": {"a": 1}}})
        + event({}, "function_call")
        + b"data: [DONE]\n\n"
    )


@pytest.mark.parametrize("cut", [1, 2, 7, 50, 10_000])
def test_the_stream_converter_handles_events_cut_anywhere(cut: int) -> None:
    raw = legacy_stream()
    converter = StreamConverter()
    out = b"".join(converter.feed(raw[i : i + cut]) for i in range(0, len(raw), cut))
    out += converter.flush()
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    first, second = (c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:3])
    assert first["id"].startswith("call_") and first["function"] == {"name": "f", "arguments": ""}
    assert second == {"index": 0, "function": {"arguments": '{"a": 1}'}}
    assert chunks[3]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[0] == json.loads(raw.split(b"\n\n")[0][6:])  # others unchanged


@pytest.mark.parametrize("end", [b"\r\n\r\n", b"\r\r"])
def test_events_ended_by_crlf_are_converted_and_passed_on_as_they_arrive(end: bytes) -> None:
    """SSE allows CRLF (sse-starlette sends it): each whole event goes on at once, converted;
    looking for LF LF alone held the whole stream back to its end, unconverted."""
    events = legacy_stream().replace(b"\n\n", end).split(end)[:-1]
    converter = StreamConverter()
    out = []
    for event in events:
        passed = converter.feed(event + end)
        assert passed.endswith(end)  # nothing held back
        out.append(passed)
    assert converter.flush() == b""
    assert b"function_call" not in b"".join(out)
    first = json.loads(out[1][6 : -len(end)])["choices"][0]["delta"]["tool_calls"][0]
    assert first["function"] == {"name": "f", "arguments": ""}
    assert out[-1] == b"data: [DONE]" + end


def test_a_hostile_stream_neither_breaks_the_converter_nor_grows_its_memory() -> None:
    converter = StreamConverter()
    odd = b'data: {"choices": [{"index": [1], "delta": {"function_call": {"name": "f"}}}]}\n\n'
    (choice,) = json.loads(converter.feed(odd)[6:])["choices"]
    assert choice["delta"]["tool_calls"][0]["function"]["name"] == "f"
    endless = b"x" * (MAX_PENDING // 2)  # a body that never ends an event
    assert converter.feed(endless) == b""
    assert converter.feed(endless + b"function_call") == endless * 2 + b"function_call"
    assert converter.pending == b""


def test_events_without_a_function_call_pass_as_the_same_bytes() -> None:
    raw = b'data: {"choices": [{"delta": {"content": "x"}}]}\n\ndata: [DONE]\n\n'
    converter = StreamConverter()
    assert converter.feed(raw[:10]) == b""
    assert converter.feed(raw[10:]) == raw
    answer = b'{"choices": [{"message": {"content": "{\\"name\\": \\"Alice\\"}"}}]}'
    assert convert_answer(answer) is answer


def test_a_whole_answer_with_function_call_is_converted() -> None:
    answer = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "f", "arguments": {"a": 1}},
                },
                "finish_reason": "function_call",
            }
        ]
    }
    converted = json.loads(convert_answer(json.dumps(answer).encode()))
    (choice,) = converted["choices"]
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "f", "arguments": '{"a": 1}'} and call["type"] == "function"
    assert "function_call" not in choice["message"] and choice["finish_reason"] == "tool_calls"


# --- launch flags ----------------------------------------------------------------------------


def vllm(**fields: Any) -> ModelEntry:
    return ModelEntry.model_validate(
        {"name": "q", "backend": "vllm", "backend_config": {"model_path": "/m"}, **fields}
    )


def test_vllm_with_tools_launches_with_auto_tool_choice_and_the_entrys_parser() -> None:
    entry = vllm(
        capabilities={"tools": True},
        backend_config={
            "model_path": "/m",
            "tool_parser": "hermes",
            "extra_args": ["--enable-auto-tool-choice", "--max-model-len", "8192"],
        },
    )
    argv = build_command(
        entry, DEFAULT_TEMPLATE, host="127.0.0.1", port=1, gpu_memory_utilization=0.5
    )
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
    assert argv.count("--enable-auto-tool-choice") == 1  # the entry's duplicate is dropped
    assert "--enable-auto-tool-choice" not in build_command(
        vllm(), DEFAULT_TEMPLATE, host="127.0.0.1", port=1, gpu_memory_utilization=0.5
    )
    with pytest.raises(LaunchError, match=r"backend_config\.tool_parser"):
        build_command(
            vllm(capabilities={"tools": True}),
            DEFAULT_TEMPLATE,
            host="127.0.0.1",
            port=1,
            gpu_memory_utilization=0.5,
        )


@pytest.mark.parametrize(
    "parser", ["--x", "-x", "--trust-remote-code", ".", "hermes --foo", "hermes\n", ""]
)
def test_a_tool_parser_that_could_read_as_a_flag_or_split_is_refused(parser: str) -> None:
    """The parser follows --tool-call-parser as its own argv token: one that starts with a
    dash would be read by vLLM as a flag, one with a space is not one word."""
    with pytest.raises(ValidationError, match="tool_parser"):
        vllm(
            capabilities={"tools": True},
            backend_config={"model_path": "/m", "tool_parser": parser},
        )


def test_llamacpp_with_tools_runs_its_jinja_template() -> None:
    entry = ModelEntry.model_validate(
        {"name": "g", "backend": "llamacpp", "backend_config": {"model_path": "/g.gguf"}}
    )
    assert "--jinja" not in server_argv(entry, 1)
    tools = entry.model_copy(
        update={"capabilities": entry.capabilities.model_copy(update={"tools": True})}
    )
    assert "--jinja" in server_argv(tools, 1)


# --- lifting big strings out of a body -------------------------------------------------------


def big_url(size: int = 100_000) -> str:
    return "data:image/png;base64," + "QUJD" * (size // 4)


def test_a_big_data_url_is_lifted_and_spliced_back() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [image_part(big_url())]}]}
    raw = json.dumps(body).encode()
    lifted = LiftedBody.lift(raw)
    assert len(lifted.skeleton) < 300
    parsed = json.loads(lifted.skeleton)
    placeholder = parsed["messages"][0]["content"][0]["image_url"]["url"]
    assert lifted.value(placeholder) == big_url().encode()
    parsed["model"] = "renamed"
    assert json.loads(lifted.dump(parsed)) == {**body, "model": "renamed"}


def test_a_forged_placeholder_is_only_text() -> None:
    raw = json.dumps({"a": big_url(), "b": "imageworks-lifted:0000000000000000:0"}).encode()
    lifted = LiftedBody.lift(raw)
    parsed = json.loads(lifted.skeleton)
    assert lifted.value(parsed["b"]) is None  # another nonce
    assert json.loads(lifted.dump(parsed)) == json.loads(raw)


@pytest.mark.parametrize(
    "raw",
    [
        # a quoted "data:" inside a string, behind an escaped quote
        b'{"text": "say \\"' + big_url().encode() + b'\\" twice"}',
        # a string with an escape in it: left for json to decode
        b'{"url": "' + big_url().encode()[:-8] + b'\\/QUJD"}',
        # a control character: invalid JSON, and it must stay invalid
        b'{"url": "' + big_url().encode() + b'\n"}',
        # short strings stay where they are
        b'{"url": "data:image/png;base64,QUJD"}',
    ],
)
def test_strings_that_are_not_plain_or_not_big_are_not_lifted(raw: bytes) -> None:
    lifted = LiftedBody.lift(raw)
    assert lifted.skeleton == raw and lifted.strings == []


def test_a_template_without_the_tool_placeholder_gets_no_tool_flags() -> None:
    template = tuple(t for t in DEFAULT_TEMPLATE if t != "{tool_args}")
    argv = build_command(
        vllm(capabilities={"tools": True}),  # no parser, and none needed
        template,
        host="127.0.0.1",
        port=1,
        gpu_memory_utilization=0.5,
    )
    assert "--enable-auto-tool-choice" not in argv


def test_vision_threads_run_below_the_event_loop() -> None:
    import asyncio
    import os
    import threading

    from imageworks.chat_proxy.vision.pool import WORKER_NICENESS, WorkerPool

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    prep = WorkerPool(1)
    try:
        worker = asyncio.run(prep.run(niceness))
    finally:
        prep.close()
    assert worker == min(19, niceness() + WORKER_NICENESS)


def test_several_big_strings_are_lifted_each_and_put_back_in_place() -> None:
    one, two = big_url(LIFT_MIN), "data:x;base64," + "Q" * (LIFT_MIN - 14)
    assert len(two) == LIFT_MIN
    body = {"a": one, "short": "data:,x", "b": [two, "tail"], "c": "data:" + "Q" * (LIFT_MIN - 6)}
    raw = json.dumps(body).encode()
    lifted = LiftedBody.lift(raw)
    # Exactly LIFT_MIN characters between the quotes is big; one fewer is not.
    assert lifted.strings == [one.encode(), two.encode()]
    parsed = json.loads(lifted.skeleton)
    assert parsed["short"] == "data:,x" and parsed["b"][1] == "tail"
    assert parsed["c"] == body["c"]
    assert [lifted.value(parsed["a"]), lifted.value(parsed["b"][0])] == lifted.strings
    assert lifted.value(parsed["a"] + "x") is None and lifted.value("tail") is None
    assert lifted.dump(parsed) == raw


def test_an_even_run_of_backslashes_does_not_escape_the_quote() -> None:
    # "x\\" ends with an escaped backslash: the quote after it opens a real string.
    raw = b'{"p": "x\\\\", "url": "' + big_url().encode() + b'"}'
    lifted = LiftedBody.lift(raw)
    assert lifted.strings == [big_url().encode()]
    assert json.loads(lifted.dump(json.loads(lifted.skeleton))) == json.loads(raw)


def test_a_control_character_far_into_a_huge_string_keeps_it_in_place() -> None:
    huge = big_url(1_000_000)  # several of the checker's steps
    raw = b'{"url": "' + huge.encode()[:-1] + b'\t"}'
    assert LiftedBody.lift(raw).skeleton == raw


def test_an_unterminated_string_and_a_body_without_big_strings() -> None:
    raw = b'{"url": "' + big_url().encode()
    assert LiftedBody.lift(raw).skeleton == raw
    small = LiftedBody.lift(b'{"a": 1}')
    assert small.value("imageworks-lifted:") is None
    assert small.dump({"a": 1}) == b'{"a": 1}'


@pytest.mark.parametrize("escapes", [1, 3])
def test_a_data_url_behind_an_escaped_quote_is_part_of_its_string(escapes: int) -> None:
    # {"text": "say \"data:…"} (and with an escaped backslash before it): one string that
    # merely mentions a data: URL; lifting from its middle would make the placeholder text.
    raw = b'{"text": "say ' + b"\\" * escapes + b'"' + big_url().encode() + b'"}'
    assert json.loads(raw)["text"].endswith(big_url())
    lifted = LiftedBody.lift(raw)
    assert lifted.skeleton == raw and lifted.strings == []


def test_escapes_elsewhere_and_a_newline_before_the_quote_do_not_stop_a_lift() -> None:
    body = {"messages": [big_url()], "note": 'a "quoted"\nline'}
    for raw in (json.dumps(body).encode(), json.dumps(body, indent=0).encode()):
        lifted = LiftedBody.lift(raw)
        assert lifted.strings == [big_url().encode()], raw[:40]
        assert json.loads(lifted.dump(json.loads(lifted.skeleton))) == body


def test_each_lift_has_its_own_nonce() -> None:
    raw = json.dumps({"url": big_url()}).encode()
    assert LiftedBody.lift(raw).marker != LiftedBody.lift(raw).marker


def test_exactly_keep_last_turns_user_turns_keep_whatever_comes_before_them() -> None:
    messages: list[Any] = [
        {"role": "assistant", "content": "Hello, what can I do?"},  # a greeting, no user yet
        {"role": "user", "content": [IMG_A]},
        {"role": "user", "content": "and this"},
    ]
    assert trim_turns(messages, 2, IMAGE_PARTS) == (messages, 0)


@pytest.mark.parametrize(
    ("content", "own"),
    [([{"type": "text", "text": "3"}], [{"type": "text", "text": "3"}]), (None, [])],
)
def test_carried_images_join_a_last_user_message_of_parts_or_none(
    content: list[Any] | None, own: list[Any]
) -> None:
    messages: list[Any] = [
        {"role": "user", "content": [IMG_A]},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": content},
    ]
    trimmed, dropped = trim_turns(messages, 1, IMAGE_PARTS)
    assert dropped == 2 and trimmed == [{"role": "user", "content": [IMG_A, *own]}]


@pytest.mark.parametrize("key", ["u", "ur", "url"])  # the quote at an odd and an even offset
def test_a_big_string_is_lifted_wherever_its_quote_falls(key: str) -> None:
    raw = json.dumps({key: big_url()}).encode()
    assert LiftedBody.lift(raw).strings == [big_url().encode()]
