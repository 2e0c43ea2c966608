"""Bedrock's streamed replies: binary AWS event-stream frames, decoded into Anthropic SSE.

Each `chunk` frame carries `{"bytes": base64(<one Anthropic stream event as JSON>)}`; an exception
frame (`:message-type: exception`, e.g. `throttlingException`) carries `{"message": ...}` and
becomes Anthropic's `event: error`. botocore parses the framing (prelude, headers, CRCs).
"""

from __future__ import annotations

import base64
import binascii

from proxy import jsonx, sse
from proxy.upstream import StreamAbort

CONTENT_TYPE = "application/vnd.amazon.eventstream"
# Bedrock's stream exceptions as Anthropic error types.
EXCEPTION_TYPES = {
    "throttlingException": "rate_limit_error",
    "serviceUnavailableException": "overloaded_error",
    "modelStreamErrorException": "api_error",
    "internalServerException": "api_error",
    "modelTimeoutException": "api_error",
    "validationException": "invalid_request_error",
}
BEDROCK_FIELDS = ("amazon-bedrock-invocationMetrics",)


class EventStreamToSSE:
    """Stateful: bytes of one reply in, the SSE bytes of every complete frame so far out."""

    def __init__(self) -> None:
        from botocore.eventstream import EventStreamBuffer

        self._buffer = EventStreamBuffer()

    def __call__(self, chunk: bytes) -> bytes:
        from botocore.eventstream import ParserError

        self._buffer.add_data(chunk)
        out: list[bytes] = []
        try:
            for message in self._buffer:
                out.append(frame_to_sse(message.headers, message.payload))
        except (ParserError, ValueError) as exc:  # a corrupt frame: checksum, lengths, headers
            name = type(exc).__name__
            raise StreamAbort(f"Bedrock sent a stream frame this proxy could not read ({name}).") from None
        return b"".join(out)


def frame_to_sse(headers: dict, payload: bytes) -> bytes:
    kind = headers.get(":message-type")
    if kind == "event":
        if headers.get(":event-type") != "chunk":
            return b""
        try:
            raw = base64.b64decode(jsonx.loads(payload)["bytes"])
            event = jsonx.loads(raw)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise StreamAbort("Bedrock sent a stream event this proxy could not read.") from None
        if not isinstance(event, dict):
            return b""
        if any(event.pop(name, None) is not None for name in BEDROCK_FIELDS) or b"\n" in raw or b"\r" in raw:
            raw = jsonx.dumps(event)  # re-encoded only when Bedrock added to it (or it spans lines)
        name = str(event.get("type") or "message").replace("\n", "").replace("\r", "")
        return b"event: " + name.encode() + b"\ndata: " + raw + b"\n\n"
    # An exception (or an error) frame: the stream's last word, in Anthropic's shape.
    name = str(headers.get(":exception-type") or headers.get(":error-code") or "internalServerException")
    try:
        message = str(jsonx.loads(payload).get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    message = message or str(headers.get(":error-message") or "") or name
    error_type = EXCEPTION_TYPES.get(name, "api_error")
    return sse.encode({"type": "error", "error": {"type": error_type, "message": message}}, event="error")
