"""The stream relay's fast path: the upstream's bytes go from aiohttp's reader to uvicorn's
transport in a callback, with no task woken per chunk.

Why: relayed as an async iteration (`upstream.relay_events` under Starlette's StreamingResponse),
every chunk completes a future, takes a turn of the event loop, resumes a task through the relay's
coroutines and passes Starlette's and uvicorn's `send`. A relay's CPU grows with chunks, not
requests (1,000 streams at 10 chunks a second are 10,000 chunks a second): with this path the
proxy's CPU per relayed chunk went from 47–53 to 33 µs (bench/streams.py; of that, the async
iteration itself is what separates the two bare relays of bench/bare_relay.py, 34 against 26 µs in
one run; bench/README.md, "The relay's fast path").

How:
- aiohttp's `StreamReader` wakes its reader through the future it keeps in `_waiter`; `feed_data`,
  `end_http_chunk_receiving`, `feed_eof` and `set_exception` complete it. `_Tap` stands in for that
  future and relays at once, or in the loop's next turn when reading would feed aiohttp's parser
  again from within its own callback (aiohttp has no public callback for arriving data; the
  version is pinned and tests/test_relay.py covers the behaviour through both paths).
- uvicorn's httptools protocol: the `send` it hands to the app is a method of its
  `RequestResponseCycle`; the chunks go to that cycle's transport in HTTP/1.1 chunked framing, as
  its `send` writes them. The response's start and end go through `send` as usual.
- Back-pressure: while the client's socket is over uvicorn's high-water mark, nothing is read;
  aiohttp's reader buffers up to its limit and then stops reading the upstream socket; the
  relay's task waits for the client to drain and reads on.
- A client that leaves: uvicorn's `http.disconnect` ends the relay and the upstream connection is
  closed at once, as on the async path.
- Heartbeats while the upstream is silent, and the upstream's read timeout: one timer per stream.

Any other server (h11, hypercorn, a test transport) gets the async path, byte for byte the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import aiohttp
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy.client import ClientGone
from proxy.keepalive import HEARTBEAT
from proxy.upstream import EventRelay, ReadTimeout, take_read_timeout

try:  # uvicorn's httptools protocol (absent without httptools: then the async path serves)
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as _Cycle
except ImportError:  # pragma: no cover
    _Cycle = None


class Unacknowledged(Exception):
    """A relayed stream's usage could not be committed (its database is down). Its events, the
    last one included, were relayed as they came; the response's end (HTTP's last chunk) is
    withheld and the connection closed, so that a client that checks the end sees an incomplete
    reply. (One that stops reading at the last event cannot tell: a stream cannot be held back
    without holding back its events.)"""


class ClientStream:
    """The client's side of a relayed stream, under uvicorn's httptools protocol."""

    __slots__ = ("_cycle", "_transport", "_flow")

    def __init__(self, cycle) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._flow = cycle.flow

    @classmethod
    def of(cls, scope: Scope, send: Send, headers: list[tuple[bytes, bytes]]) -> ClientStream | None:
        """The client's stream when `send` is uvicorn's httptools cycle and the response will be
        sent chunked (no length of its own; not a HEAD request); else None."""
        cycle = getattr(send, "__self__", None)
        if _Cycle is None or type(cycle) is not _Cycle or cycle.response_started or cycle.chunked_encoding is not None:
            return None
        if scope.get("method") == "HEAD" or any(
            name in (b"content-length", b"transfer-encoding") for name, _ in headers
        ):
            return None
        return cls(cycle)

    @property
    def chunked(self) -> bool:
        return self._cycle.chunked_encoding is True

    @property
    def gone(self) -> bool:
        return self._cycle.disconnected or self._transport.is_closing()

    @property
    def paused(self) -> bool:
        return self._flow.write_paused

    def write(self, data: bytes) -> None:
        self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def abort(self) -> None:
        """Close the connection without the response's end (uvicorn takes it as a client gone, and
        says nothing of a response left incomplete)."""
        self._cycle.disconnected = True
        self._transport.close()

    async def drain(self) -> None:
        """Until the client's socket takes writes again (also when the client has gone)."""
        await self._flow.drain()


class _Tap:
    """Stands in for the future aiohttp's StreamReader completes when something arrives (aiohttp
    drops it before calling it). A read aiohttp would not resume the socket after (`_take`) is
    relayed at once, within aiohttp's callback; anything else (the end, a break, a paused socket)
    in the loop's next turn, since reading the reader then feeds aiohttp's parser again, which
    must not happen from within its own callback."""

    __slots__ = ("_loop", "_content", "_pump")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, content: aiohttp.StreamReader, pump: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._content = content
        self._pump = pump

    def done(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def set_result(self, _result: object) -> None:
        content = self._content
        if content._eof or content._exception is not None:
            self._loop.call_soon(self._pump)
        elif not content._buffer:  # the end of an HTTP chunk already relayed: nothing new
            content._waiter = self
        elif _takes_at_once(content):
            self._pump()
        else:
            self._loop.call_soon(self._pump)

    def set_exception(self, _exc: BaseException) -> None:
        self._loop.call_soon(self._pump)


class DirectRelay:
    """One stream relayed by callbacks: `run()` returns once it ended (the upstream's last event,
    or an error event after a break), raises ClientGone when the client left first."""

    __slots__ = ("_response", "_content", "_relay", "_client", "_loop", "_tap", "_wake", "_ended", "_stalled",
                 "_error", "_interval", "_read_timeout", "_heard", "_spoke", "_timer", "_on_write", "first_write",
                 "delivered")  # fmt: skip

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        relay: EventRelay,
        client: ClientStream,
        heartbeat: float = 0.0,
        on_write: Callable[[bytes], None] | None = None,
    ) -> None:
        self._response = response
        self._content = response.content
        self._relay = relay
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._tap = _Tap(self._loop, self._content, self._pump)
        self._wake: asyncio.Future | None = None
        self._ended = False  # the stream's end was written, or the client is gone
        self._stalled = False  # the client's socket is full: waiting for it to drain
        self._error: BaseException | None = None  # a failure of the proxy's own, raised by run()
        self._interval = heartbeat
        # With heartbeats, their timer also keeps the upstream read timeout (as relay_events does).
        self._read_timeout = take_read_timeout(response) if heartbeat > 0 else None
        self._heard = self._spoke = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._on_write = on_write
        self.first_write: float | None = None  # perf_counter() of the first bytes written
        self.delivered = False

    @staticmethod
    def supports(response: aiohttp.ClientResponse) -> bool:
        content = response.content
        return type(content) is aiohttp.StreamReader and content._waiter is None

    async def run(self, receive: Receive) -> None:
        loop = self._loop
        gone = loop.create_task(_disconnect(receive))
        gone.add_done_callback(self._wake_up)
        try:
            if self._interval > 0:
                self._timer = loop.call_at(self._due(loop.time()), self._tick)
            self._pump()
            while True:
                if self._error is not None:
                    raise self._error
                if gone.done() or self._client.gone:
                    raise ClientGone()
                if self._ended:
                    return
                if self._stalled:
                    await self._client.drain()  # returns when the client leaves, too
                    self._stalled = False
                    self._pump()
                    continue
                self._wake = loop.create_future()
                await self._wake
        finally:
            gone.remove_done_callback(self._wake_up)
            if gone.done():
                if not gone.cancelled():
                    gone.exception()  # retrieved: a receive() that failed means the client is gone
            else:
                gone.cancel()
            self._ended = True
            if self._timer is not None:
                self._timer.cancel()
            if self._content._waiter is self._tap:
                self._content._waiter = None
            # Closing (not releasing) drops the connection if the body was not read to the end.
            if self._relay.meter.finished:
                self._response.release()
            else:
                self._response.close()

    def _wake_up(self, _=None) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _pump(self) -> None:
        """Relay what aiohttp's reader holds, then wait for more (the tap), unless the stream ended
        or the client's socket is full. Never raises: it runs as a callback of the loop."""
        if self._ended:
            return
        content = self._content
        try:
            if content._waiter is self._tap:
                content._waiter = None
            buffer = content._buffer
            if buffer:
                client, feed = self._client, self._relay.feed
                self._heard = now = self._loop.time()
                while buffer:  # bytes that came before a break are relayed before the break
                    if client.paused:
                        self._stalled = True
                        self._wake_up()
                        return
                    data, ended = feed(_take(content))
                    if data:
                        self._send(data, now)
                    if ended:
                        self._end(b"")
                        return
                    if self._ended:  # the client left
                        return
            if content._exception is not None:
                self._end(self._relay.broke(content._exception))
            elif content._eof:
                self._end(self._relay.finish())
            else:
                content._waiter = self._tap
        except Exception as exc:  # a failure of the proxy's own: raised by run(), as on the async path
            self._error = exc
            self._ended = True
            self._wake_up()

    def _send(self, data: bytes, now: float | None = None) -> None:
        client = self._client
        if client.gone:
            self._ended = True
            self._wake_up()
            return
        client.write(data)
        self._spoke = self._loop.time() if now is None else now
        if not self.delivered:
            self.first_write = time.perf_counter()
            self.delivered = True
        if self._on_write is not None:
            self._on_write(data)

    def _end(self, data: bytes) -> None:
        if data:
            self._send(data)
        self._ended = True
        self._wake_up()

    def _due(self, now: float) -> float:
        due = self._spoke + self._interval
        if self._read_timeout is not None:
            due = min(due, self._heard + self._read_timeout)
        return due if due > now else now + self._interval / 4

    def _tick(self) -> None:
        """The stream's one timer: a heartbeat once the client heard nothing for the interval;
        the upstream's read timeout once it sent nothing for that long while the relay waited."""
        self._timer = None
        if self._ended:
            return
        now = self._loop.time()
        waiting = not self._stalled and self._content._waiter is self._tap
        if waiting and self._read_timeout is not None and now - self._heard >= self._read_timeout * 0.999:
            self._content.set_exception(ReadTimeout())  # through the tap: the stream ends with an error event
            return
        if waiting and now - self._spoke >= self._interval * 0.999 and not self._client.paused:
            self._send(HEARTBEAT)  # between two writes, so between two whole events
        if not self._ended:
            self._timer = self._loop.call_at(self._due(now), self._tick)


def _takes_at_once(content: aiohttp.StreamReader) -> bool:
    return len(content._buffer) == 1 and not content._buffer_offset and not content._protocol._reading_paused


def _take(content: aiohttp.StreamReader) -> bytes:
    """Everything `content` holds: its `_read_nowait(-1)`, without the `resume_reading()` aiohttp
    calls after every read however it stands (which feeds its parser an empty read each time);
    when the upstream's socket was paused, aiohttp's own way, which resumes it."""
    if not _takes_at_once(content):
        return content._read_nowait(-1)
    data = content._buffer.popleft()
    content._size -= len(data)
    content._cursor += len(data)
    splits = content._http_chunk_splits
    while splits and splits[0] < content._cursor:  # as aiohttp drops the splits it read past
        splits.popleft()
    return data


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class RelayResponse(StreamingResponse):
    """A relayed SSE stream: `direct(client, receive)` (the fast path, DirectRelay) under uvicorn's
    httptools protocol; else Starlette's StreamingResponse over `body` (the async path). Either
    raising Unacknowledged ends the response without its end."""

    def __init__(
        self,
        body,
        direct: Callable[[ClientStream, Receive], Awaitable[None]] | None,
        headers: dict[str, str],
    ) -> None:
        super().__init__(body, 200, headers=headers, media_type="text/event-stream")
        self._direct = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = None if self._direct is None else ClientStream.of(scope, send, self.raw_headers)
        if client is None:
            # The end was never sent: the server closes the connection (and logs one line).
            with contextlib.suppress(Unacknowledged):
                await super().__call__(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if not client.chunked:  # pragma: no cover - uvicorn chunks a response of no declared length
            raise RuntimeError("uvicorn did not choose chunked encoding for a stream")
        try:
            await self._direct(client, receive)
        except ClientGone:
            return
        except Unacknowledged:
            client.abort()
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
