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
# Refusals Anthropic sends as a plain 400 that are about the key, not the request.
OVER_QUOTA_HINTS = ("credit balance", "reached your specified api usage limits", "usage blocked until")
REVOKED_HINTS = ("organization has been disabled", "disabled organization")


class AnthropicStreamMeter(StreamMeter):
    """Reads usage from message_start, then from message_delta's cumulative counts."""

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}

    def accept(self, event: Event) -> bool:
        name = event.event
        if name in ("ping", "content_block_start", "content_block_stop"):
            return True
        data = event.json()
        if not isinstance(data, dict):
            return True
        name = name or str(data.get("type") or "")
        if name == "message_start":
            self._count((data.get("message") or {}).get("usage"))
        elif name == "message_delta":
            usage = data.get("usage") or {}
            self._count(usage)
            if isinstance(usage, dict) and usage.get("output_tokens") is not None:
                self.seen_usage = True
        elif name == "content_block_delta":
            delta = data.get("delta") or {}
            text = delta.get("text") or delta.get("partial_json") or delta.get("thinking") or ""
            self.text_chars += len(text)
        elif name == "message_stop":
            self.finished = True
        return True

    def _count(self, usage: object) -> None:
        """Merge counts field by field: a message_delta may repeat some fields and omit others."""
        if not isinstance(usage, dict):
            return
        for name, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool):
                self._counts[name] = value
        self.usage.tokens_in = _input_tokens(self._counts)
        self.usage.tokens_out = self._counts.get("output_tokens", 0)


def _error_type(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("type") or "") if isinstance(error, dict) else ""


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
    models_path = "/models?limit=1000"  # the default page holds only 20

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"x-api-key": secret}

    def outbound_headers(self, client_headers: Mapping[str, str], secret: str) -> dict[str, str]:
        headers = super().outbound_headers(client_headers, secret)
        headers.setdefault("anthropic-version", DEFAULT_VERSION)
        return headers

    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        message = error_message(body).lower()
        if status in (401, 403) or (status == 400 and any(hint in message for hint in REVOKED_HINTS)):
            return Outcome(Verdict.REVOKED)
        if status == 402 or _error_type(body) == "billing_error":
            return Outcome(Verdict.OVER_QUOTA)
        if status == 400 and any(hint in message for hint in OVER_QUOTA_HINTS):
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
        """Anthropic's list shape, with OpenAI's fields too: the OpenAI-format door shares this route."""
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m,
                "created_at": "1970-01-01T00:00:00Z",
                "object": "model",
                "created": 0,
                "owned_by": "anthropic",
            }
            for m in sorted(models)
        ]
        return {
            "object": "list",
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
