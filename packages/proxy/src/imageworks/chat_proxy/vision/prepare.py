"""Images in a chat request, made to fit the model they go to.

Runs only for chat requests that carry images; a text request never comes here (and keeps its
byte-for-byte fast path). For a model with the ``vision`` capability: check the count and the
sizes, fit each inline image (``images.py``) in the vision pool, fetch remote images only from
hosts the entry allows, then trim the history if the entry asks. For a model without it that
opted in to ``vision.alt_text``: each image becomes ``[image: <alt text>]``.

Remote images are never fetched by default (the earlier proxy fetched any URL for Ollama: a
server-side request forgery hole). An engine that fetches URLs itself (vLLM, llama.cpp, an
OpenAI-compatible server) gets the URL untouched, under its own rules; one that cannot
(Ollama) gets a 400 that says how to allow the host.

The work runs in the CPU worker pool (``pool.WorkerPool``): Pillow releases the GIL while it
decodes, resizes and encodes, so the event loop keeps serving text requests while a batch of
photographs is prepared, and at most ``CHAT_PROXY_VISION_WORKERS`` images are worked on at once.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import (
    CapabilityMismatch,
    InvalidRequest,
    PayloadTooLarge,
)
from imageworks.chat_proxy.vision import history
from imageworks.chat_proxy.vision.budget import MB, DecodeBudget
from imageworks.chat_proxy.vision.images import (
    DataUrl,
    Fit,
    ImageError,
    Opened,
    Prepared,
    open_fetched,
    open_inline,
)
from imageworks.chat_proxy.vision.lifting import LiftedBody
from imageworks.chat_proxy.vision.pool import WorkerPool
from imageworks.chat_proxy.vision.remote import fetch_image, host_allowed
from imageworks.model_loader.schema import ModelEntry, RemoteImages

T = TypeVar("T")

IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


@dataclass
class ImageStats:
    """What image preparation did to one request (the JSONL record and /metrics)."""

    seen: int = 0
    resized: int = 0
    fetched: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    prep_ms: float = 0.0
    messages_trimmed: int = 0
    alt_texts: int = 0


@dataclass(frozen=True)
class VisionPolicy:
    """An entry's ``vision`` settings over the proxy's defaults, and what its engine takes."""

    fit: Fit
    max_images: int
    max_image_bytes: int
    remote: RemoteImages | None
    alt_text: bool
    keep_last_turns: int | None
    takes_image_urls: bool

    @classmethod
    def of(
        cls,
        entry: ModelEntry,
        config: ProxyConfig,
        formats: frozenset[str] | None = None,
        takes_image_urls: bool = True,
    ) -> VisionPolicy:
        v = entry.vision
        target = _first(v.target_long_edge, _legacy_target(entry), config.vision_target_long_edge)
        return cls(
            fit=Fit(target, _first(v.jpeg_quality, config.vision_jpeg_quality), formats),
            max_images=_first(v.max_images, config.vision_max_images),
            max_image_bytes=_first(v.max_image_bytes, config.vision_max_image_bytes),
            remote=v.remote_images,
            alt_text=v.alt_text,
            keep_last_turns=v.keep_last_turns,
            takes_image_urls=takes_image_urls,
        )

    @property
    def rewrites(self) -> bool:
        """Are inline images ever looked at? Not with no target and an engine taking any."""
        return self.fit.target_long_edge > 0 or self.fit.formats is not None


def _first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _legacy_target(entry: ModelEntry) -> int | None:
    """The earlier registry's ``metadata.vision_target_long_edge`` (or nested), still read."""
    meta = entry.metadata
    value = meta.get("vision_target_long_edge")
    if value is None and isinstance(meta.get("vision"), dict):
        value = meta["vision"].get("target_long_edge")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def image_parts(messages: list[Any]) -> list[tuple[int, int, dict[str, Any]]]:
    """(message index, part index, part) of every image part, in order."""
    return [
        (m, p, part)
        for m, message in enumerate(messages)
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for p, part in enumerate(message["content"])
        if isinstance(part, dict) and part.get("type") in IMAGE_PARTS
    ]


def image_url(part: dict[str, Any]) -> str | None:
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) else None


def alt_text(part: dict[str, Any]) -> str | None:
    for holder in (part, part.get("image_url")):
        if isinstance(holder, dict):
            text = holder.get("alt_text")
            if isinstance(text, str) and text.strip():
                return text.strip()
    return None


def where(m: int, p: int) -> str:
    return f"messages[{m}].content[{p}]"


class ImagePrep:
    """Fits a request's images to its model; the work runs in the proxy's CPU worker pool."""

    def __init__(
        self, pool: WorkerPool, decode_budget_bytes: int = 512 * MB, wait_s: float = 120.0
    ) -> None:
        self.pool = pool
        self.budget = DecodeBudget(decode_budget_bytes)
        self.wait_s = wait_s

    async def run(self, fn: Callable[..., T], *args: Any, holding: int = 0) -> T:
        """``fn(*args)`` in the pool; ``holding`` bytes of the decode budget stay taken until
        its thread is done with it (``WorkerPool.run``'s ``when_done``): a caller that stops
        waiting (a client gone) frees nothing a thread still uses."""
        if not holding:
            return await self.pool.run(fn, *args)
        return await self.pool.run(
            fn, *args, when_done=functools.partial(self.budget.give, holding)
        )

    async def decode(self, opened: Opened, at: str) -> Prepared:
        """Take the decode budget ``opened`` needs, then decode and fit it in the pool."""
        cost = opened.cost
        if cost > self.budget.total:
            raise PayloadTooLarge(
                f"the image at {at} would take {-(-cost // MB)} MB decoded; images are "
                f"decoded within {self.budget.total // MB} MB "
                "(CHAT_PROXY_VISION_DECODE_BUDGET_MB)",
                param=at,
            )
        if cost:
            await self.budget.take(cost, self.wait_s)
        return await self.run(opened.finish, holding=cost)

    async def prepare(
        self,
        entry: ModelEntry,
        body: dict[str, Any],
        policy: VisionPolicy,
        session: aiohttp.ClientSession,
        stats: ImageStats,
        lifted: LiftedBody | None = None,
    ) -> bool:
        """Fit the request's images to ``entry`` in place; True if the body changed.
        ``lifted``: the big data: URLs cut out of the body before it was parsed."""
        started = time.perf_counter()
        try:
            if not entry.capabilities.vision:
                return self._to_alt_text(entry, body["messages"], stats)
            return await self._fit(entry, body, policy, session, stats, lifted)
        finally:
            stats.prep_ms = round((time.perf_counter() - started) * 1000, 2)

    def _to_alt_text(self, entry: ModelEntry, messages: list[Any], stats: ImageStats) -> bool:
        parts = image_parts(messages)
        stats.seen = len(parts)
        for m, p, part in parts:
            text = alt_text(part)
            if text is None:
                raise CapabilityMismatch(
                    f"model {entry.name!r} does not accept images, and the image at "
                    f"{where(m, p)} has no alt_text to send in its place",
                    param=where(m, p),
                )
            messages[m]["content"][p] = {"type": "text", "text": f"[image: {text}]"}
            stats.alt_texts += 1
        return bool(parts)

    async def _fit(
        self,
        entry: ModelEntry,
        body: dict[str, Any],
        policy: VisionPolicy,
        session: aiohttp.ClientSession,
        stats: ImageStats,
        lifted: LiftedBody | None,
    ) -> bool:
        messages: list[Any] = body["messages"]
        parts = image_parts(messages)
        stats.seen = len(parts)
        if policy.max_images and len(parts) > policy.max_images:
            raise InvalidRequest(
                f"the request carries {len(parts)} images; model {entry.name!r} takes at most "
                f"{policy.max_images} (vision.max_images)",
                param="messages",
            )
        jobs: list[Callable[[], Awaitable[bool]]] = []
        for m, p, part in parts:
            url = image_url(part)
            if url is None:
                continue  # not an image_url shape we know: the engine judges it
            inline = lifted.value(url) if lifted is not None else None
            if inline is not None or url.startswith("data:"):
                if policy.rewrites:
                    data = url if inline is None else inline
                    job = functools.partial(self._inline, entry, m, p, part, data, policy, stats)
                    jobs.append(job)
            elif policy.remote is not None and host_allowed(url, policy.remote):
                remote = policy.remote
                jobs.append(
                    functools.partial(self._remote, m, p, part, url, policy, remote, session, stats)
                )
            elif not policy.takes_image_urls:
                raise InvalidRequest(
                    f"the image at {where(m, p)} is a URL, and model {entry.name!r} "
                    f"({entry.backend}) takes images only inline (data: URLs); the proxy "
                    "fetches remote images only from hosts listed in the entry's "
                    "vision.remote_images.allow_hosts",
                    param=where(m, p),
                )
        if jobs and lifted is None:  # a big body was admitted to the pool when it was cut
            self.pool.has_room()
        changed = await self._in_lanes(jobs)
        if policy.keep_last_turns is not None:
            trimmed, dropped = history.trim_turns(messages, policy.keep_last_turns, IMAGE_PARTS)
            if dropped:
                body["messages"] = trimmed
                stats.messages_trimmed = dropped
                changed = True
        return changed

    async def _in_lanes(self, jobs: list[Callable[[], Awaitable[bool]]]) -> bool:
        """Run one request's images at most ``workers`` at a time, stopping at the first that
        fails. Handing them all to the pool at once (as before) let one request of 50,000 tiny
        images hold 50,000 tasks (~300 MB), queue every other request's images behind its own,
        and keep the pool busy with the rest after its first bad image had been answered."""
        changed = False
        waiting = iter(jobs)

        async def lane() -> None:
            nonlocal changed
            for job in waiting:
                changed = await job() or changed

        lanes = [asyncio.ensure_future(lane()) for _ in range(min(self.pool.workers, len(jobs)))]
        try:
            await asyncio.gather(*lanes)
        finally:
            for running in lanes:
                running.cancel()
        return changed

    async def _inline(
        self,
        entry: ModelEntry,
        m: int,
        p: int,
        part: dict[str, Any],
        url: str | bytes,
        policy: VisionPolicy,
        stats: ImageStats,
    ) -> bool:
        try:
            size = DataUrl.parse(url).decoded_size()
        except ImageError as exc:
            raise InvalidRequest(
                f"the image at {where(m, p)} cannot be read: {exc}", param=where(m, p)
            ) from None
        if size > policy.max_image_bytes:
            raise PayloadTooLarge(
                f"the image at {where(m, p)} is {size} bytes; model {entry.name!r} takes "
                f"images up to {policy.max_image_bytes} bytes (vision.max_image_bytes)",
                param=where(m, p),
            )
        try:
            opened = await self.run(open_inline, url, policy.fit)
            prepared = await self.decode(opened, where(m, p))
        except ImageError as exc:
            raise InvalidRequest(
                f"the image at {where(m, p)} cannot be read: {exc}", param=where(m, p)
            ) from None
        return self._apply(part, prepared, policy, stats)

    async def _remote(
        self,
        m: int,
        p: int,
        part: dict[str, Any],
        url: str,
        policy: VisionPolicy,
        remote: RemoteImages,
        session: aiohttp.ClientSession,
        stats: ImageStats,
    ) -> bool:
        raw = await fetch_image(session, url, remote, where(m, p))
        stats.fetched += 1
        try:
            opened = await self.run(open_fetched, raw, policy.fit)
            prepared = await self.decode(opened, where(m, p))
        except ImageError as exc:
            raise InvalidRequest(
                f"the image fetched for {where(m, p)} cannot be read: {exc}", param=where(m, p)
            ) from None
        return self._apply(part, prepared, policy, stats)

    @staticmethod
    def _apply(
        part: dict[str, Any], prepared: Prepared, policy: VisionPolicy, stats: ImageStats
    ) -> bool:
        stats.bytes_in += prepared.bytes_in
        stats.bytes_out += prepared.bytes_out
        stats.resized += prepared.resized
        shape_fixed = not policy.takes_image_urls and part.get("type") != "image_url"
        if prepared.url is None and not shape_fixed:
            return False
        url = prepared.url or image_url(part)
        old = part.get("image_url")
        new = {**old, "url": url} if isinstance(old, dict) else {"url": url}
        if shape_fixed:  # the one part shape an engine like Ollama reads
            part.clear()
            part["type"] = "image_url"
        part["image_url"] = new
        return True
