"""A client's departure cancels the work watched for it: told by the proxy's own server
protocol without a watcher task (``departure.py``), and by the watcher task under a plain
uvicorn (the runbook's ``uvicorn imageworks.chat_proxy.app:app``)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import pytest
import uvicorn

from imageworks.chat_proxy.departure import CONNECTION
from imageworks.chat_proxy.server.serving import uvicorn_config
from imageworks.chat_proxy.upstream.forwarding import ClientGone, until_disconnect
from testkit.servers import free_port, wait_for_port

REQUEST = b"POST /work HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 2\r\n\r\n{}"


class Watched:
    """An ASGI app whose one request waits on until_disconnect for a minute; it notes how it
    was told and how many tasks ran while it waited."""

    def __init__(self) -> None:
        self.told = threading.Event()
        self.waiting = threading.Event()
        self.outcome: str | None = None
        self.by_departure: bool | None = None
        self.tasks = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()  # the body
        self.by_departure = CONNECTION.get() is not None

        async def work() -> None:
            await asyncio.sleep(0)
            self.tasks = len(asyncio.all_tasks())
            self.waiting.set()
            await asyncio.sleep(60)

        try:
            await until_disconnect(receive, work())
            self.outcome = "finished"
        except ClientGone:
            self.outcome = "gone"
        finally:
            self.told.set()


class Served:
    """``app`` under the proxy's uvicorn protocol (``guarded``) or uvicorn's own, in a thread."""

    def __init__(self, app: Watched, guarded: bool) -> None:
        self.port = free_port()
        config = (
            uvicorn_config(app, "127.0.0.1", self.port)
            if guarded
            else uvicorn.Config(
                app, host="127.0.0.1", port=self.port, http="httptools", lifespan="off"
            )
        )
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True
        )
        self.thread.start()
        wait_for_port(self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.loop.close()


@pytest.mark.parametrize("guarded", [True, False], ids=["proxy-protocol", "plain-uvicorn"])
def test_a_client_that_leaves_cancels_the_watched_work(guarded: bool) -> None:
    app = Watched()
    served = Served(app, guarded)
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(REQUEST)
            assert app.waiting.wait(10)
        assert app.told.wait(10), "the work was not cancelled when the client left"
        assert app.outcome == "gone"
        assert app.by_departure is guarded
    finally:
        served.stop()


def test_the_proxy_protocol_watches_without_a_task_of_its_own() -> None:
    counts = []
    for guarded in (True, False):
        app = Watched()
        served = Served(app, guarded)
        try:
            with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
                sock.sendall(REQUEST)
                assert app.waiting.wait(10)
            assert app.told.wait(10)
            counts.append(app.tasks)
        finally:
            served.stop()
    told, watched = counts
    assert watched == told + 1  # plain uvicorn: the request's task and its watcher


def test_a_pipelining_client_that_leaves_leaves_no_error_behind() -> None:
    # Two requests in one packet, then the client goes: the first (running) is told and ends
    # without an answer; uvicorn marks only the newest request disconnected, and logged "ASGI
    # callable returned without starting response" for the first.
    app = Watched()
    errors: list[str] = []

    class Note(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    note = Note(logging.ERROR)
    served = Served(app, True)  # (uvicorn's logging set-up first: it drops other handlers)
    logging.getLogger("uvicorn.error").addHandler(note)
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(REQUEST + REQUEST)
            assert app.waiting.wait(10)
        assert app.told.wait(10)
        assert app.outcome == "gone"
        time.sleep(0.2)  # uvicorn's check runs as the request's task ends
    finally:
        served.stop()
        logging.getLogger("uvicorn.error").removeHandler(note)
    assert errors == []
