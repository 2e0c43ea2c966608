"""The OpenAI dialect (and any OpenAI-compatible server: vLLM, llama.cpp, Ollama)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from proxy import sse
from proxy.errors import Kind, openai_error
from proxy.keys.pool import Outcome, Verdict
from proxy.providers.base import Dialect, Endpoint, StreamMeter, error_message, retry_after
from proxy.sse import Event
from proxy.usage import Usage

_OVER_QUOTA_CODES = {"insufficient_quota", "billing_not_active", "access_terminated"}


def _error_fields(body: Any) -> tuple[str, str]:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return "", ""
    return str(err.get("code") or ""), str(err.get("type") or "")


class OpenAIStreamMeter(StreamMeter):
    """Reads usage from the final chunk; hides it when only the proxy asked for it."""

    def __init__(self, client_wants_usage: bool) -> None:
        super().__init__()
        self.client_wants_usage = client_wants_usage

    def accept(self, event: Event) -> bool:
        data = event.data
        if data == "[DONE]":
            self.finished = True
            return True
        if '"usage"' not in data and '"content"' not in data and '"text"' not in data:
            return True
        chunk = event.json()
        if not isinstance(chunk, dict):
            return True
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
            self.seen_usage = True
            if not chunk.get("choices") and not self.client_wants_usage:
                return False
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") if isinstance(delta, dict) else None
            if text is None:
                text = choice.get("text")
            if isinstance(text, str):
                self.text_chars += len(text)
        return True


class OpenAI(Dialect):
    name = "openai"
    key_prefix = "oai-"
    endpoints = (
        Endpoint("GET", ("models",), None, "models", "openai"),
        Endpoint("POST", ("chat", "completions"), "/chat/completions", "chat", "openai"),
        Endpoint("POST", ("completions",), "/completions", "completions", "openai"),
        Endpoint("POST", ("embeddings",), "/embeddings", "embeddings", "openai"),
    )
    response_headers = frozenset({"x-request-id", "openai-processing-ms"})

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"authorization": f"Bearer {secret}"}

    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        code, kind = _error_fields(body)
        if status == 401:
            return Outcome(Verdict.REVOKED)
        if status == 429:
            if code in _OVER_QUOTA_CODES or kind in _OVER_QUOTA_CODES:
                return Outcome(Verdict.OVER_QUOTA)
            wait = retry_after(headers, time.time(), "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
            return Outcome(Verdict.RATE_LIMITED, wait)
        if status == 404 and code == "model_not_found":
            return Outcome(Verdict.MODEL_MISSING)
        if status == 403 and "model" in error_message(body).lower():
            return Outcome(Verdict.MODEL_MISSING)
        if status >= 500 or status in (403, 408, 409):
            return Outcome(Verdict.RETRYABLE)
        return Outcome(Verdict.CLIENT_ERROR)

    def usage_of(self, body: Any) -> Usage | None:
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return None
        prompt = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
        completion = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        return Usage(prompt, completion)

    def prepare(self, endpoint: Endpoint, payload: dict) -> dict:
        """Ask for usage in streams, remembering whether the client asked for it itself."""
        if not payload.get("stream") or endpoint.kind not in ("chat", "completions"):
            return {}
        options = payload.get("stream_options")
        wants = isinstance(options, dict) and bool(options.get("include_usage"))
        payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return {"client_wants_usage": wants}

    def meter(self, endpoint: Endpoint, state: dict) -> StreamMeter:
        return OpenAIStreamMeter(state.get("client_wants_usage", True))

    def stream_error(self, message: str) -> bytes:
        return sse.encode(openai_error(message, Kind.UPSTREAM))

    def model_list(self, models: Iterable[str]) -> dict:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "openai"} for m in sorted(models)],
        }
