"""The OpenAI dialect (and any OpenAI-compatible server: vLLM, llama.cpp, Ollama)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from proxy import sse
from proxy.errors import Kind, openai_error
from proxy.keys.pool import Outcome, Verdict
from proxy.providers.base import Dialect, Endpoint, StreamMeter, error_message, retry_after, token_count
from proxy.providers.openai.reasoning import ParameterMemory
from proxy.providers.openai.responses import ResponsesStreamMeter, enforce_store_policy, responses_usage
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
            self.usage = chat_usage(usage)
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
        Endpoint("POST", ("responses",), "/responses", "responses", "openai"),
        Endpoint("GET", ("models", "*"), None, "model", "openai"),
    )
    response_headers = frozenset({"x-request-id", "openai-processing-ms"})

    def __init__(self, *, allow_stored_responses: bool = False) -> None:
        self.allow_stored_responses = allow_stored_responses
        self.parameters = ParameterMemory()

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
        if "input_tokens" in usage and "prompt_tokens" not in usage:
            return responses_usage(usage)
        return chat_usage(usage)

    def prepare(self, endpoint: Endpoint, payload: dict) -> dict:
        """Ask for usage in streams, remembering whether the client asked for it itself.

        Responses: the stored-state policy. Chat: what reasoning models refuse, renamed or dropped."""
        if endpoint.kind == "responses":
            enforce_store_policy(payload, self.allow_stored_responses)
            return {}
        if endpoint.kind == "chat" and isinstance(payload.get("model"), str):
            self.parameters.prepare(payload["model"], payload)
        if not payload.get("stream") or endpoint.kind not in ("chat", "completions"):
            return {}
        options = payload.get("stream_options")
        wants = isinstance(options, dict) and bool(options.get("include_usage"))
        payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return {"client_wants_usage": wants}

    def revise(self, endpoint: Endpoint, payload: dict, status: int, body: Any) -> bool:
        """A chat request a reasoning model refused for a parameter: fixed for one retry, and learned."""
        model = payload.get("model")
        if endpoint.kind != "chat" or not isinstance(model, str):
            return False
        return self.parameters.learn(model, payload, status, body)

    def meter(self, endpoint: Endpoint, state: dict) -> StreamMeter:
        if endpoint.kind == "responses":
            return ResponsesStreamMeter()
        return OpenAIStreamMeter(state.get("client_wants_usage", True))

    def stream_error(self, message: str) -> bytes:
        return sse.encode(openai_error(message, Kind.UPSTREAM))

    def model_list(self, models: Iterable[str]) -> dict:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "openai"} for m in sorted(models)],
        }


def chat_usage(usage: dict) -> Usage:
    """Chat/completions usage, with cached prompt and reasoning tokens when the upstream gives them."""
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    return Usage(
        token_count(usage.get("prompt_tokens")),
        token_count(usage.get("completion_tokens")),
        cached=token_count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0,
        reasoning=(
            token_count(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
        ),
    )
