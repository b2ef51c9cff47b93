"""The proxy's CPU worker pool: a thread pool of ``CHAT_PROXY_VISION_WORKERS`` threads for the
work too heavy for the event loop. It fits images (``prepare``), and it also cuts and parses
any big body, images or not (``lifting.LiftedBody.lift``, ``payloads.parse_body``, ``prepare``).

The threads run at a lower priority than the loop's thread, so a core busy with photographs
still goes to a text request first. A request is refused (429, retry shortly) before its first
job when the pool is behind by its whole backlog; the jobs of requests already admitted never
are.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from imageworks.chat_proxy.errors import RateLimited

T = TypeVar("T")

# How much lower the worker threads run than the event loop's thread (Linux nice values are per
# thread): on a busy core the scheduler then gives the loop the CPU whenever it has work.
WORKER_NICENESS = 10


def _yield_to_the_loop() -> None:
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICENESS)
    except (AttributeError, OSError):  # not Linux: threads share the process's priority
        pass


# How many jobs (an image, a big body to cut or parse) may wait for each worker thread before
# new requests are turned away: about 4 s of 12 MP photographs. Beyond it a burst of image
# requests would only queue, each holding its body (up to CHAT_PROXY_MAX_BODY_BYTES).
BACKLOG_PER_WORKER = 32


class WorkerPool:
    """Opened and closed by the lifespan (``ProxyState.pool``)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.backlog = workers * BACKLOG_PER_WORKER  # waiting, beyond those being worked on
        self.pending = 0  # jobs handed to the pool and not finished
        self.executor = ThreadPoolExecutor(
            workers, thread_name_prefix="imageworks-worker", initializer=_yield_to_the_loop
        )

    def has_room(self) -> None:
        """Called before a request's first job: a 429 (retry shortly) when the pool is behind
        by its whole backlog."""
        if self.pending >= self.workers + self.backlog:
            raise RateLimited(
                f"the proxy's CPU worker pool is at capacity ({self.pending} jobs waiting for "
                f"{self.workers} threads, CHAT_PROXY_VISION_WORKERS); retry shortly",
                headers={"Retry-After": "1"},
            )

    async def run(
        self, fn: Callable[..., T], *args: Any, when_done: Callable[[], None] | None = None
    ) -> T:
        """``fn(*args)`` in a worker thread. The job counts as pending until its thread is
        done with it, not until its caller stops waiting (a client gone): then ``when_done``
        runs, on the loop (the image prep gives back its decode budget there). A job not yet
        started when its caller stops waiting never starts."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        self.pending += 1

        def done() -> None:
            self.pending -= 1
            if when_done is not None:
                when_done()

        try:
            job = self.executor.submit(call)
        except BaseException:
            done()
            raise

        def finished(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to count
                loop.call_soon_threadsafe(done)

        job.add_done_callback(finished)
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
