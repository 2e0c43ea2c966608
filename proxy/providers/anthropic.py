"""The Anthropic dialect: native Messages API, plus the OpenAI-format door translated to it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from proxy import sse
from proxy.errors import Kind, anthropic_error
from proxy.keys.pool import Outcome, Verdict
from proxy.providers.base import Dialect, Endpoint, StreamMeter, error_message, retry_after
from proxy.sse import Event
from proxy.usage import Usage

DEFAULT_VERSION = "2023-06-01"


class AnthropicStreamMeter(StreamMeter):
    """Reads input tokens from message_start and output tokens from message_delta."""

    def accept(self, event: Event) -> bool:
        name = event.event
        if name in ("ping", "content_block_start", "content_block_stop"):
            return True
        data = event.json()
        if not isinstance(data, dict):
            return True
        name = name or str(data.get("type") or "")
        if name == "message_start":
            usage = (data.get("message") or {}).get("usage") or {}
            self.usage.tokens_in = _input_tokens(usage)
            self.usage.tokens_out = int(usage.get("output_tokens") or 0)
        elif name == "message_delta":
            usage = data.get("usage") or {}
            if "output_tokens" in usage:
                self.usage.tokens_out = int(usage["output_tokens"] or 0)
                self.seen_usage = True
            if usage.get("input_tokens"):
                self.usage.tokens_in = _input_tokens(usage)
        elif name == "content_block_delta":
            delta = data.get("delta") or {}
            text = delta.get("text") or delta.get("partial_json") or delta.get("thinking") or ""
            self.text_chars += len(text)
        elif name == "message_stop":
            self.finished = True
        return True


def _input_tokens(usage: dict) -> int:
    """Input tokens including cache reads and writes, which are input too."""
    return sum(
        int(usage.get(name) or 0)
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


class Anthropic(Dialect):
    name = "anthropic"
    key_prefix = "ant-"
    endpoints = (
        Endpoint("GET", ("models",), None, "models", "anthropic"),
        Endpoint("POST", ("messages",), "/messages", "messages", "anthropic"),
        Endpoint("POST", ("chat", "completions"), "/messages", "chat", "openai", translated=True),
    )
    forward_headers = frozenset({"accept", "anthropic-version", "anthropic-beta"})
    response_headers = frozenset({"request-id"})

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"x-api-key": secret}

    def outbound_headers(self, client_headers: Mapping[str, str], secret: str) -> dict[str, str]:
        headers = super().outbound_headers(client_headers, secret)
        headers.setdefault("anthropic-version", DEFAULT_VERSION)
        return headers

    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        message = error_message(body).lower()
        if status in (401, 403):
            return Outcome(Verdict.REVOKED)
        if status == 400 and "credit balance" in message:
            return Outcome(Verdict.OVER_QUOTA)
        if status == 429:
            wait = retry_after(headers, time.time(), "anthropic-ratelimit-requests-reset")
            return Outcome(Verdict.RATE_LIMITED, wait)
        if status == 404 and message.startswith("model:"):
            return Outcome(Verdict.MODEL_MISSING)
        if status >= 500 or status in (408, 409):
            return Outcome(Verdict.RETRYABLE)
        return Outcome(Verdict.CLIENT_ERROR)

    def usage_of(self, body: Any) -> Usage | None:
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return None
        return Usage(_input_tokens(usage), int(usage.get("output_tokens") or 0))

    def meter(self, endpoint: Endpoint, state: dict) -> StreamMeter:
        return AnthropicStreamMeter()

    def stream_error(self, message: str) -> bytes:
        return sse.encode(anthropic_error(message, Kind.UPSTREAM), event="error")

    def model_list(self, models: Iterable[str]) -> dict:
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"} for m in sorted(models)
        ]
        return {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
