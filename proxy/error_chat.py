"""ERRORS_AS_CHAT: a refusal by the proxy itself, answered as an ordinary completion whose text
is the error, so chat clients that drop error bodies (SillyTavern) still show it. Pure functions.

Only the proxy's own refusals are rewritten; an upstream's reply is always passed on as it came.
"""

from __future__ import annotations

import json
import time
import uuid

from proxy.errors import Kind, ProxyError

# The proxy turned the request away (who, what model, how much, how fast, no key free, queue).
# Upstream failures (UPSTREAM, TIMEOUT) and malformed requests stay real errors.
REFUSALS = frozenset(
    {Kind.AUTHENTICATION, Kind.PERMISSION, Kind.NOT_FOUND, Kind.RATE_LIMIT, Kind.QUOTA, Kind.UNAVAILABLE}
)
CHAT_KINDS = frozenset({"chat", "completions", "messages"})
MARK_HEADER = "x-proxy-error"  # on every rewritten reply: "<status> <kind>"


def applies(error: ProxyError, endpoint_kind: str | None) -> bool:
    return endpoint_kind in CHAT_KINDS and error.kind in REFUSALS


def error_text(error: ProxyError) -> str:
    return f"⚠️ Proxy error ({error.status}): {error.message}"


def headers_for(error: ProxyError) -> dict[str, str]:
    return {**error.headers, MARK_HEADER: f"{error.status} {error.kind.value}"}


def completion(kind: str, model: str, text: str) -> dict:
    """A whole (non-streamed) reply in the endpoint's format."""
    created = int(time.time())
    if kind == "messages":
        return {
            "id": "msg_proxy_error_" + uuid.uuid4().hex[:16],
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if kind == "completions":
        return {
            "id": "cmpl-proxy-error-" + uuid.uuid4().hex[:16],
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": usage,
        }
    return {
        "id": "chatcmpl-proxy-error-" + uuid.uuid4().hex[:16],
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage,
    }


def _sse(data: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(data) + "\n\n").encode()


def stream_events(kind: str, model: str, text: str) -> bytes:
    """The same reply as a complete server-sent event stream, in the endpoint's format."""
    if kind == "messages":
        message = completion(kind, model, "")
        message["content"], message["stop_reason"] = [], None
        return b"".join(
            [
                _sse({"type": "message_start", "message": message}, "message_start"),
                _sse(
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    "content_block_start",
                ),
                _sse(
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                    "content_block_delta",
                ),
                _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                _sse(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": 0},
                    },
                    "message_delta",
                ),
                _sse({"type": "message_stop"}, "message_stop"),
            ]
        )
    base = completion(kind, model, text)
    if kind == "completions":
        first = {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}
        last = {**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]}
    else:
        base = {key: value for key, value in base.items() if key != "usage"}
        base["object"] = "chat.completion.chunk"
        delta = {"role": "assistant", "content": text}
        first = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    return _sse(first) + _sse(last) + b"data: [DONE]\n\n"
