"""Images through a real proxy to fake engines that record what they receive (issue 17)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from aiohttp import web

from imageworks.chat_proxy.vision import images
from imageworks.chat_proxy.vision import prepare as vision
from testkit.entries import eventually
from testkit.fake_engine import entry_for
from testkit.images import (
    data_url,
    decode_data_url,
    gif_bytes,
    image_part,
    jpeg_bytes,
    photo,
    png_bytes,
    png_declaring,
)
from testkit.servers import AiohttpServer

VISION = {"text": True, "vision": True}


def chat(*parts: dict[str, Any], model: str = "m", **more: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": "What is in the picture?"}, *parts]
    return {"model": model, "messages": [{"role": "user", "content": content}], **more}


def sent_parts(engine: Any) -> list[dict[str, Any]]:
    (recorded,) = engine.requests
    return [
        part
        for message in recorded.body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]


@pytest.fixture(scope="module")
def big_rotated_jpeg() -> bytes:
    """A 6000x4000 camera JPEG taken with the camera turned (EXIF orientation 6)."""
    return jpeg_bytes(photo(6000, 4000), orientation=6)


class ImageHost:
    """A loopback web server with one image, counting the requests it gets."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        app = web.Application()
        app.router.add_get("/cat.png", self.serve)
        app.router.add_get("/elsewhere.png", self.redirect)
        app.router.add_get("/chunked.png", self.serve_chunked)
        app.router.add_get("/never.png", self.never)
        self.server = AiohttpServer(app)
        self.url = self.server.url

    async def serve(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.Response(body=png_bytes(3000, 2000), content_type="image/png")

    async def serve_chunked(self, request: web.Request) -> web.StreamResponse:
        """The same image without a Content-Length: only counting the bytes can stop it."""
        self.hits.append(request.path)
        response = web.StreamResponse(headers={"content-type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        body = png_bytes(3000, 2000)
        for at in range(0, len(body), 65536):
            await response.write(body[at : at + 65536])
        await response.write_eof()
        return response

    async def never(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        await asyncio.Event().wait()  # answers nothing until the server stops
        raise AssertionError("unreachable")

    async def redirect(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.server.stop()


def test_a_large_photo_reaches_a_vision_model_at_the_target_size_upright(
    proxy_factory, fake_vllm, big_rotated_jpeg: bytes
) -> None:
    entry = entry_for("m", fake_vllm.url, capabilities=VISION, vision={"target_long_edge": 1024})
    proxy = proxy_factory([entry])
    response = proxy.client.post(
        "/v1/chat/completions", json=chat(image_part(data_url(big_rotated_jpeg, "image/jpeg")))
    )
    assert response.status_code == 200, response.text
    (part,) = sent_parts(fake_vllm.engine)
    assert part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    image = decode_data_url(part["image_url"]["url"])
    assert image.format == "JPEG"
    # Orientation 6 turned upright: the 6000x4000 landscape is a portrait, long edge 1024.
    assert image.size == (683, 1024)
    # The red top-left quadrant of the stored picture is now at the top right.
    assert _is_red(image.getpixel((600, 100))) and not _is_red(image.getpixel((80, 100)))
    assert image.getexif().get(0x0112) is None  # no orientation left to apply twice
    (record,) = proxy.records()
    assert record["images"] == 1 and record["images_resized"] == 1
    assert record["image_bytes_in"] == len(big_rotated_jpeg)
    assert 0 < record["image_bytes_out"] < len(big_rotated_jpeg) // 5
    assert record["image_prep_ms"] > 0
    metrics = metric_values(proxy.client.get("/metrics").text)
    assert metrics['chat_proxy_images_total{action="resized",model="m"}'] == 1
    assert metrics['chat_proxy_images_total{action="seen",model="m"}'] == 1
    assert metrics['chat_proxy_image_bytes_total{direction="in",model="m"}'] == len(
        big_rotated_jpeg
    )
    assert (
        metrics['chat_proxy_image_bytes_total{direction="out",model="m"}']
        == (record["image_bytes_out"])
    )
    assert metrics['chat_proxy_image_prep_seconds_count{model="m"}'] == 1


def metric_values(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _is_red(pixel: Any) -> bool:
    r, _, b = pixel[:3]
    return bool(r > 150 and b < 100)


def test_a_small_png_arrives_byte_for_byte(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, "vllm", "served", capabilities=VISION)])
    url = data_url(png_bytes(), "image/png")
    raw = json.dumps(chat(image_part(url, detail="high"), model="served")).encode()
    response = proxy.client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    (recorded,) = fake_vllm.engine.requests
    # The whole body as it came: the image fits and the proxy had nothing else to add.
    assert recorded.raw == raw
    (record,) = proxy.records()
    assert (record["images"], record["images_resized"]) == (1, 0)
    assert record["image_bytes_in"] == record["image_bytes_out"] == len(png_bytes())


def test_a_text_request_to_a_vision_entry_is_forwarded_byte_for_byte(
    proxy_factory, fake_vllm
) -> None:
    entry = entry_for("m", fake_vllm.url, "vllm", "served", capabilities=VISION)
    entry["vision"] = {"target_long_edge": 512, "keep_last_turns": 1}
    proxy = proxy_factory([entry])
    raw = json.dumps(
        {
            "model": "served",
            "messages": [
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "two"},
                {"role": "user", "content": "three"},
            ],
        },
        indent=1,  # a layout json.dumps on our side would not reproduce
    ).encode()
    response = proxy.client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200
    assert fake_vllm.engine.requests[0].raw == raw
    (record,) = proxy.records()
    assert "images" not in record  # no image work at all


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("data:image/jpeg;base64,/9j/4AAQ!!!notbase64", "its base64 data is corrupt"),
        ("data:image/png;base64," + "QUJD" * 10, "it is not an image Pillow can read"),
        (data_url(png_declaring(12_000, 12_000), "image/png"), "more than 89478485 pixels"),
        (data_url(png_declaring(50_000, 50_000), "image/png"), "more than 89478485 pixels"),
    ],
)
def test_an_unreadable_image_is_a_400_naming_the_message_and_part(
    proxy_factory, fake_vllm, url: str, why: str
) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, capabilities=VISION)])
    response = proxy.client.post("/v1/chat/completions", json=chat(image_part(url)))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "messages[0].content[1]"
    assert error["message"].startswith("the image at messages[0].content[1] cannot be read: ")
    assert why in error["message"]
    assert fake_vllm.engine.requests == []
    (record,) = proxy.records()
    assert record["error_code"] == "err_invalid_request"


def test_image_count_and_size_limits(proxy_factory, fake_vllm) -> None:
    entry = entry_for(
        "m", fake_vllm.url, capabilities=VISION, vision={"max_images": 1, "max_image_bytes": 500}
    )
    proxy = proxy_factory([entry])
    small = image_part(data_url(png_bytes(8, 8), "image/png"))
    two = proxy.client.post("/v1/chat/completions", json=chat(small, small))
    assert two.status_code == 400
    assert "takes at most 1 (vision.max_images)" in two.json()["error"]["message"]
    big = image_part(data_url(png_bytes(300, 300) + b"\0" * 600, "image/png"))
    too_big = proxy.client.post("/v1/chat/completions", json=chat(big))
    assert too_big.status_code == 413
    assert too_big.json()["error"]["param"] == "messages[0].content[1]"
    assert proxy.client.post("/v1/chat/completions", json=chat(small)).status_code == 200


def test_a_remote_image_is_not_fetched_by_the_proxy_unless_allow_listed(
    proxy_factory, fake_vllm, fake_ollama, image_host: ImageHost
) -> None:
    url = image_host.url + "/cat.png"
    proxy = proxy_factory(
        [
            entry_for("vllm-vision", fake_vllm.url, capabilities=VISION),
            entry_for(
                "ollama-vision", fake_ollama.url, "ollama", "qwen2.5vl:7b", capabilities=VISION
            ),
        ]
    )
    # vLLM fetches URLs itself, under its own rules: the URL goes on untouched.
    answer = proxy.client.post(
        "/v1/chat/completions", json=chat(image_part(url), model="vllm-vision")
    )
    assert answer.status_code == 200
    assert sent_parts(fake_vllm.engine)[0]["image_url"]["url"] == url
    # Ollama cannot take a URL, and the proxy does not fetch it for it: a clear 400.
    refused = proxy.client.post(
        "/v1/chat/completions", json=chat(image_part(url), model="ollama-vision")
    )
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "takes images only inline" in message
    assert "vision.remote_images.allow_hosts" in message
    assert image_host.hits == []
    assert fake_ollama.engine.requests == []


def test_an_allow_listed_remote_image_is_fetched_fitted_and_inlined_for_ollama(
    proxy_factory, fake_ollama, image_host: ImageHost
) -> None:
    remote = {"allow_hosts": ["127.0.0.1"], "max_bytes": 5_000_000, "timeout_s": 5}
    entry = entry_for(
        "m",
        fake_ollama.url,
        "ollama",
        "qwen2.5vl:7b",
        capabilities=VISION,
        vision={"target_long_edge": 768, "remote_images": remote},
    )
    proxy = proxy_factory([entry])
    response = proxy.client.post(
        "/v1/chat/completions", json=chat(image_part(image_host.url + "/cat.png"), model="m")
    )
    assert response.status_code == 200, response.text
    assert image_host.hits == ["/cat.png"]
    image = decode_data_url(sent_parts(fake_ollama.engine)[0]["image_url"]["url"])
    assert image.size == (768, 512) and image.format == "PNG"  # it has transparency
    (record,) = proxy.records()
    assert (record["images_fetched"], record["images_resized"]) == (1, 1)
    # A redirect is not followed (it could leave the allow-list), and a host not on the list
    # is never asked.
    redirected = proxy.client.post(
        "/v1/chat/completions",
        json=chat(image_part(image_host.url + "/elsewhere.png"), model="m"),
    )
    assert redirected.status_code == 400
    assert "HTTP 302 (redirects are not followed)" in redirected.json()["error"]["message"]
    other = image_host.url.replace("127.0.0.1", "localhost") + "/cat.png"
    assert (
        proxy.client.post(
            "/v1/chat/completions", json=chat(image_part(other), model="m")
        ).status_code
        == 400
    )
    assert image_host.hits == ["/cat.png", "/elsewhere.png"]


def test_ollama_gets_images_in_the_form_its_openai_layer_accepts(
    proxy_factory, fake_ollama, big_rotated_jpeg: bytes
) -> None:
    entry = entry_for("m", fake_ollama.url, "ollama", "qwen2.5vl:7b", capabilities=VISION)
    proxy = proxy_factory([entry])
    small_png = data_url(png_bytes(), "image/png")
    mislabelled = data_url(png_bytes(), "application/octet-stream")
    gif = data_url(gif_bytes(), "image/gif")
    big = data_url(big_rotated_jpeg, "image/jpeg")
    body = chat(
        image_part(small_png),
        image_part(mislabelled),
        image_part(gif),
        {"type": "input_image", "image_url": big},
        model="m",
        stream=True,
    )
    # The fake answers 400 "invalid image input" for anything real Ollama refuses.
    response = proxy.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.text.rstrip().endswith("data: [DONE]")
    parts = sent_parts(fake_ollama.engine)
    assert [p["type"] for p in parts] == ["image_url"] * 4
    urls = [p["image_url"]["url"] for p in parts]
    assert urls[0] == small_png  # fits, an accepted format: untouched
    assert urls[1] == "data:image/png;base64," + mislabelled.split(",", 1)[1]  # relabelled
    assert decode_data_url(urls[2]).format in ("PNG", "JPEG")  # GIF: not taken by Ollama
    assert decode_data_url(urls[3]).size == (1024, 1536)  # the default target, upright


def test_a_non_vision_model_gets_alt_text_only_when_it_opted_in(proxy_factory, fake_vllm) -> None:
    url = data_url(png_bytes(), "image/png")
    proxy = proxy_factory(
        [
            entry_for("plain", fake_vllm.url),
            entry_for("alt", fake_vllm.url, vision={"alt_text": True}),
        ]
    )
    described = image_part(url, alt_text="a red bicycle")
    refused = proxy.client.post("/v1/chat/completions", json=chat(described, model="plain"))
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "capability_mismatch"
    ok = proxy.client.post(
        "/v1/chat/completions",
        json=chat(
            described, {"type": "image_url", "alt_text": "a map", "image_url": url}, model="alt"
        ),
    )
    assert ok.status_code == 200, ok.text
    content = fake_vllm.engine.requests[0].body["messages"][0]["content"]
    assert [p["text"] for p in content[1:]] == ["[image: a red bicycle]", "[image: a map]"]
    metrics = metric_values(proxy.client.get("/metrics").text)
    assert metrics['chat_proxy_images_total{action="alt_text",model="alt"}'] == 2
    # One image without alt text: refused, never dropped in silence.
    missing = proxy.client.post(
        "/v1/chat/completions", json=chat(described, image_part(url), model="alt")
    )
    assert missing.status_code == 409
    assert missing.json()["error"]["message"] == (
        "model 'alt' does not accept images, and the image at messages[0].content[2] has no "
        "alt_text to send in its place"
    )
    assert len(fake_vllm.engine.requests) == 1


def conversation(image: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You describe photographs."},
        {"role": "user", "content": [{"type": "text", "text": "first"}, image]},
        {"role": "assistant", "content": "A bicycle."},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "third"},
    ]


def test_history_trimming_is_off_by_default(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, "vllm", "served", capabilities=VISION)])
    image = image_part(data_url(png_bytes(), "image/png"))
    raw = json.dumps({"model": "served", "messages": conversation(image)}).encode()
    response = proxy.client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert fake_vllm.engine.requests[0].raw == raw
    assert proxy.records()[0]["messages_trimmed"] == 0


def test_history_trimming_keeps_the_last_turns_and_carries_the_images(
    proxy_factory, fake_vllm
) -> None:
    entry = entry_for("m", fake_vllm.url, capabilities=VISION, vision={"keep_last_turns": 1})
    proxy = proxy_factory([entry])
    image = image_part(data_url(png_bytes(), "image/png"))
    response = proxy.client.post(
        "/v1/chat/completions", json={"model": "m", "messages": conversation(image)}
    )
    assert response.status_code == 200, response.text
    assert fake_vllm.engine.requests[0].body["messages"] == [
        {"role": "system", "content": "You describe photographs."},
        {"role": "user", "content": [image, {"type": "text", "text": "third"}]},
    ]
    assert proxy.records()[0]["messages_trimmed"] == 4


@pytest.mark.parametrize("target", [0, 4000])
def test_a_big_image_that_fits_travels_unchanged_when_the_body_is_rewritten(
    proxy_factory, fake_vllm, target: int
) -> None:
    entry = entry_for("m", fake_vllm.url, "vllm", "served", capabilities=VISION)
    entry["vision"] = {"target_long_edge": target}
    proxy = proxy_factory([entry])
    url = data_url(jpeg_bytes(photo(2000, 1500, grain=60), quality=95), "image/jpeg")
    assert len(url) > 1024 * 1024  # a body the proxy cuts before parsing it
    response = proxy.client.post("/v1/chat/completions", json=chat(image_part(url), model="m"))
    assert response.status_code == 200, response.text
    (recorded,) = fake_vllm.engine.requests
    assert recorded.body["model"] == "served"  # the body was written again ...
    assert sent_parts(fake_vllm.engine)[0]["image_url"]["url"] == url  # ... the image as it came


def test_image_requests_beyond_the_pools_backlog_are_a_429_and_text_is_never_held_up(
    proxy_factory, fake_vllm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One vision thread, a backlog of 2, and every image stuck in preparation: three requests
    are taken (one prepared, two waiting), the fourth is a 429 with Retry-After at once (the
    queue was unbounded, each waiter holding its body), a text request to the same model is
    answered meanwhile, and once the images come through the three are answered."""
    release = threading.Event()

    def stuck(url: str | bytes, fit: Any) -> Any:
        release.wait(60)
        return images.open_inline(url, fit)

    monkeypatch.setattr(vision, "open_inline", stuck)
    proxy = proxy_factory([entry_for("m", fake_vllm.url, capabilities=VISION)], vision_workers=1)
    prep = proxy.state.pool
    prep.backlog = 2
    body = chat(image_part(data_url(png_bytes(8, 8), "image/png")))
    with ThreadPoolExecutor(3) as clients:
        try:
            taken = [
                clients.submit(proxy.client.post, "/v1/chat/completions", json=body)
                for _ in range(3)
            ]
            assert eventually(lambda: prep.pending == 3)
            refused = proxy.client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            error = refused.json()["error"]
            assert (
                error["code"] == "rate_limited"
                and "CPU worker pool is at capacity" in error["message"]
            )
            text = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            assert proxy.client.post("/v1/chat/completions", json=text).status_code == 200
        finally:
            release.set()
        assert [f.result().status_code for f in taken] == [200, 200, 200]
    assert prep.pending == 0


@pytest.mark.parametrize("path", ["/cat.png", "/chunked.png"])
def test_a_remote_image_over_max_bytes_is_a_413_with_or_without_a_length(
    proxy_factory, fake_ollama, image_host: ImageHost, path: str
) -> None:
    remote = {"allow_hosts": ["127.0.0.1"], "max_bytes": 10_000, "timeout_s": 30}
    entry = entry_for(
        "m",
        fake_ollama.url,
        "ollama",
        "qwen2.5vl:7b",
        capabilities=VISION,
        vision={"remote_images": remote},
    )
    proxy = proxy_factory([entry])
    answer = proxy.client.post(
        "/v1/chat/completions", json=chat(image_part(image_host.url + path), model="m")
    )
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["param"] == "messages[0].content[1]"
    assert "larger than 10000 bytes (vision.remote_images.max_bytes)" in error["message"]
    assert image_host.hits == [path] and fake_ollama.engine.requests == []


def test_a_remote_image_that_never_comes_is_a_400_within_timeout_s(
    proxy_factory, fake_ollama, image_host: ImageHost
) -> None:
    remote = {"allow_hosts": ["127.0.0.1"], "max_bytes": 10_000, "timeout_s": 0.5}
    entry = entry_for(
        "m",
        fake_ollama.url,
        "ollama",
        "qwen2.5vl:7b",
        capabilities=VISION,
        vision={"remote_images": remote},
    )
    proxy = proxy_factory([entry])
    answer = proxy.client.post(
        "/v1/chat/completions", json=chat(image_part(image_host.url + "/never.png"), model="m")
    )
    assert answer.status_code == 400, answer.text
    assert "took longer than 0.5 s" in answer.json()["error"]["message"]
    assert fake_ollama.engine.requests == []


def test_an_image_of_exactly_max_image_bytes_is_taken(proxy_factory, fake_vllm) -> None:
    image = png_bytes(8, 8)
    entry = entry_for(
        "m", fake_vllm.url, capabilities=VISION, vision={"max_image_bytes": len(image)}
    )
    proxy = proxy_factory([entry])
    answer = proxy.client.post(
        "/v1/chat/completions", json=chat(image_part(data_url(image, "image/png")))
    )
    assert answer.status_code == 200, answer.text


def test_every_image_part_shape_is_seen_and_given_to_ollama_as_image_url(
    proxy_factory, fake_ollama
) -> None:
    entry = entry_for("m", fake_ollama.url, "ollama", "qwen2.5vl:7b", capabilities=VISION)
    proxy = proxy_factory([entry])
    url = data_url(png_bytes(), "image/png")
    shapes = [
        image_part(url),
        {"type": "input_image", "image_url": url},
        {"type": "image", "image_url": {"url": url}},
    ]
    response = proxy.client.post("/v1/chat/completions", json=chat(*shapes, model="m"))
    assert response.status_code == 200, response.text
    parts = sent_parts(fake_ollama.engine)
    assert [p["image_url"]["url"] for p in parts] == [url] * 3
    metrics = metric_values(proxy.client.get("/metrics").text)
    assert metrics['chat_proxy_images_total{action="seen",model="m"}'] == 3
