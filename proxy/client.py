"""The client's side of the connection: noticing that it went away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from starlette.requests import Request


class ClientGone(Exception):
    """The client hung up before the reply was ready; the upstream request was cancelled."""


async def unless_client_leaves(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it if the client disconnects first (the body is read by now).

    `work` runs in the calling task, and a watcher cancels that task when the client leaves, as
    `asyncio.timeout` does; the cancellation is then taken back and ClientGone raised, unless the
    task was also cancelled for another reason. (Running `work` in a task of its own and waiting
    for the first of two tasks cost ~15 µs per request; this ~5 µs.)"""
    task = asyncio.current_task()
    assert task is not None
    watch = _Watch(task)
    watcher = asyncio.get_running_loop().create_task(_disconnected(request.receive))
    watcher.add_done_callback(watch.left)
    cancelling = task.cancelling()
    try:
        return await work
    except asyncio.CancelledError:
        if watch.cancelled and task.uncancel() <= cancelling:
            raise ClientGone from None
        raise
    finally:
        watch.active = False  # a callback already scheduled must not cancel what the task does next
        watcher.cancel()


class _Watch:
    __slots__ = ("task", "active", "cancelled")

    def __init__(self, task: asyncio.Task) -> None:
        self.task, self.active, self.cancelled = task, True, False

    def left(self, watcher: asyncio.Task) -> None:
        if self.active and not watcher.cancelled():
            watcher.exception()  # a receive() that failed: the connection is gone all the same
            self.cancelled = True
            self.task.cancel()


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
