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
    that the client was just sent something; `close()` stops the timer."""

    __slots__ = ("interval", "_loop", "_last", "_timer", "_reader", "_fired")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._reader: asyncio.Task | None = None  # the task waiting in `read`, if one is
        self._fired = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(self._last + interval, self._tick)

    def spoke(self) -> None:
        self._last = self._loop.time()

    def _tick(self) -> None:
        silent = self._loop.time() - self._last
        if silent < self.interval * 0.999 or self._reader is None:
            # Spoken since, or not waiting for the upstream (e.g. writing to a slow client): look again
            # when the interval since the last word ends.
            self._timer = self._loop.call_at(self._last + self.interval, self._tick)
            return
        self._fired = True
        self._reader.cancel()
        self._timer = None  # re-armed by `read` once the heartbeat went out (`spoke`)

    async def read(self, fn: Callable[[], Awaitable[bytes]]) -> bytes | None:
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._reader = task
        try:
            return await fn()
        except asyncio.CancelledError:
            # Ours (taken back), unless the task was also cancelled for real meanwhile.
            if self._fired and task.uncancel() <= cancelling:
                return None
            raise
        finally:
            self._reader = None
            if self._fired:
                self._fired = False
                self._timer = self._loop.call_at(self._loop.time() + self.interval, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
