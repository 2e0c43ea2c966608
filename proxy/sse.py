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


class SSEParser:
    """Feed bytes as they arrive; get back the complete events so far."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk
        held = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):
                # A CR at the end may be the first half of a CRLF split by the network: wait for
                # the next chunk before deciding, or it would count as two line ends.
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[Event] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            block = buffer[start : end + 2]
            start = end + 2
            event = parse_block(block)
            if event is not None:
                events.append(event)
        self._buffer = buffer[start:] + held
        return events

    def flush(self) -> list[Event]:
        """Whatever is left when the stream ends without a final blank line."""
        rest, self._buffer = self._buffer.replace(b"\r", b"\n"), b""
        event = parse_block(rest + b"\n\n") if rest.strip() else None
        return [event] if event is not None else []


def parse_block(block: bytes) -> Event | None:
    """Parse one event block (lines ending in a blank line). Comment-only blocks yield None."""
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
