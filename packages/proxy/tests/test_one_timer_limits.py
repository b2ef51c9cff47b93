"""The hot path's limits kept with one timer each instead of one per read or per request: a
relayed stream's idle-read limit (``upstream/idle.py``), a body's idle and total limits
(``request/bodies.py``, ``BodyClock``), the head timer of a kept-alive connection and the response
head written with the body (``server/serving.py``). Their end-to-end cases (a silent stream, a
silent or trickled body, a slow head) are in test_error_paths, test_bounds and test_exposure."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from imageworks.chat_proxy.errors import RequestTimeout
from imageworks.chat_proxy.request.bodies import BodyClock
from imageworks.chat_proxy.server.serving import HeadWithBody
from imageworks.chat_proxy.upstream.idle import IdleLimit


class Body:
    def __init__(self) -> None:
        self.failed: BaseException | None = None

    def set_exception(self, exc: BaseException) -> None:
        self.failed = exc


class Response:
    def __init__(self) -> None:
        self.content = Body()


def test_a_stream_silent_past_the_limit_fails_as_aiohttp_would() -> None:
    async def run() -> BaseException | None:
        response = Response()
        IdleLimit(response, 0.05)  # type: ignore[arg-type]
        await asyncio.sleep(0.15)
        return response.content.failed

    failed = asyncio.run(run())
    assert isinstance(failed, aiohttp.SocketTimeoutError)
    assert isinstance(failed, TimeoutError)  # classified as the backend's timeout


def test_chunks_within_the_limit_and_time_spent_sending_never_fail_the_stream() -> None:
    async def run() -> tuple[BaseException | None, BaseException | None]:
        response = Response()
        idle = IdleLimit(response, 0.1)  # type: ignore[arg-type]
        for _ in range(6):  # a chunk every 0.05 s, 0.3 s in all: three times the limit
            await asyncio.sleep(0.05)
            idle.got()
            idle.waiting()
        idle.got()  # sending to a slow client for twice the limit: not the backend's silence
        await asyncio.sleep(0.2)
        during_send = response.content.failed
        idle.waiting()
        await asyncio.sleep(0.2)  # and now the backend is silent
        idle.stop()
        return during_send, response.content.failed

    during_send, after = asyncio.run(run())
    assert during_send is None
    assert isinstance(after, aiohttp.SocketTimeoutError)


def test_a_stopped_limit_fails_nothing() -> None:
    async def run() -> BaseException | None:
        response = Response()
        IdleLimit(response, 0.05).stop()  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        return response.content.failed

    assert asyncio.run(run()) is None


def test_the_body_clock_fails_a_silent_read_and_counts_only_time_spent_waiting() -> None:
    async def run() -> tuple[str, float]:
        clock = BodyClock(idle_s=0.1, deadline_s=10)
        never = asyncio.Event()

        async def receive() -> Any:
            await asyncio.sleep(0.02)
            return {"type": "http.request", "body": b"x", "more_body": True}

        await clock.read(receive)
        await asyncio.sleep(0.3)  # the app busy between reads: not the client's silence
        await clock.read(receive)
        started = asyncio.get_running_loop().time()

        async def silent() -> Any:
            await never.wait()

        with pytest.raises(RequestTimeout) as refused:
            await clock.read(silent)
        return str(refused.value), asyncio.get_running_loop().time() - started

    message, waited = asyncio.run(run())
    assert "CHAT_PROXY_BODY_TIMEOUT_S" in message and 0.09 < waited < 0.5


def test_the_body_clock_keeps_the_total_deadline_however_often_bytes_come() -> None:
    async def run() -> str:
        clock = BodyClock(idle_s=1, deadline_s=0.2)

        async def trickle() -> Any:
            await asyncio.sleep(0.03)
            return {"type": "http.request", "body": b"x", "more_body": True}

        with pytest.raises(RequestTimeout) as refused:
            for _ in range(100):
                await clock.read(trickle)
        return str(refused.value)

    assert "CHAT_PROXY_BODY_DEADLINE_S" in asyncio.run(run())


def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    async def run() -> None:
        clock = BodyClock(idle_s=0.05, deadline_s=10)

        async def slow() -> Any:
            await asyncio.sleep(1)

        task = asyncio.ensure_future(clock.read(slow))
        await asyncio.sleep(0.01)
        task.cancel()  # the server shutting down, before the idle limit
        with pytest.raises(asyncio.CancelledError):
            await task
        clock.stop()

    asyncio.run(run())


def test_a_cancel_landing_with_the_expiry_stays_a_cancel() -> None:
    async def run() -> None:
        clock = BodyClock(idle_s=0.05, deadline_s=10)

        async def slow() -> Any:
            await asyncio.sleep(1)

        task = asyncio.ensure_future(clock.read(slow))
        await asyncio.sleep(0)
        assert clock.timer is not None
        # The server's cancel due in the same step as the idle expiry: two cancels on the task,
        # the expiry's taken back; the task ends cancelled, not as a 408 nobody is there to get.
        asyncio.get_running_loop().call_at(clock.timer.when(), task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert clock.expired is not None  # the expiry did fire with it
        clock.stop()

    asyncio.run(run())


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Cycle:
    def __init__(self) -> None:
        self.transport: Any = Transport()


def test_a_head_and_its_body_written_in_one_step_go_out_in_one_write() -> None:
    async def run() -> tuple[list[bytes], bool]:
        cycle = Cycle()
        real = cycle.transport
        HeadWithBody(cycle, asyncio.get_running_loop())
        cycle.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        cycle.transport.write(b"{}")
        await asyncio.sleep(0)
        cycle.transport.write(b"more")  # after the head: straight to the socket's transport
        return real.writes, cycle.transport is real

    writes, restored = asyncio.run(run())
    assert writes == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"more"] and restored


def test_a_head_alone_goes_out_at_the_end_of_its_step() -> None:
    async def run() -> list[list[bytes]]:
        cycle = Cycle()
        real = cycle.transport
        HeadWithBody(cycle, asyncio.get_running_loop())
        cycle.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")  # a stream's head: no body yet
        seen = [list(real.writes)]
        await asyncio.sleep(0)
        seen.append(list(real.writes))
        cycle.transport.write(b"data: 1\n\n")
        seen.append(list(real.writes))
        return seen

    before, after_step, after_chunk = asyncio.run(run())
    assert before == [] and after_step == [b"HTTP/1.1 200 OK\r\n\r\n"]
    assert after_chunk == [b"HTTP/1.1 200 OK\r\n\r\n", b"data: 1\n\n"]


def test_a_held_head_is_written_before_the_connection_closes() -> None:
    async def run() -> tuple[list[bytes], bool]:
        cycle = Cycle()
        real = cycle.transport
        HeadWithBody(cycle, asyncio.get_running_loop())
        cycle.transport.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
        cycle.transport.close()
        await asyncio.sleep(0)
        return real.writes, real.closed

    writes, closed = asyncio.run(run())
    assert writes == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"] and closed
