"""Heartbeats for a silent stream: an SSE comment whenever the relayed chunks pause too long.

Reasoning models can think for minutes before their first token; proxies in between (a Space's
front, a client's HTTP library) drop a connection that says nothing for a while. `keep_alive`
wraps any chunk iterator: the chunks pass unchanged, one at a time, and a comment line goes out
whenever none came for `interval` seconds. Chunks are whole SSE events, so a comment never lands
inside one. Comment lines are ignored by SSE clients (the openai and anthropic SDKs included).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

HEARTBEAT = b": heartbeat\n\n"
_END = object()


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


async def keep_alive(chunks: AsyncIterator[bytes], interval: float, beat: bytes = HEARTBEAT) -> AsyncIterator[bytes]:
    """`chunks`, with `beat` whenever they are silent for `interval` seconds (0: no heartbeats).

    The chunks are read by a helper task, one ahead at most (the client's pace still holds the
    upstream back). When the consumer stops (the client went away), the helper is cancelled and
    `chunks` closed, so whatever `chunks` holds open (an upstream connection) is closed too."""
    if interval <= 0:
        async for chunk in chunks:
            yield chunk
        return
    loop = asyncio.get_running_loop()
    ready: deque = deque()
    state: dict = {"waiter": None, "resume": None, "last": loop.time()}

    def put(item: object) -> None:
        ready.append(item)
        waiter = state["waiter"]
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def pump() -> None:
        try:
            async for chunk in chunks:
                put(chunk)
                resume = state["resume"] = loop.create_future()
                await resume  # until the consumer took it
            put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(exc))
        finally:
            with contextlib.suppress(BaseException):
                await chunks.aclose()  # type: ignore[attr-defined]

    def tick() -> None:
        state["timer"] = None
        waiter = state["waiter"]
        silent = loop.time() - state["last"]
        if waiter is not None and not waiter.done() and silent >= interval * 0.999:
            waiter.set_result(beat)
            return
        state["timer"] = loop.call_later(max(interval - silent, 0.001), tick)

    task = loop.create_task(pump())
    state["timer"] = loop.call_later(interval, tick)
    try:
        while True:
            if not ready:
                waiter = state["waiter"] = loop.create_future()
                try:
                    got = await waiter
                finally:
                    state["waiter"] = None
                if got is beat and not ready:
                    state["last"] = loop.time()
                    if state["timer"] is None:
                        state["timer"] = loop.call_later(interval, tick)
                    yield beat
                    continue
            item = ready.popleft()
            resume = state["resume"]
            if resume is not None and not resume.done():
                resume.set_result(None)
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            state["last"] = loop.time()
            if state["timer"] is None:
                state["timer"] = loop.call_later(interval, tick)
            yield item
    finally:
        timer = state.get("timer")
        if timer is not None:
            timer.cancel()
        task.cancel()
