"""The HTTP client to the upstreams, and the streaming relay back to the client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import aiohttp

from proxy import jsonx
from proxy.config import Settings
from proxy.errors import Redactor
from proxy.keepalive import HEARTBEAT, Silence
from proxy.providers.base import StreamMeter
from proxy.sse import Event, EventTooLarge, SSEParser

log = logging.getLogger("proxy.upstream")

NETWORK_ERRORS = (aiohttp.ClientError, OSError)
MAX_ERROR_BODY = 256 * 1024
_KEY_SHAPED = Redactor()  # no configured secret: redacts what looks like a provider key


def create_session(settings: Settings) -> aiohttp.ClientSession:
    """One pooled client for the process: no proxies from the environment, no cookies, no redirects."""
    # Proxy requests beyond UPSTREAM_MAX_CONNECTIONS wait in the queue; the key checks have their own room.
    limit = settings.upstream_max_connections + settings.key_check_concurrency
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.upstream_connect_timeout, sock_read=settings.upstream_read_timeout
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        raise_for_status=False,
        skip_auto_headers=("User-Agent",),
    )


async def send(
    session: aiohttp.ClientSession, method: str, url: str, headers: Mapping[str, str], body: bytes | None
) -> aiohttp.ClientResponse:
    """Send one request; the caller owns the response and must release or close it.

    A redirect is refused, not passed on: the key must not follow it, nor the client be sent
    somewhere the configuration did not name.
    """
    response = await session.request(method, url, headers=headers, data=body, allow_redirects=False)
    if 300 <= response.status < 400:
        response.close()
        raise RedirectNotFollowed(f"the upstream answered {response.status} with a redirect")
    return response


async def read_error_body(response: aiohttp.ClientResponse) -> tuple[bytes, object]:
    """Read a (bounded) error reply, returning its bytes and its JSON (or None)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < MAX_ERROR_BODY:  # read(n) returns what has arrived, up to n: read until the end
            chunk = await response.content.read(MAX_ERROR_BODY - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (TimeoutError, *NETWORK_ERRORS):
        chunks = []
    finally:
        response.release()
    raw = b"".join(chunks)
    try:
        return raw, jsonx.loads(raw) if raw else None
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        return raw, None


def pick_headers(headers: Mapping[str, str], allowed: Iterable[str]) -> dict[str, str]:
    """Only the allow-listed response headers go back to the client."""
    return {name: headers[name] for name in allowed if name in headers}


class EventRelay:
    """What the client gets for what the upstream sent, one read at a time (no I/O of its own:
    `relay_events` below and proxy/relay.py drive it).

    Every event passes `redact` (by default: anything shaped like a key) before the meter, the
    renderer or the client sees it: one cheap check of its bytes, and only an event that may hold
    a secret is rewritten (its JSON data scrubbed, keys and values, and re-serialised; other data
    redacted as text). `meter` reads usage and may hold events back; `render` (for translated
    streams) turns accepted events into the client's format. An error event from the upstream is
    the stream's last word. A drop mid-stream ends with one error event in the client's format.
    `decode` (the dialect's `stream_decoder`) first turns a provider's own framing into SSE bytes.
    """

    __slots__ = ("meter", "render", "stream_error", "redact", "decode", "parser", "upstream_failed")

    def __init__(
        self,
        meter: StreamMeter,
        render: Callable[[list], list[bytes]] | None,
        stream_error: Callable[[str], bytes],
        redact: Redactor = _KEY_SHAPED,
        decode: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.meter, self.render, self.stream_error = meter, render, stream_error
        self.redact, self.decode = redact, decode
        self.parser = SSEParser()
        self.upstream_failed = False

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        """The client's bytes for `chunk` (maybe b"": no event ended in it), and whether the stream
        ends with them (they then close with an error event)."""
        if self.decode is not None:  # the provider's own framing (Bedrock's event stream) to SSE bytes
            try:
                chunk = self.decode(chunk)
            except StreamAbort as exc:
                return self.stream_error(self.redact(str(exc))), True
        try:
            events = self.parser.feed(chunk)
        except EventTooLarge:
            return self.stream_error("The upstream sent a stream event larger than this proxy relays."), True
        data, abort = self._out(events)
        if abort is not None:
            return data + self.stream_error(abort), True
        return data, False

    def finish(self) -> bytes:
        """The client's last bytes once the upstream ended the stream."""
        data, abort = self._out(self.parser.flush())
        if abort is not None:
            return data + self.stream_error(abort)
        if not self.meter.finished and not self.upstream_failed:
            return data + self.stream_error("The upstream ended the stream before it was complete.")
        return data

    def broke(self, exc: BaseException) -> bytes:
        """The client's last bytes when the upstream's connection failed (`exc`: a read timeout or
        a network error): one error event, unless the whole answer had already come."""
        if self.meter.finished:  # a break after the last event loses nothing
            return b""
        if isinstance(exc, TimeoutError):
            return self.stream_error("The upstream stopped sending data (read timeout).")
        return self.stream_error("The upstream connection broke off in the middle of the stream.")

    def _out(self, events: list[Event]) -> tuple[bytes, str | None]:
        """The client's bytes for `events`, and why the stream must end (an error event from the
        upstream, or an event this proxy cannot read), if it must: then the bytes are those of
        every event before that one, which the client gets first."""
        if not events:
            return b"", None
        redact, meter, render = self.redact, self.meter, self.render
        parts: list[bytes] = []
        # One look at all the events that arrived together; each on its own only if needed.
        dirty = redact.suspicious(events[0].raw if len(events) == 1 else b"".join(event.raw for event in events))
        for event in events:
            try:
                if dirty and redact.suspicious(event.raw):
                    event = redacted_event(event, redact)
                if _is_error(event):
                    self.upstream_failed = True
                if meter.accept(event):
                    if render is None:
                        parts.append(event.raw)
                    else:
                        parts.extend(render([event]))
            except StreamAbort as exc:
                return b"".join(parts), redact(str(exc))
            except Exception as exc:  # an event of an unexpected shape: say so, never end silently
                log.warning("the upstream sent a malformed stream event (%s)", type(exc).__name__)
                return b"".join(parts), "The upstream sent a stream event this proxy could not read."
        return parts[0] if len(parts) == 1 else b"".join(parts), None


def take_read_timeout(response: aiohttp.ClientResponse) -> float | None:
    """The upstream read timeout (sock_read) of `response`'s connection, taken from aiohttp so the
    relay's own timer keeps it: aiohttp would otherwise cancel and re-arm a timer per chunk. A
    timer aiohttp already armed stays so (it fails the read as the relay's would)."""
    protocol = response.connection.protocol if response.connection is not None else None
    read_timeout = getattr(protocol, "read_timeout", None)
    if read_timeout:
        protocol.read_timeout = None  # type: ignore[union-attr]
    return read_timeout


async def relay_events(
    response: aiohttp.ClientResponse, relay: EventRelay, heartbeat: float = 0.0
) -> AsyncIterator[bytes]:
    """Relay an SSE reply event by event as it arrives, through `relay`, as an async iteration
    (any ASGI server; proxy/relay.py is the faster way under uvicorn). Cancellation (the client
    went away) closes the upstream connection at once. With `heartbeat` (seconds), an SSE comment
    goes out whenever the client heard nothing for that long."""
    content = response.content
    silence = None
    if heartbeat > 0:
        # The heartbeat's timer also watches the upstream's silence (sock_read).
        silence = Silence(heartbeat, take_read_timeout(response), lambda: content.set_exception(ReadTimeout()))
    try:
        while True:
            # Bytes that arrived before a break first (see `buffered_before_break`), then the error.
            chunk = buffered_before_break(content)
            if not chunk:
                if silence is None:
                    chunk = await content.readany()
                else:
                    chunk = await silence.read(content.readany)
                    if chunk is None:  # the client heard nothing for `heartbeat` seconds
                        yield HEARTBEAT
                        silence.spoke()
                        continue
            if not chunk:
                break
            data, ended = relay.feed(chunk)
            if data:
                yield data
                if silence is not None:
                    silence.spoke()
            if ended:
                return
        data = relay.finish()
        if data:
            yield data
    except (TimeoutError, *NETWORK_ERRORS) as exc:
        data = relay.broke(exc)
        if data:
            yield data
    finally:
        if silence is not None:
            silence.close()
        # Closing (not releasing) drops the connection if the body was not read to the end.
        if relay.meter.finished:
            response.release()
        else:
            response.close()


def buffered_before_break(content: aiohttp.StreamReader) -> bytes:
    """What is still buffered once the connection broke (else b"").

    aiohttp's `readany()` raises a stored error (ClientPayloadError: the upstream cut the
    connection) before handing out what is still buffered, so a relay that reads a little late
    would lose the tail the upstream did send. This takes it first, through the reader's own
    `_read_nowait` (aiohttp has no public call for it); `readany()` then raises the error."""
    if content.exception() is None or not getattr(content, "_buffer", None):
        return b""
    return content._read_nowait(-1)


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """A whole (non-streamed) reply, refused with ReplyTooLarge past `limit` bytes."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise ReplyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise ReplyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _is_error(event: Event) -> bool:
    """An error reported inside a stream: OpenAI's `{"error": ...}` or Anthropic's `event: error`."""
    if event.event == "error":
        return True
    if '"error"' not in event.data:
        return False
    data = event.json()
    return isinstance(data, dict) and ("error" in data or data.get("type") == "error")


def redacted_event(event: Event, redact: Redactor) -> Event:
    """`event` with no secret left in any of its fields: the data as JSON (scrubbed, keys and
    values, and re-serialised) or as text; the name and other fields as text. Comment lines are
    dropped. The same event when there was nothing to redact."""
    data = redact.payload(event.data)
    changed = data != event.data
    lines: list[str] = []
    data_written = False
    for line in event.raw.decode("utf-8", errors="replace").split("\n"):
        if not line:
            continue
        if line.startswith(":"):
            changed = True
            continue
        field = line.partition(":")[0]
        if field == "data":
            if not data_written:
                lines.extend("data: " + part for part in data.split("\n"))
                data_written = True
        else:
            cleaned = redact(line)
            changed = changed or cleaned != line
            lines.append(cleaned)
    if not changed:
        return event
    return Event(redact(event.event), data, ("\n".join(lines) + "\n\n").encode())


class UpstreamReply(Exception):
    """An upstream error reply to pass on to the client (redacted, in the client's shape)."""

    def __init__(self, status: int, body: Any, raw: bytes) -> None:
        super().__init__(status)
        self.status, self.body, self.raw = status, body, raw


class ReadTimeout(aiohttp.ServerTimeoutError):
    """The upstream sent nothing for UPSTREAM_READ_TIMEOUT seconds in the middle of a stream."""

    def __init__(self) -> None:
        super().__init__("Timeout on reading data from socket")


class RedirectNotFollowed(aiohttp.ClientError):
    """The upstream answered with a redirect, which this proxy never follows."""


class ReplyTooLarge(Exception):
    """A non-streamed reply longer than the configured limit (MAX_REPLY_BYTES)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class StreamAbort(Exception):
    """Raised by a renderer when the upstream reported an error inside the stream."""
