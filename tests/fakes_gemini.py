"""A fake Google AI (Gemini) API on loopback: the native routes and the OpenAI-compatible endpoint.

Shapes follow Google's documentation: `models[].name` lists, `usageMetadata`, `?alt=sse` streams
(events end in CRLF CRLF, no end marker), errors `{"error": {"code", "message", "status",
"details": [ErrorInfo / QuotaFailure / RetryInfo]}}`, and the OpenAI-compatible endpoint's errors
as a list of those. Keys are read the way Gemini reads them: `x-goog-api-key`, `?key=`, or Bearer
(the OpenAI-compatible endpoint).
"""

from __future__ import annotations

import json as jsonlib
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes import FakeOpenAI, Json, KeyBehaviour, StreamEvent, _bearer, _lower_headers, _parse_json, count_words

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def google_error(code: int, status: str, message: str, *details: Json) -> Json:
    return {"error": {"code": code, "message": message, "status": status, "details": list(details)}}


def gemini_text_words(body: Any) -> int:
    """Words in every text part of `contents` and `systemInstruction`: the fake's prompt tokens."""
    if not isinstance(body, dict):
        return 0
    contents = list(body.get("contents") or [])
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, dict):
        contents.append(system)
    words = 0
    for content in contents:
        for part in (content or {}).get("parts") or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                words += count_words(part["text"])
    return words


class FakeGemini(FakeOpenAI):
    """Fake `generativelanguage.googleapis.com`."""

    DEFAULT_MODELS: ClassVar[list[str]] = [
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "gemini-2.0-flash-lite",
        "gemma-3-27b-it",
    ]
    EMBEDDING_MODELS: ClassVar[list[str]] = ["gemini-embedding-001"]
    THOUGHTS = 3  # thoughtsTokenCount of "2.5" models: billed as output

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.door_sends_done = True  # False: the OpenAI-compatible stream just ends after its last chunk

    async def _stream(self, request: web.Request, events: Any, headers: dict[str, str]) -> web.StreamResponse:
        if not self.door_sends_done:
            events = [e for e in events if e.data != b"data: [DONE]\n\n"]
        return await super()._stream(request, events, headers)

    def _key_of(self, headers: dict[str, str]) -> str | None:
        return headers.get("x-goog-api-key") or _bearer(headers)

    def _common_headers(self) -> dict[str, str]:
        return {"x-request-id": f"greq{self._next_id()}", "server": "scaffolding on HTTPServer2"}

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        key = self._key_of(_lower_headers(request)) or request.query.get("key")
        compat = path.startswith("/v1beta/openai/")
        if key is None:
            return self._error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.", compat)
        behaviour = self.keys.get(key)
        if behaviour is None or behaviour.kind == "revoked":
            return self._error(
                400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", compat,
                {"@type": ERROR_INFO, "reason": "API_KEY_INVALID", "domain": "googleapis.com"},
            )  # fmt: skip
        if method == "GET" and path in ("/v1beta/models", "/v1/models"):
            return self._list(behaviour)
        if method == "GET" and path == "/v1beta/openai/models":
            models = self._models_for(behaviour)
            return self._json({"object": "list", "data": [{"id": f"models/{m}", "object": "model"} for m in models]})
        if method != "POST":
            return self._error(404, "NOT_FOUND", f"Method not found: {method} {path}", compat)
        body = _parse_json(await request.read())
        refusal = self._refuse_key(key, behaviour, compat)
        if refusal is not None:
            return refusal
        if path == "/v1beta/openai/chat/completions":
            model = str((body or {}).get("model") or "").removeprefix("models/")
            if model not in self._models_for(behaviour):
                return self._error(404, "NOT_FOUND", f"models/{model} is not found for API version v1main.", True)
            return await self._chat(request, body, behaviour)
        version, _, rest = path.lstrip("/").partition("/models/")
        model, _, action = rest.partition(":")
        if version not in ("v1", "v1beta") or action not in ("generateContent", "streamGenerateContent", "countTokens"):
            return self._error(404, "NOT_FOUND", f"Method not found: {path}", False)
        if model not in self._models_for(behaviour):
            return self._error(
                404, "NOT_FOUND",
                f"models/{model} is not found for API version {version}, or is not supported for {action}.", False,
            )  # fmt: skip
        if not isinstance(body, dict) or not isinstance(body.get("contents"), list):
            message = "* GenerateContentRequest.contents: contents is not specified"
            return self._error(400, "INVALID_ARGUMENT", message, False)
        prompt = gemini_text_words(body)
        if action == "countTokens":
            return self._json({"totalTokens": prompt})
        if action == "generateContent":
            return self._json(self._reply(model, body, prompt, final=True, text=f"Hello from fake {model}"))
        return await self._stream_gemini(request, model, body, prompt)

    # -- replies ---------------------------------------------------------------------------

    def _usage(self, model: str, prompt: int, candidates: int) -> Json:
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": candidates}
        if "2.5" in model:
            usage["thoughtsTokenCount"] = self.THOUGHTS
        usage["totalTokenCount"] = prompt + candidates + usage.get("thoughtsTokenCount", 0)
        return usage

    def _reply(self, model: str, body: Json, prompt: int, *, final: bool, text: str, candidates: int = 0) -> Json:
        candidate: Json = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
        if final:
            candidate["finishReason"] = "STOP"
        words = candidates or count_words(text)
        return {"candidates": [candidate], "usageMetadata": self._usage(model, prompt, words), "modelVersion": model}

    async def _stream_gemini(self, request: web.Request, model: str, body: Json, prompt: int) -> web.StreamResponse:
        max_tokens = (body.get("generationConfig") or {}).get("maxOutputTokens")
        n, cut = self._chunk_count(max_tokens)
        chunks = []
        for i in range(n):
            payload = self._reply(model, body, prompt, final=i == n - 1, text=f"tok{i} ", candidates=i + 1)
            if cut and i == n - 1:
                payload["candidates"][0]["finishReason"] = "MAX_TOKENS"
            chunks.append(payload)
        if request.query.get("alt") == "sse":
            events = [StreamEvent(b"data: " + jsonlib.dumps(c).encode() + b"\r\n\r\n", content=True) for c in chunks]
        else:  # without alt=sse Gemini streams one JSON array
            text = "[" + ",\r\n".join(jsonlib.dumps(c) for c in chunks) + "]"
            events = [StreamEvent(text.encode(), content=True)]
        response = await self._stream(request, events, {})
        return response

    # -- errors ----------------------------------------------------------------------------

    def _error(self, code: int, status: str, message: str, compat: bool, *details: Json) -> web.Response:
        body = google_error(code, status, message, *details)
        return self._json([body] if compat else body, code)

    def _refuse_key(self, key: str, b: KeyBehaviour, compat: bool) -> web.Response | None:
        if b.kind == "over_quota":
            return self._error(
                403, "PERMISSION_DENIED", "This API method requires billing to be enabled.", compat,
                {"@type": ERROR_INFO, "reason": "BILLING_DISABLED", "domain": "googleapis.com"},
            )  # fmt: skip
        if b.rate_limited:
            return self._error(
                429, "RESOURCE_EXHAUSTED",
                "You exceeded your current quota, please check your plan and billing details.", compat,
                {"@type": QUOTA_FAILURE, "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "quotaValue": "10"}]},
                {"@type": RETRY_INFO, "retryDelay": f"{int(b.wait_s)}s"},
            )  # fmt: skip
        if b.kind == "server_error" or (b.kind == "flaky" and self._flaky_fails(key)):
            return self._error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.", compat)
        return None

    def _list(self, b: KeyBehaviour) -> web.Response:
        def card(model: str, methods: list[str]) -> Json:
            return {"name": f"models/{model}", "displayName": model, "supportedGenerationMethods": methods}

        models = [card(m, ["generateContent", "countTokens"]) for m in self._models_for(b)]
        models += [card(m, ["embedContent"]) for m in self.EMBEDDING_MODELS]
        return self._json({"models": models})


def gemini_body(text: str = "Hello there", max_tokens: int | None = None) -> Json:
    """A native request as the google-genai SDK writes it."""
    body: Json = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if max_tokens is not None:
        body["generationConfig"] = {"maxOutputTokens": max_tokens}
    return body


def sse_payloads(raw: bytes) -> list[Json]:
    """The JSON of each `data:` event in an SSE body (CRLF or LF)."""
    out = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                text = line[5:].strip()
                if text and text != b"[DONE]":
                    out.append(jsonlib.loads(text))
    return out
