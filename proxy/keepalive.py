"""Heartbeats for a silent stream: an SSE comment whenever the client has heard nothing for a while.

Reasoning models can think for minutes before their first token; proxies in between (a Space's
front, a client's HTTP library) drop a connection that says nothing for a while. The relay reads
the upstream through `Silence.read`, which gives up a read (None) once the client has heard
nothing for `interval` seconds; the relay then sends a comment line between two whole events, so
a comment never lands inside one. Comment lines are ignored by SSE clients (the openai and
anthropic SDKs included).

It costs nothing per chunk but a clock read: one timer per stream, due when the interval would
end, checks whether the stream is still silent and the relay still waits in a read; only then is
that read interrupted (a cancellation taken back at once, as `asyncio.timeout` does). Earlier
versions read the upstream in a helper task and handed every chunk over through two futures:
three task switches a chunk instead of one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

HEARTBEAT = b": heartbeat\n\n"


class Silence:
    """Watches one stream for `interval` seconds without a word to the client (interval > 0).

    `read(fn)` awaits `fn()` and returns what it returns, or None when the interval passed during
    the read: the read is then abandoned, so it must be one that loses nothing when cancelled
    (aiohttp's `StreamReader.readany` keeps its bytes buffered for the next read). `spoke()` notes
    that the client was just sent something; `close()` stops the timer.

    With `read_timeout` and `on_read_timeout`, the same timer calls `on_read_timeout()` once a read
    has waited that long since the upstream's last byte, so the HTTP client need not re-arm a
    timer of its own for every chunk."""

    __slots__ = ("interval", "read_timeout", "on_read_timeout", "_loop", "_last", "_heard", "_timer", "_task",
                 "_reading", "_fired")  # fmt: skip

    def __init__(
        self, interval: float, read_timeout: float | None = None, on_read_timeout: Callable[[], None] | None = None
    ) -> None:
        self.interval = interval
        self.read_timeout = read_timeout if on_read_timeout is not None else None
        self.on_read_timeout = on_read_timeout
        self._loop = asyncio.get_running_loop()
        self._last = self._heard = self._loop.time()
        self._task: asyncio.Task | None = None  # the task reading (the one driving the relay)
        self._reading = False
        self._fired = False  # a read is being interrupted for a heartbeat
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(self._due(), self._tick)

    def spoke(self) -> None:
        self._last = self._loop.time()

    def _due(self) -> float:
        due = self._last + self.interval
        if self.read_timeout is not None:
            due = min(due, self._heard + self.read_timeout)
        return due

    def _tick(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self._reading and self._task is not None:
            if self.read_timeout is not None and now - self._heard >= self.read_timeout * 0.999:
                self.on_read_timeout()  # type: ignore[misc]  # the read fails with it; nothing to re-arm
                return
            if now - self._last >= self.interval * 0.999:
                self._fired = True
                self._task.cancel()  # re-armed once the interrupted read is over
                return
            self._timer = self._loop.call_at(self._due(), self._tick)
            return
        # Not waiting for the upstream (e.g. writing to a slow client): look again when the next
        # interval ends, or in a while if it already has.
        self._timer = self._loop.call_at(max(self._due(), now + self.interval / 4), self._tick)

    async def read(self, fn: Callable[[], Awaitable[bytes]]) -> bytes | None:
        task = self._task
        if task is None:
            task = self._task = asyncio.current_task()
            assert task is not None
        cancelling = task.cancelling()
        self._reading = True
        try:
            data = await fn()
        except asyncio.CancelledError:
            # Ours (taken back), unless the task was also cancelled for real meanwhile.
            if self._fired and task.uncancel() <= cancelling:
                return None
            raise
        finally:
            self._reading = False
            if self._fired:
                self._fired = False
                self._timer = self._loop.call_at(self._loop.time() + self.interval, self._tick)
        self._heard = self._loop.time()
        return data

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
