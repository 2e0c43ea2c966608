"""The Anthropic dialect: native Messages API, plus the OpenAI-format door translated to it."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from proxy import sse
from proxy.errors import Kind, anthropic_error
from proxy.keys.pool import Outcome, Verdict
from proxy.providers.base import Dialect, Endpoint, StreamMeter, error_message, retry_after, token_count
from proxy.sse import Event
from proxy.usage import Usage

DEFAULT_VERSION = "2023-06-01"
# What Anthropic says about the key itself (not the request), in a 400 or 403. A message counts
# only when it is Anthropic's own statement: validation errors echo client text (field names
# before ": ", quoted values, backticked header values), and a client must not be able to write
# "organization has been disabled" into one and so take every key down.
KEY_DISABLED = (
    re.compile(
        r"^(?:this |your )?(?:organi[sz]ation|account|workspace|api key|key)"
        r" (?:has been|is|was|is currently) (?:disabled|deactivated|suspended|revoked|banned)\b"
    ),
    re.compile(r"\bdisabled organi[sz]ation\b"),
)
OVER_QUOTA = (
    re.compile(r"^your credit balance is too low\b"),
    re.compile(r"^you have reached your specified api usage limits\b"),
    re.compile(r"\busage blocked until\b"),
)
_ECHOED = re.compile(r"[`'\"{}\[\]<>]|: ")


def says(message: str, patterns: Iterable[re.Pattern[str]]) -> bool:
    """Whether `message` (lower case) is one of Anthropic's statements matched by `patterns`."""
    message = message.strip()
    return not _ECHOED.search(message) and any(p.search(message) for p in patterns)


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
        self.usage.cached = self._counts.get("cache_read_input_tokens", 0)
        thinking = _thinking_tokens(usage)
        if thinking is not None:
            self.usage.reasoning = thinking


def _error_type(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("type") or "") if isinstance(error, dict) else ""


def _thinking_tokens(usage: dict) -> int | None:
    """Output tokens spent thinking (`output_tokens_details.thinking_tokens`), when Claude says."""
    details = usage.get("output_tokens_details")
    value = details.get("thinking_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _input_tokens(usage: dict) -> int:
    """Input tokens including cache reads and writes, which are input too."""
    return sum(
        token_count(usage.get(name))
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


class Anthropic(Dialect):
    name = "anthropic"
    key_prefix = "ant-"
    endpoints = (
        Endpoint("GET", ("models",), None, "models", "anthropic"),
        Endpoint("POST", ("messages",), "/messages", "messages", "anthropic"),
        Endpoint("POST", ("chat", "completions"), "/messages", "chat", "openai", translated=True),
        Endpoint("POST", ("messages", "count_tokens"), "/messages/count_tokens", "count_tokens", "anthropic"),
        Endpoint("GET", ("models", "*"), None, "model", "anthropic"),
    )
    forward_headers = frozenset({"accept", "anthropic-version", "anthropic-beta"})
    response_headers = frozenset({"request-id"})
    models_path = "/models?limit=1000"  # the default page holds only 20

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"x-api-key": secret}

    def outbound_headers(self, client_headers: Mapping[str, str], secret: str) -> dict[str, str]:
        headers = super().outbound_headers(client_headers, secret)
        headers.setdefault("anthropic-version", DEFAULT_VERSION)
        beta = headers.pop("anthropic-beta", None)
        if beta:
            # OAuth betas change how the key is read (and may draw a 401 that revokes it).
            kept = [b.strip() for b in beta.split(",") if b.strip() and not b.strip().lower().startswith("oauth")]
            if kept:
                headers["anthropic-beta"] = ",".join(kept)
        return headers

    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        """What a reply to a client's request says about the key that sent it.

        401 revokes the key. A 403 does only when it says the key or its organization is
        disabled: otherwise it is about this request (a beta, a model or a feature the org lacks,
        often provoked by what the client sent), so the key is only set aside briefly and the
        request tries another. The checker's own probe treats any 403 as revoked
        (`proxy.providers.anthropic.check`)."""
        message = error_message(body).lower()
        if status == 401 or (status in (400, 403) and says(message, KEY_DISABLED)):
            return Outcome(Verdict.REVOKED)
        if status == 403:
            return Outcome(Verdict.RETRYABLE)
        if status == 402 or _error_type(body) == "billing_error":
            return Outcome(Verdict.OVER_QUOTA)
        if status == 400 and says(message, OVER_QUOTA):
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
        return Usage(
            _input_tokens(usage),
            token_count(usage.get("output_tokens")),
            cached=token_count(usage.get("cache_read_input_tokens")),
            reasoning=_thinking_tokens(usage) or 0,
        )

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
