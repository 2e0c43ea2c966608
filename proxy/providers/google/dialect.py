"""The Google AI (Gemini) dialect: the native API under /proxy/google-ai/{v1beta,v1}/models/...,
and an OpenAI-format door relayed to Gemini's own OpenAI-compatible endpoint.

The model and the stream mode live in the upstream path (`/v1beta/models/{model}:streamGenerateContent
?alt=sse`); the key travels in `x-goog-api-key` (never in the URL, which error messages and logs
may show). Clients may send their credential Gemini's ways: `x-goog-api-key` or `?key=`; the query
string never travels upstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from proxy import sse
from proxy.errors import Kind, google_error
from proxy.keys.pool import Outcome, Verdict
from proxy.providers.base import Call, Endpoint, Outbound, StreamMeter, parse_duration, token_count
from proxy.providers.google.errors import error_info, google_error_to_openai, unwrap
from proxy.providers.openai.dialect import OpenAI, OpenAIStreamMeter
from proxy.sse import Event
from proxy.usage import Usage

DOOR_PATH = "/v1beta/openai/chat/completions"
MAX_CREDENTIAL = 512
_PACIFIC = ZoneInfo("America/Los_Angeles")
# ErrorInfo reasons that say the key itself is unusable, and those that say it cannot pay.
REVOKED_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "CONSUMER_SUSPENDED", "SERVICE_DISABLED"})
BILLING_REASONS = frozenset({"BILLING_DISABLED", "BILLING_NOT_ACTIVE"})


def _native(version: str) -> tuple[Endpoint, ...]:
    prefix = ("v1beta",) if version == "v1beta" else ()
    root = f"/{version}/models/{{model}}"
    return (
        Endpoint(
            "POST", (*prefix, "models", "{model}:generateContent"), root + ":generateContent", "generate", "google"
        ),
        Endpoint(
            "POST", (*prefix, "models", "{model}:streamGenerateContent"), root + ":streamGenerateContent?alt=sse",
            "generate", "google",
        ),
        Endpoint("POST", (*prefix, "models", "{model}:countTokens"), root + ":countTokens", "count_tokens", "google"),
    )  # fmt: skip


def usage_from_metadata(meta: Any) -> Usage | None:
    """Gemini's usageMetadata: prompt (cached tokens are part of it) plus tool-use prompt in;
    candidates plus thoughts (billed as output) out."""
    if not isinstance(meta, dict):
        return None
    # token_count: anything but a non-negative number reads as 0, never an error that cuts a stream.
    tokens_in = token_count(meta.get("promptTokenCount")) + token_count(meta.get("toolUsePromptTokenCount"))
    thoughts = token_count(meta.get("thoughtsTokenCount"))
    tokens_out = token_count(meta.get("candidatesTokenCount")) + thoughts
    return Usage(tokens_in, tokens_out, cached=token_count(meta.get("cachedContentTokenCount")), reasoning=thoughts)


class GeminiStreamMeter(StreamMeter):
    """Reads the cumulative usageMetadata each chunk carries; the stream is complete once a
    candidate has a finishReason or the prompt was blocked (Gemini sends no end marker)."""

    def accept(self, event: Event) -> bool:
        data = event.json()
        if not isinstance(data, dict):
            return True
        usage = usage_from_metadata(data.get("usageMetadata"))
        if usage is not None:
            self.usage, self.seen_usage = usage, True
        for candidate in data.get("candidates") or ():
            if not isinstance(candidate, dict):
                continue
            for part in (candidate.get("content") or {}).get("parts") or ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    self.text_chars += len(part["text"])
            if candidate.get("finishReason"):
                self.finished = True
        feedback = data.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self.finished = True
        return True


class DoorStreamMeter(OpenAIStreamMeter):
    """The door's stream is complete at `[DONE]` or, should Gemini's OpenAI-compatible endpoint
    close without one, once every choice it began has a finish_reason."""

    def __init__(self, client_wants_usage: bool) -> None:
        super().__init__(client_wants_usage)
        self._open: set[int] = set()
        self._ended = False

    def accept(self, event: Event) -> bool:
        keep = super().accept(event)
        if '"finish_reason"' in event.data or '"delta"' in event.data:
            chunk = event.json()
            for choice in (chunk.get("choices") or ()) if isinstance(chunk, dict) else ():
                if isinstance(choice, dict):
                    index = choice.get("index", 0)
                    if choice.get("finish_reason"):
                        self._open.discard(index)
                        self._ended = True
                    else:
                        self._open.add(index)
            if self._ended and not self._open:
                self.finished = True
        return keep


class Gemini(OpenAI):
    """Native routes are Gemini's own; the door (`chat/completions`) is OpenAI's, relayed as is."""

    name = "google-ai"
    key_prefix = "gai-"
    endpoints = (
        Endpoint("GET", ("v1beta", "models"), None, "models", "google"),
        Endpoint("GET", ("models",), None, "models", "openai"),  # /v1/models: Gemini's and OpenAI's shape at once
        Endpoint("GET", ("v1beta", "models", "*"), None, "model", "google"),  # models.get: one card, both shapes
        Endpoint("GET", ("models", "*"), None, "model", "openai"),
        Endpoint("POST", ("chat", "completions"), DOOR_PATH, "chat", "openai"),
        *_native("v1beta"),
        *_native("v1"),
    )
    forward_headers = frozenset({"accept"})
    response_headers = frozenset({"x-request-id"})
    models_path = "/v1beta/models?pageSize=1000"

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"x-goog-api-key": secret}

    # Addressing ------------------------------------------------------------------------------
    def upstream_path(self, endpoint: Endpoint, model: str | None, stream: bool, params: Mapping[str, str]) -> str:
        path = endpoint.upstream_path or self.models_path
        if "{model}" in path:
            return path.replace("{model}", params["model"])  # the router admitted only [A-Za-z0-9._-]
        return path

    async def target(self, call: Call) -> Outbound:
        headers = self.outbound_headers(call.client_headers, call.secret)
        if call.path.startswith("/v1beta/openai/"):
            headers.pop("x-goog-api-key", None)
            headers["authorization"] = f"Bearer {call.secret}"  # the OpenAI-compatible endpoint's way
        return Outbound(call.base_url + call.path, headers, call.body)

    def client_credential(self, headers: Mapping[str, str], query: bytes) -> str | None:
        key = headers.get("x-goog-api-key", "").strip()
        if key:
            return key
        if b"key=" not in query or len(query) > 4096:
            return None
        try:
            values = parse_qs(query.decode("latin-1"), max_num_fields=20).get("key")
        except ValueError:  # more fields than any Gemini client sends
            return None
        return (values[0].strip()[:MAX_CREDENTIAL] or None) if values else None

    # Errors ----------------------------------------------------------------------------------
    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        """What a Gemini error says about the key (native and OpenAI-compatible replies alike).

        Reasons in `details` (ErrorInfo) are Google's own, never an echo of the client: an invalid,
        expired or suspended key, or a disabled API, revokes; disabled billing is out of quota. A 429
        whose quota is `limit: 0` means the key's tier has no access to the model."""
        error = unwrap(body)
        reason, quota = error_info(error)
        message = str(error.get("message") or "").lower()
        if status == 401 or reason in REVOKED_REASONS:
            return Outcome(Verdict.REVOKED)
        precondition = error.get("status") == "FAILED_PRECONDITION"  # Google's statement, not an echo of the request
        if reason in BILLING_REASONS or (status == 400 and precondition and "enable billing" in message):
            return Outcome(Verdict.OVER_QUOTA)
        if status == 429:
            if quota.get("limit") == "0" or "limit: 0" in message:
                return Outcome(Verdict.MODEL_MISSING)
            wait = _retry_delay(error) or _until_pacific_midnight(quota) or _header_wait(headers)
            return Outcome(Verdict.RATE_LIMITED, wait)
        if status == 403:
            return Outcome(Verdict.RETRYABLE)  # about this request (a model or feature): try another key
        if status >= 500 or status in (408, 409):
            return Outcome(Verdict.RETRYABLE)
        return Outcome(Verdict.CLIENT_ERROR)

    def client_error(self, shape: str, status: int, body: Any) -> Any:
        """Gemini's errors (a list of them from its OpenAI-compatible endpoint) in the client's shape."""
        if shape == "openai":
            return google_error_to_openai(status, body)
        return body[0] if isinstance(body, list) and body and isinstance(body[0], dict) else body

    def stream_error(self, message: str) -> bytes:
        """Readable both ways: Gemini clients read error.code/status, OpenAI clients error.message/type."""
        body = google_error(message, Kind.UPSTREAM)
        body["error"]["type"] = "upstream_error"
        return sse.encode(body)

    # Usage and streams -------------------------------------------------------------------------
    def usage_of(self, body: Any) -> Usage | None:
        if isinstance(body, dict) and "usageMetadata" in body:
            return usage_from_metadata(body["usageMetadata"])
        return super().usage_of(body)  # the door's OpenAI-shaped reply

    def prepare(self, endpoint: Endpoint, payload: dict) -> dict:
        return super().prepare(endpoint, payload) if endpoint.shape == "openai" else {}

    def meter(self, endpoint: Endpoint, state: dict) -> StreamMeter:
        if endpoint.shape == "openai":
            return DoorStreamMeter(state.get("client_wants_usage", True))
        return GeminiStreamMeter()

    # Model lists -----------------------------------------------------------------------------
    def model_ids(self, body: Any) -> set[str]:
        return generation_models(body)

    def model_list(self, models: Iterable[str]) -> dict:
        """Gemini's list (`models[].name`) and OpenAI's (`data[].id`) in one body: `/v1/models` serves
        native clients and the OpenAI door alike."""
        listed = sorted(models)
        return {"models": [_card(m) for m in listed], "object": "list", "data": [_card(m) for m in listed]}


def _card(model: str) -> dict:
    """One model as Gemini (`name`, methods) and OpenAI (`id`, `object`) clients read it."""
    return {
        "name": f"models/{model}",
        "displayName": model,
        "supportedGenerationMethods": ["generateContent", "streamGenerateContent", "countTokens"],
        "id": model,
        "object": "model",
        "created": 0,
        "owned_by": "google",
    }


def generation_models(body: Any) -> set[str]:
    """Ids (without `models/`) of the models in a Gemini list that can generate content."""
    items = body.get("models") if isinstance(body, dict) else None
    out: set[str] = set()
    for item in items or ():
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        methods = item.get("supportedGenerationMethods")
        if isinstance(methods, list) and "generateContent" not in methods:
            continue
        out.add(item["name"].removeprefix("models/"))
    return out


def _retry_delay(error: dict) -> float | None:
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            if isinstance(delay, str):
                return parse_duration(delay)
    return None


def _until_pacific_midnight(quota: Mapping[str, str]) -> float | None:
    """A per-day quota refills at midnight Pacific time."""
    if "PerDay" not in quota.get("id", ""):
        return None
    now = datetime.now(_PACIFIC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


def _header_wait(headers: Mapping[str, str]) -> float | None:
    from proxy.providers.base import retry_after

    return retry_after(headers, time.time())
