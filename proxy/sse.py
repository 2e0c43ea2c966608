"""Server-sent events: an incremental parser that keeps each event's raw bytes, and a writer."""

from __future__ import annotations

import json
from dataclasses import dataclass

from proxy import jsonx


@dataclass(slots=True)
class Event:
    """One SSE event: its name ('' when absent), its joined data lines, and its bytes as received."""

    event: str
    data: str
    raw: bytes

    def json(self) -> object | None:
        """The data as JSON, or None when it is not JSON (e.g. '[DONE]')."""
        try:
            return jsonx.loads(self.data)
        except ValueError:
            return None


class EventTooLarge(ValueError):
    """One event grew past the parser's limit without ending."""


class SSEParser:
    """Feed bytes as they arrive; get back the complete events so far.

    Linear in the bytes fed, however an event is cut into chunks: a chunk that completes no event
    is only kept, and the pending bytes are joined once, when an event ends. An event that grows
    past `max_event` bytes raises EventTooLarge: what is buffered stays bounded."""

    __slots__ = ("_parts", "_size", "_cr", "max_event")

    def __init__(self, max_event: int = 16 * 1024 * 1024) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._cr = False  # the last chunk ended in CR: maybe half of a CRLF split by the network
        self.max_event = max_event

    def feed(self, chunk: bytes) -> list[Event]:
        if (
            not self._parts
            and not self._cr
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and chunk.startswith(b"data: ")
            and b"\r" not in chunk
        ):  # nearly every read of a live stream: one whole `data: ` event, nothing pending
            return [Event("", chunk[6:-2].decode("utf-8", errors="replace"), chunk)]
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                # Wait for the next chunk before deciding, or a split CRLF would count as two line ends.
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not chunk:
            return []
        joins = b"\n\n" in chunk or (chunk[:1] == b"\n" and self._parts and self._parts[-1].endswith(b"\n"))
        self._parts.append(chunk)
        self._size += len(chunk)
        if not joins:
            if self._size > self.max_event:
                raise EventTooLarge(self._size)
            return []
        buffer = b"".join(self._parts)
        events: list[Event] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            event = parse_block(buffer[start : end + 2])
            start = end + 2
            if event is not None:
                events.append(event)
        rest = buffer[start:]
        self._parts = [rest] if rest else []
        self._size = len(rest)
        if self._size > self.max_event:
            raise EventTooLarge(self._size)
        return events

    def flush(self) -> list[Event]:
        """Whatever is left when the stream ends without a final blank line."""
        rest = b"".join(self._parts).replace(b"\r", b"\n")
        self._parts, self._size, self._cr = [], 0, False
        event = parse_block(rest + b"\n\n") if rest.strip() else None
        return [event] if event is not None else []


def parse_block(block: bytes) -> Event | None:
    """Parse one event block (lines ending in a blank line). Comment-only blocks yield None."""
    if block.startswith(b"data: ") and block.find(b"\n") == len(block) - 2:
        # Nearly every event: one `data: ` line. What the general parse below gives, faster.
        return Event("", block[6:-2].decode("utf-8", errors="replace"), block)
    name = ""
    data_lines: list[str] = []
    for line in block.decode("utf-8", errors="replace").split("\n"):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data_lines.append(value)
        elif field == "event":
            name = value
    if not data_lines and not name:
        return None
    return Event(name, "\n".join(data_lines), block)


def encode(data: object, event: str | None = None) -> bytes:
    """One SSE event carrying JSON (or a literal string such as '[DONE]')."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()
