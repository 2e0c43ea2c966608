"""Fake OpenAI and Anthropic upstreams: real aiohttp servers on a loopback port.

Each fake runs in a background thread with its own event loop and exposes a synchronous,
thread-safe API, so synchronous tests can point a proxy at ``fake.url + "/v1"`` and then
inspect ``fake.requests``. Streams are written chunk by chunk over real sockets, so client
disconnects and upstream drops are real too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json as jsonlib
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Self

from aiohttp import web

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CREATED = 1_700_000_000
KINDS = (
    "paid",
    "trial",
    "revoked",
    "over_quota",
    "rate_limited",
    "flaky",
    "server_error",
    "slow_rate_limited",
    "windowed",
)
SLOW_RESET_S = 90.0  # minimum reset of a "slow_rate_limited" key: "1m30s"


@dataclass
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    key: str | None


@dataclass
class KeyBehaviour:
    """How the fake treats one API key.

    ``slow_rate_limited`` is ``rate_limited`` with a long wait: ``max(reset_s, 90)`` seconds.
    ``windowed`` serves ``per_window`` generation requests per sliding ``window_s`` seconds and
    answers 429 beyond (like OpenAI: ``x-ratelimit-reset-requests``, ``retry-after(-ms)``); its
    replies report the requests left and the reset, exactly.
    """

    kind: str = "paid"
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    reset_s: float = 20.0
    per_window: int = 2
    window_s: float = 2.0
    admitted_at: list[float] = field(default_factory=list, compare=False, repr=False)

    def window(self) -> tuple[int, float]:
        """Requests left in the window now, and seconds until the oldest leaves it ("windowed")."""
        now = time.monotonic()
        self.admitted_at[:] = [t for t in self.admitted_at if t > now - self.window_s]
        left = self.per_window - len(self.admitted_at)
        reset = self.admitted_at[0] + self.window_s - now if self.admitted_at else 0.0
        return left, max(reset, 0.0)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown key kind {self.kind!r}; expected one of {KINDS}")

    @property
    def rate_limited(self) -> bool:
        """Whether generation calls answer 429 for rate limiting."""
        return self.kind in ("rate_limited", "slow_rate_limited")

    @property
    def wait_s(self) -> float:
        """Seconds a rate-limited caller is told to wait."""
        return max(self.reset_s, SLOW_RESET_S) if self.kind == "slow_rate_limited" else self.reset_s


def format_reset(seconds: float) -> str:
    """Format a duration the way OpenAI's ``x-ratelimit-reset-*`` headers do: 250ms, 20s, 1m30s."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    secs_text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{secs_text}"
    if minutes:
        return f"{int(minutes)}m{secs_text}"
    return secs_text


def count_words(text: str) -> int:
    """Whitespace-separated words: the fakes' deterministic token count."""
    return len(text.split())


def content_words(content: Any) -> int:
    """Words in a message content: a string, or a list of parts with ``text``."""
    if isinstance(content, str):
        return count_words(content)
    if isinstance(content, list):
        return sum(
            count_words(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def messages_tokens(messages: Any) -> int:
    """Prompt tokens of a message list: words of all contents plus 3 per message."""
    if not isinstance(messages, list):
        return 0
    return sum(content_words(m.get("content")) + 3 for m in messages if isinstance(m, dict))


def sse_data(payload: Json | str) -> bytes:
    """One OpenAI-style ``data:`` event."""
    text = payload if isinstance(payload, str) else jsonlib.dumps(payload)
    return f"data: {text}\n\n".encode()


def sse_event(payload: Json) -> bytes:
    """One Anthropic-style event, named after its ``type``."""
    return f"event: {payload['type']}\ndata: {jsonlib.dumps(payload)}\n\n".encode()


def _lower_headers(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        name = name.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _bearer(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def _parse_json(body: bytes) -> Any | None:
    if not body:
        return None
    try:
        return jsonlib.loads(body)
    except ValueError:
        return None


@dataclass
class StreamEvent:
    """A piece of a streamed reply; ``content`` marks the ones ``drop_mid_stream`` counts."""

    data: bytes
    content: bool = False


class FakeUpstream:
    """A real HTTP server on 127.0.0.1 that records every request; subclasses add routes."""

    DEFAULT_MODELS: ClassVar[list[str]] = []

    def __init__(
        self,
        keys: dict[str, KeyBehaviour] | None = None,
        *,
        stream_delay: float = 0.0,
        chunks: int = 5,
    ) -> None:
        self.keys: dict[str, KeyBehaviour] = dict(keys or {})
        self.stream_delay = stream_delay
        self.chunks = chunks
        self.drop_mid_stream = False
        self.hang_first_byte = 0.0
        self.first_token_delay = 0.0  # seconds of silence after a stream's headers (a thinking model)
        self.admitted: list[Any] = []  # bodies of the generation requests a "windowed" key served
        self.next_status: list[tuple[int, Json] | tuple[int, Json, dict[str, str]]] = []
        self.requests: list[Recorded] = []
        self.calls_by_key: dict[str, int] = {}
        self.url = ""
        self._lock = threading.Lock()
        self._generation_calls: dict[str, int] = {}
        self._open_streams = 0
        self._closed_early = 0
        self._dropped = 0
        self._ids = itertools.count(1)
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- synchronous API -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``url`` plus ``/v1``: what a client's base URL should be."""
        return f"{self.url}/v1"

    @property
    def open_streams(self) -> int:
        """Streaming responses currently being written."""
        return self._open_streams

    @property
    def closed_early(self) -> int:
        """Streams whose client went away before the stream finished."""
        return self._closed_early

    @property
    def dropped(self) -> int:
        """Streams this fake cut on purpose (``drop_mid_stream``)."""
        return self._dropped

    def start(self) -> Self:
        """Start serving in a background thread; returns once the port is listening."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serve,
            args=(ready, failure),
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving, cancelling open streams; returns within about a second."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._stopping = True
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        # Best effort: whatever cleanup did not finish, the loop is stopped below anyway.
        with contextlib.suppress(Exception):
            future.result(timeout=2)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=2)
        self._thread = None
        self._loop = None

    def reset(self) -> None:
        """Forget recorded requests and all counters (knobs and keys are kept)."""
        with self._lock:
            self.requests.clear()
            self.calls_by_key.clear()
            self.admitted.clear()
            self._generation_calls.clear()
            self._closed_early = 0
            self._dropped = 0

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- server plumbing -------------------------------------------------------------------

    def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            failure.append(exc)
            ready.set()
            loop.close()
            self._loop = None
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _startup(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a client disconnect cancels the handler at once, even while it
        # sleeps between chunks, instead of surfacing only at the next write.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        headers = _lower_headers(request)
        key = self._key_of(headers)
        with self._lock:
            self.requests.append(
                Recorded(
                    request.method,
                    request.path_qs,
                    headers,
                    body,
                    _parse_json(body),
                    key,
                )
            )
            if key is not None:
                self.calls_by_key[key] = self.calls_by_key.get(key, 0) + 1
        if self.hang_first_byte > 0:
            await asyncio.sleep(self.hang_first_byte)
        forced = self._pop_forced()
        if forced is not None:
            status, payload, extra = forced
            return self._json(payload, status, extra)
        return await handler(request)

    def _pop_forced(self) -> tuple[int, Json, dict[str, str]] | None:
        with self._lock:
            if not self.next_status:
                return None
            entry = self.next_status.pop(0)
        status, payload = entry[0], entry[1]
        extra = entry[2] if len(entry) > 2 else {}  # type: ignore[misc]
        return status, payload, dict(extra)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def _key_of(self, headers: dict[str, str]) -> str | None:
        return _bearer(headers)

    def _common_headers(self) -> dict[str, str]:
        """Headers every reply carries (request ids, things the proxy must strip)."""
        return {}

    def _next_id(self) -> int:
        return next(self._ids)

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        all_headers = {**self._common_headers(), **(headers or {})}
        return web.json_response(payload, status=status, headers=all_headers)

    def _models_for(self, behaviour: KeyBehaviour) -> list[str]:
        return list(behaviour.models) if behaviour.models is not None else list(self.DEFAULT_MODELS)

    def _flaky_fails(self, key: str) -> bool:
        """Count a generation call for ``key``; the 2nd, 4th, ... fail."""
        with self._lock:
            n = self._generation_calls.get(key, 0) + 1
            self._generation_calls[key] = n
        return n % 2 == 0

    def _chunk_count(self, max_tokens: Any) -> tuple[int, bool]:
        """Content chunks to send and whether ``max_tokens`` cut the reply short."""
        chunks = max(int(self.chunks), 0)
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens < chunks:
            return max(max_tokens, 0), True
        return chunks, False

    async def _stream(
        self,
        request: web.Request,
        events: Iterable[StreamEvent],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Write ``events`` one by one, flushing each, honouring the delay and drop knobs."""
        events = list(events)
        response = web.StreamResponse(
            status=200,
            headers={
                **self._common_headers(),
                **headers,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            },
        )
        drop_at = self._drop_index(events) if self.drop_mid_stream else None
        dropping = False
        await response.prepare(request)
        with self._lock:
            self._open_streams += 1
        try:
            if self.first_token_delay > 0:
                await asyncio.sleep(self.first_token_delay)
            for index, event in enumerate(events):
                if index and self.stream_delay > 0:
                    await asyncio.sleep(self.stream_delay)
                await response.write(event.data)
                if index == drop_at:
                    await asyncio.sleep(0.05)  # let the bytes leave before the cut
                    dropping = True
                    with self._lock:
                        self._dropped += 1
                    if request.transport is not None:
                        request.transport.abort()
                    await asyncio.sleep(1)  # the abort cancels this handler
                    return response
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            if not (dropping or self._stopping):
                with self._lock:
                    self._closed_early += 1
            raise
        finally:
            with self._lock:
                self._open_streams -= 1
        return response

    @staticmethod
    def _drop_index(events: list[StreamEvent]) -> int:
        """Index of the event after which ``drop_mid_stream`` cuts: the 2nd content chunk."""
        content = [i for i, event in enumerate(events) if event.content]
        if not content:
            return 0
        return content[min(1, len(content) - 1)]


# --------------------------------------------------------------------------------------------
# OpenAI
# --------------------------------------------------------------------------------------------


def openai_error(message: str, type_: str, code: str | None = None, param: str | None = None) -> Json:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class FakeOpenAI(FakeUpstream):
    """Fake ``api.openai.com``: models, chat completions, completions, embeddings."""

    DEFAULT_MODELS: ClassVar[list[str]] = [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4",
        "gpt-3.5-turbo",
        "o3-mini",
        "gpt-5",
        "text-embedding-3-small",
        "ft:gpt-4o-mini:org::abc123",
        "dall-e-3",
        "whisper-1",
        "tts-1",
    ]
    GENERATION: ClassVar[dict[str, str]] = {
        "/v1/chat/completions": "chat",
        "/v1/completions": "completion",
        "/v1/embeddings": "embedding",
        "/v1/responses": "responses",
    }
    # Models that refuse max_tokens and non-default sampling values, as OpenAI's reasoning models do.
    REASONING = re.compile(r"^(o\d|gpt-5)")
    reasoning_models: ClassVar[frozenset[str]] = frozenset()  # more, by exact id (a "new family")
    ENCRYPTED_CONTENT: ClassVar[str] = "gAAAAfake"  # a reasoning item's encrypted_content (Fernet-like)

    def _common_headers(self) -> dict[str, str]:
        return {
            "x-request-id": f"req_fake{self._next_id()}",
            "openai-organization": "org-secret",
            "openai-processing-ms": "1",
            "openai-version": "2020-10-01",
            "set-cookie": "upstream=1; Path=/; HttpOnly",
        }

    def _limits(self, b: KeyBehaviour) -> tuple[int, int]:
        trial = b.kind == "trial"
        rpm = b.rpm if b.rpm is not None else (3 if trial else 5000)
        tpm = b.tpm if b.tpm is not None else (40_000 if trial else 800_000)
        return rpm, tpm

    def _ratelimit_headers(self, b: KeyBehaviour, tokens: int = 0) -> dict[str, str]:
        rpm, tpm = self._limits(b)
        headers = {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-limit-tokens": str(tpm),
            "x-ratelimit-remaining-requests": str(max(rpm - 1, 0)),
            "x-ratelimit-remaining-tokens": str(max(tpm - tokens, 0)),
            "x-ratelimit-reset-requests": format_reset(60 / max(rpm, 1)),
            "x-ratelimit-reset-tokens": format_reset(60 * tokens / max(tpm, 1)),
        }
        if b.kind == "windowed":
            left, reset = b.window()
            headers["x-ratelimit-limit-requests"] = str(b.per_window)
            headers["x-ratelimit-remaining-requests"] = str(max(left, 0))
            headers["x-ratelimit-reset-requests"] = format_reset(reset)
        return headers

    def _windowed(self, b: KeyBehaviour, body: Any) -> web.Response | None:
        """A "windowed" key: admit the request into the window, or answer 429 until it has room."""
        left, reset = b.window()
        if left > 0:
            b.admitted_at.append(time.monotonic())
            with self._lock:
                self.admitted.append(body)
            return None
        headers = {
            **self._ratelimit_headers(b),
            "retry-after": str(max(math.ceil(reset), 1)),
            "retry-after-ms": str(max(round(reset * 1000), 1)),
        }
        message = f"Rate limit reached for requests: Limit {b.per_window}, Used {b.per_window}, Requested 1."
        return self._json(openai_error(message, "requests", "rate_limit_exceeded"), 429, headers)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        is_models = path == "/v1/models" or path.startswith("/v1/models/")
        route = self.GENERATION.get(path) if method == "POST" else None
        if not (route or (is_models and method == "GET")):
            return self._json(
                openai_error(f"Invalid URL ({method} {path})", "invalid_request_error"),
                404,
            )
        key = self._key_of(_lower_headers(request))
        if key is None:
            return self._json(
                openai_error(
                    "You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    "invalid_request_error",
                ),
                401,
            )
        behaviour = self.keys.get(key)
        if behaviour is None or behaviour.kind == "revoked":
            return self._json(
                openai_error(
                    f"Incorrect API key provided: {key}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                    "invalid_request_error",
                    "invalid_api_key",
                ),
                401,
            )
        if route is None:
            return self._models(path, behaviour)
        body = _parse_json(await request.read())
        refusal = self._refuse(key, behaviour, body)
        if refusal is not None:
            return refusal
        if not isinstance(body, dict):
            return self._json(
                openai_error(
                    "We could not parse the JSON body of your request. (HINT: This likely means "
                    "you aren't using your HTTP library correctly.)",
                    "invalid_request_error",
                ),
                400,
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._json(
                openai_error("you must provide a model parameter", "invalid_request_error"),
                400,
            )
        if model not in self._models_for(behaviour):
            return self._json(
                openai_error(
                    f"The model `{model}` does not exist or you do not have access to it.",
                    "invalid_request_error",
                    "model_not_found",
                ),
                404,
            )
        if route == "embedding":
            return self._embeddings(body, behaviour)
        if route == "responses":
            return await self._responses(request, body, behaviour)
        refused = self._reasoning_refusal(body) if route == "chat" else None
        if refused is not None:
            return self._json(refused, 400, self._ratelimit_headers(behaviour))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            return self._json(
                openai_error(
                    f"Invalid '{param}': integer below minimum value. Expected a value >= 1, "
                    f"but got {max_tokens} instead. {param} must be at least 1.",
                    "invalid_request_error",
                    "integer_below_min_value",
                    param,
                ),
                400,
                self._ratelimit_headers(behaviour),
            )
        if route == "chat":
            return await self._chat(request, body, behaviour)
        return await self._completion(request, body, behaviour)

    def _refuse(self, key: str, b: KeyBehaviour, body: Any) -> web.Response | None:
        """The key's failure on a generation route, if it has one."""
        if b.kind == "over_quota":
            return self._json(
                openai_error(
                    "You exceeded your current quota, please check your plan and billing details.",
                    "insufficient_quota",
                    "insufficient_quota",
                ),
                429,
            )
        if b.kind == "windowed":
            return self._windowed(b, body)
        if b.rate_limited:
            model = body.get("model") if isinstance(body, dict) else None
            rpm, _ = self._limits(b)
            wait = format_reset(b.wait_s)
            headers = {
                **self._ratelimit_headers(b),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": wait,
                "retry-after": str(max(math.ceil(b.wait_s), 1)),
            }
            return self._json(
                openai_error(
                    f"Rate limit reached for {model or 'gpt-4o'} in organization org-secret on "
                    f"requests per min (RPM): Limit {rpm}, Used {rpm}, Requested 1. Please try "
                    f"again in {wait}. Visit https://platform.openai.com/account/rate-limits to "
                    "learn more.",
                    "requests",
                    "rate_limit_exceeded",
                ),
                429,
                headers,
            )
        if b.kind == "server_error" or (b.kind == "flaky" and self._flaky_fails(key)):
            return self._json(
                openai_error(
                    "The server had an error while processing your request.",
                    "server_error",
                ),
                500,
            )
        return None

    def is_reasoning(self, model: str) -> bool:
        return bool(self.REASONING.match(model)) or model in self.reasoning_models

    def _reasoning_refusal(self, body: Json) -> Json | None:
        """OpenAI's 400 for a parameter a reasoning model refuses (one at a time, as OpenAI does)."""
        if not self.is_reasoning(body["model"]):
            return None
        if "max_tokens" in body:
            return openai_error(
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                "invalid_request_error", "unsupported_parameter", "max_tokens",
            )  # fmt: skip
        for name in ("temperature", "top_p"):
            value = body.get(name)
            if value is not None and value != 1:
                return openai_error(
                    f"Unsupported value: '{name}' does not support {value} with this model. "
                    "Only the default (1) value is supported.",
                    "invalid_request_error", "unsupported_value", name,
                )  # fmt: skip
        return None

    async def _responses(self, request: web.Request, body: Json, b: KeyBehaviour) -> web.StreamResponse:
        """POST /v1/responses: a message (and a reasoning item for reasoning models), streamed or not."""
        model = body["model"]
        if body.get("previous_response_id"):
            return self._json(
                openai_error(
                    f"Previous response with id '{body['previous_response_id']}' not found.",
                    "invalid_request_error", "previous_response_not_found", "previous_response_id",
                ),
                400,
            )  # fmt: skip
        raw = body.get("input")
        if isinstance(raw, str):
            prompt = count_words(raw)
        elif isinstance(raw, list):
            prompt = sum(content_words(item.get("content")) + 3 for item in raw if isinstance(item, dict))
        else:
            return self._json(openai_error("Missing required parameter: 'input'.", "invalid_request_error",
                                           "missing_required_parameter", "input"), 400)  # fmt: skip
        prompt += count_words(body.get("instructions") or "")
        n, cut = self._chunk_count(body.get("max_output_tokens"))
        reasoning = 3 if self.is_reasoning(model) else 0
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": min(prompt, 2)},
            "output_tokens": n + reasoning,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + n + reasoning,
        }
        ident = f"resp_fake{self._next_id()}"
        text = "".join(f"tok{i} " for i in range(n))
        message = {
            "type": "message", "id": f"msg_{ident}", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }  # fmt: skip
        output: list[Json] = []
        if reasoning:
            output.append({"type": "reasoning", "id": f"rs_{ident}", "summary": [],
                           "encrypted_content": self.ENCRYPTED_CONTENT})  # fmt: skip
        output.append(message)

        def response(status: str, with_output: bool) -> Json:
            return {
                "id": ident, "object": "response", "created_at": CREATED, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if cut and with_output else None,
                "instructions": body.get("instructions"), "model": model,
                "output": output if with_output else [], "parallel_tool_calls": True,
                "store": body.get("store", True), "tool_choice": "auto", "tools": [],
                "usage": usage if with_output else None,
            }  # fmt: skip

        final_status = "incomplete" if cut else "completed"
        headers = self._ratelimit_headers(b, prompt)
        if not body.get("stream"):
            return self._json(response(final_status, True), 200, headers)
        sequence = itertools.count()

        def ev(kind: str, content: bool = False, **fields: Any) -> StreamEvent:
            payload = {"type": kind, "sequence_number": next(sequence), **fields}
            return StreamEvent(f"event: {kind}\ndata: {jsonlib.dumps(payload)}\n\n".encode(), content)

        index = len(output) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events = [
            ev("response.created", response=response("in_progress", False)),
            ev("response.in_progress", response=response("in_progress", False)),
        ]
        if reasoning:
            events.append(ev("response.output_item.added", output_index=0, item=output[0]))
            events.append(ev("response.output_item.done", output_index=0, item=output[0]))
        events += [
            ev("response.output_item.added", output_index=index,
               item={**message, "status": "in_progress", "content": []}),
            ev("response.content_part.added", item_id=message["id"], output_index=index, content_index=0, part=part),
        ]  # fmt: skip
        events += [
            ev("response.output_text.delta", True, item_id=message["id"], output_index=index, content_index=0,
               delta=f"tok{i} ", logprobs=[])
            for i in range(n)
        ]  # fmt: skip
        events += [
            ev("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
               text=text, logprobs=[]),
            ev("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
               part={**part, "text": text}),
            ev("response.output_item.done", output_index=index, item=message),
            ev(f"response.{final_status}", response=response(final_status, True)),
        ]  # fmt: skip
        return await self._stream(request, events, headers)

    def _models(self, path: str, b: KeyBehaviour) -> web.Response:
        models = self._models_for(b)
        headers = self._ratelimit_headers(b)

        def card(model: str) -> Json:
            return {
                "id": model,
                "object": "model",
                "created": CREATED,
                "owned_by": "openai",
            }

        if path == "/v1/models":
            return self._json({"object": "list", "data": [card(m) for m in models]}, 200, headers)
        model = path.removeprefix("/v1/models/")
        if model not in models:
            return self._json(
                openai_error(
                    f"The model '{model}' does not exist",
                    "invalid_request_error",
                    "model_not_found",
                    "model",
                ),
                404,
            )
        return self._json(card(model), 200, headers)

    def _embeddings(self, body: Json, b: KeyBehaviour) -> web.Response:
        raw = body.get("input")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        tokens = sum(
            count_words(item) if isinstance(item, str) else len(item) if isinstance(item, list) else 0
            for item in inputs
        )
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        payload = {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return self._json(payload, 200, self._ratelimit_headers(b, tokens))

    async def _chat(self, request: web.Request, body: Json, b: KeyBehaviour) -> web.StreamResponse:
        model = body["model"]
        prompt = messages_tokens(body.get("messages"))
        n, cut = self._chunk_count(body.get("max_completion_tokens", body.get("max_tokens")))
        finish = "length" if cut else "stop"
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": n,
            "total_tokens": prompt + n,
        }
        headers = self._ratelimit_headers(b, prompt)
        ident = f"chatcmpl-fake{self._next_id()}"
        if not body.get("stream"):
            message = {
                "role": "assistant",
                "content": f"Hello from fake {model}",
                "refusal": None,
            }
            return self._json(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                    "system_fingerprint": "fp_fake",
                },
                200,
                headers,
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: Json, finish_reason: str | None) -> StreamEvent:
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            payload: Json = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [choice],
            }
            if include_usage:
                payload["usage"] = None
            return StreamEvent(sse_data(payload), content=bool(delta.get("content")))

        events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
        events += [chunk({"content": f"tok{i} "}, None) for i in range(n)]
        events.append(chunk({}, finish))
        if include_usage:
            final = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": usage,
            }
            events.append(StreamEvent(sse_data(final)))
        events.append(StreamEvent(sse_data("[DONE]")))
        return await self._stream(request, events, headers)

    async def _completion(self, request: web.Request, body: Json, b: KeyBehaviour) -> web.StreamResponse:
        model = body["model"]
        raw = body.get("prompt")
        prompts = raw if isinstance(raw, list) else [raw]
        prompt = sum(count_words(p) for p in prompts if isinstance(p, str))
        n, cut = self._chunk_count(body.get("max_tokens"))
        finish = "length" if cut else "stop"
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": n,
            "total_tokens": prompt + n,
        }
        headers = self._ratelimit_headers(b, prompt)
        ident = f"cmpl-fake{self._next_id()}"
        if not body.get("stream"):
            choice = {
                "text": f"Hello from fake {model}",
                "index": 0,
                "logprobs": None,
                "finish_reason": finish,
            }
            return self._json(
                {
                    "id": ident,
                    "object": "text_completion",
                    "created": CREATED,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                },
                200,
                headers,
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(choices: list[Json], **extra: Any) -> bytes:
            payload = {
                "id": ident,
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": choices,
                **extra,
            }
            if include_usage:
                payload.setdefault("usage", None)
            return sse_data(payload)

        def text(value: str, finish_reason: str | None) -> Json:
            return {
                "text": value,
                "index": 0,
                "logprobs": None,
                "finish_reason": finish_reason,
            }

        events = [StreamEvent(chunk([text(f"tok{i} ", None)]), content=True) for i in range(n)]
        events.append(StreamEvent(chunk([text("", finish)])))
        if include_usage:
            events.append(StreamEvent(chunk([], usage=usage)))
        events.append(StreamEvent(sse_data("[DONE]")))
        return await self._stream(request, events, headers)


# --------------------------------------------------------------------------------------------
# Anthropic
# --------------------------------------------------------------------------------------------


def anthropic_error(type_: str, message: str) -> Json:
    """Anthropic's error body."""
    return {"type": "error", "error": {"type": type_, "message": message}}


def display_name(model: str) -> str:
    """A human name for a Claude model id: ``claude-3-5-haiku-20241022`` -> ``Claude 3.5 Haiku``."""
    parts = [p for p in model.split("-") if not (p.isdigit() and len(p) == 8)]
    words: list[str] = []
    for part in parts:
        if part.isdigit() and words and words[-1].replace(".", "").isdigit():
            words[-1] += f".{part}"
        else:
            words.append(part.capitalize())
    return " ".join(words)


class FakeAnthropic(FakeUpstream):
    """Fake ``api.anthropic.com``: messages (with tool use), count_tokens, models."""

    DEFAULT_MODELS: ClassVar[list[str]] = [
        "claude-3-5-haiku-20241022",
        "claude-sonnet-4-20250514",
        "claude-opus-4-20250514",
        "claude-3-haiku-20240307",
        "claude-opus-4-6",
    ]
    TOOL_INPUT = '{"city": "Paris"}'
    # Thinking: which models take the adaptive form, and which refuse the budget form.
    ADAPTIVE: ClassVar[frozenset[str]] = frozenset({"claude-opus-4-6", "claude-mythos-5"})
    ADAPTIVE_ONLY: ClassVar[frozenset[str]] = frozenset({"claude-mythos-5"})
    THINKING = "Let me think about this."
    SIGNATURE = "sig_fake_EqQBCkgIARABGAIiQL"
    REDACTED = "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"
    THINKING_TOKENS = 5

    def _key_of(self, headers: dict[str, str]) -> str | None:
        return headers.get("x-api-key") or _bearer(headers)

    def _common_headers(self) -> dict[str, str]:
        return {
            "request-id": f"req_fake{self._next_id()}",
            "anthropic-organization-id": "org-secret-anthropic",
        }

    def _ratelimit_headers(self, b: KeyBehaviour, input_tokens: int = 0) -> dict[str, str]:
        trial = b.kind == "trial"
        rpm = b.rpm if b.rpm is not None else (5 if trial else 4000)
        input_limit = 20_000 if trial else 400_000
        output_limit = 4_000 if trial else 80_000
        tokens = b.tpm if b.tpm is not None else input_limit + output_limit
        reset = (datetime.now(UTC) + timedelta(seconds=60 / max(rpm, 1))).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "anthropic-ratelimit-requests-limit": str(rpm),
            "anthropic-ratelimit-requests-remaining": str(max(rpm - 1, 0)),
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-tokens-limit": str(tokens),
            "anthropic-ratelimit-tokens-remaining": str(max(tokens - input_tokens, 0)),
            "anthropic-ratelimit-tokens-reset": reset,
            "anthropic-ratelimit-input-tokens-limit": str(input_limit),
            "anthropic-ratelimit-input-tokens-remaining": str(max(input_limit - input_tokens, 0)),
            "anthropic-ratelimit-input-tokens-reset": reset,
            "anthropic-ratelimit-output-tokens-limit": str(output_limit),
            "anthropic-ratelimit-output-tokens-remaining": str(output_limit),
            "anthropic-ratelimit-output-tokens-reset": reset,
        }

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        routes = {
            ("POST", "/v1/messages"): "messages",
            ("POST", "/v1/messages/count_tokens"): "count",
            ("GET", "/v1/models"): "models",
        }
        route = routes.get((method, path))
        if route is None:
            return self._json(anthropic_error("not_found_error", "Not found"), 404)
        headers = _lower_headers(request)
        key = self._key_of(headers)
        if key is None:
            return self._json(
                anthropic_error("authentication_error", "x-api-key header is required"),
                401,
            )
        behaviour = self.keys.get(key)
        if behaviour is None or behaviour.kind == "revoked":
            return self._json(
                anthropic_error("authentication_error", f"invalid x-api-key (received {key})"),
                401,
            )
        if "anthropic-version" not in headers:
            return self._json(
                anthropic_error("invalid_request_error", "anthropic-version: header is required"),
                400,
            )
        if route == "models":
            return self._models(behaviour)
        refusal = self._refuse(key, behaviour)
        if refusal is not None:
            return refusal
        body = _parse_json(await request.read())
        if not isinstance(body, dict):
            return self._json(
                anthropic_error("invalid_request_error", "There was an error parsing the body."),
                400,
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._json(anthropic_error("invalid_request_error", "model: Field required"), 400)
        if model not in self._models_for(behaviour):
            return self._json(anthropic_error("not_found_error", f"model: {model}"), 404)
        if not isinstance(body.get("messages"), list):
            return self._json(
                anthropic_error("invalid_request_error", "messages: Field required"),
                400,
            )
        prompt = self._input_tokens(body)
        if route == "count":
            return self._json({"input_tokens": prompt}, 200, self._ratelimit_headers(behaviour))
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            message = (
                "max_tokens: Field required"
                if max_tokens is None
                else "max_tokens: Input should be greater than or equal to 1"
            )
            return self._json(
                anthropic_error("invalid_request_error", message),
                400,
                self._ratelimit_headers(behaviour, prompt),
            )
        refused = self._thinking_refusal(body)
        if refused is not None:
            return self._json(anthropic_error("invalid_request_error", refused), 400)
        return await self._message(request, body, behaviour, prompt)

    def _thinking_refusal(self, body: Json) -> str | None:
        """Claude's 400s around extended thinking, and for thinking blocks sent back altered."""
        for i, message in enumerate(body["messages"]):
            content = message.get("content") if isinstance(message, dict) else None
            for j, block in enumerate(content if isinstance(content, list) else ()):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "thinking" and block.get("signature") != self.SIGNATURE:
                    return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                if kind == "redacted_thinking" and block.get("data") != self.REDACTED:
                    return f"messages.{i}.content.{j}: Invalid `data` in `redacted_thinking` block"
        thinking = body.get("thinking")
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "adaptive"):
            return None
        model = body["model"]
        assistants = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "assistant"]
        last = assistants[-1].get("content") if assistants else None
        calls_tool = isinstance(last, list) and any(isinstance(b, dict) and b.get("type") == "tool_use" for b in last)
        if calls_tool and not (isinstance(last[0], dict) and last[0].get("type") in ("thinking", "redacted_thinking")):
            return (
                "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `tool_use`. "
                "When `thinking` is enabled, a final `assistant` message must start with a thinking block."
            )
        if kind == "enabled" and model in self.ADAPTIVE_ONLY:
            return (
                '"thinking.type.enabled" is not supported for this model. Use "thinking.type.adaptive" and '
                '"output_config.effort" to control thinking behavior.'
            )
        if kind == "adaptive" and model not in self.ADAPTIVE:
            return "adaptive thinking is not supported on this model"
        if kind == "enabled":
            budget = thinking.get("budget_tokens")
            if not isinstance(budget, int) or budget < 1024:
                return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
            if budget >= body["max_tokens"]:
                return "`max_tokens` must be greater than `thinking.budget_tokens`."
        if body.get("temperature") not in (None, 1):
            return "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode."
        if isinstance(body.get("tool_choice"), dict) and body["tool_choice"].get("type") in ("any", "tool"):
            return "Thinking may not be enabled when tool_choice forces tool use."
        return None

    def _refuse(self, key: str, b: KeyBehaviour) -> web.Response | None:
        """The key's failure on messages/count_tokens, if it has one."""
        if b.kind == "over_quota":
            return self._json(
                anthropic_error(
                    "invalid_request_error",
                    "Your credit balance is too low to access the Anthropic API. Please go to "
                    "Plans & Billing to upgrade or purchase credits.",
                ),
                400,
            )
        if b.rate_limited:
            reset = (datetime.now(UTC) + timedelta(seconds=b.wait_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
            headers = {
                **self._ratelimit_headers(b),
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": reset,
                "retry-after": str(max(math.ceil(b.wait_s), 1)),
            }
            return self._json(
                anthropic_error(
                    "rate_limit_error",
                    "This request would exceed the rate limit for your organization of "
                    f"{headers['anthropic-ratelimit-requests-limit']} requests per minute. "
                    "For details, refer to: https://docs.claude.com/en/api/rate-limits.",
                ),
                429,
                headers,
            )
        if b.kind == "server_error" or (b.kind == "flaky" and self._flaky_fails(key)):
            return self._json(anthropic_error("overloaded_error", "Overloaded"), 529)
        return None

    def _models(self, b: KeyBehaviour) -> web.Response:
        models = self._models_for(b)
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": display_name(m),
                "created_at": "2025-01-01T00:00:00Z",
            }
            for m in models
        ]
        payload = {
            "data": data,
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
        return self._json(payload, 200, self._ratelimit_headers(b))

    @staticmethod
    def _input_tokens(body: Json) -> int:
        return messages_tokens(body.get("messages")) + content_words(body.get("system"))

    @staticmethod
    def _wants_tool(body: Json) -> str | None:
        """The first tool's name when tools are offered and the last user turn asks for weather."""
        tools = body.get("tools")
        if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
            return None
        users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            return None
        content = users[-1].get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if isinstance(content, str) and "weather" in content.lower():
            return str(tools[0].get("name", "tool"))
        return None

    async def _message(self, request: web.Request, body: Json, b: KeyBehaviour, prompt: int) -> web.StreamResponse:
        model = body["model"]
        n, cut = self._chunk_count(body["max_tokens"])
        choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {}
        tool = choice.get("name") if choice.get("type") == "tool" else self._wants_tool(body)
        stop_reason = "max_tokens" if cut else "tool_use" if tool else "end_turn"
        headers = self._ratelimit_headers(b, prompt)
        ident = f"msg_fake{self._next_id()}"
        if tool:
            block: Json = {
                "type": "tool_use",
                "id": "toolu_1",
                "name": tool,
                "input": {"city": "Paris"},
            }
        elif (body.get("output_config") or {}).get("format"):
            block = {"type": "text", "text": self.TOOL_INPUT}
        else:
            block = {"type": "text", "text": "Hello from fake claude"}
        thinks = (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")
        opening: list[Json] = []
        if thinks:
            opening.append({"type": "thinking", "thinking": self.THINKING, "signature": self.SIGNATURE})
            if "redact" in jsonlib.dumps(body["messages"][-1]).lower():
                opening.append({"type": "redacted_thinking", "data": self.REDACTED})
        usage: Json = {"input_tokens": prompt, "output_tokens": n}
        if thinks:
            usage = {"input_tokens": prompt, "output_tokens": n + self.THINKING_TOKENS,
                     "output_tokens_details": {"thinking_tokens": self.THINKING_TOKENS}}  # fmt: skip
        message: Json = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [*opening, block],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            return self._json(message, 200, headers)
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": prompt, "output_tokens": 1},
        }
        if tool:
            start_block: Json = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in self._split(self.TOOL_INPUT, n)]
        else:
            start_block = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": f"tok{i} "} for i in range(n)]
        events = [StreamEvent(sse_event({"type": "message_start", "message": start}))]
        for index, thought in enumerate(opening):
            if thought["type"] == "redacted_thinking":
                events.append(StreamEvent(sse_event({"type": "content_block_start", "index": index,
                                                     "content_block": thought})))  # fmt: skip
            else:
                empty = {"type": "thinking", "thinking": "", "signature": ""}
                events.append(StreamEvent(sse_event({"type": "content_block_start", "index": index,
                                                     "content_block": empty})))  # fmt: skip
                for word in self.THINKING.split(" "):
                    delta = {"type": "thinking_delta", "thinking": word + " "}
                    events.append(StreamEvent(sse_event({"type": "content_block_delta", "index": index,
                                                         "delta": delta})))  # fmt: skip
                delta = {"type": "signature_delta", "signature": self.SIGNATURE}
                events.append(StreamEvent(sse_event({"type": "content_block_delta", "index": index, "delta": delta})))
            events.append(StreamEvent(sse_event({"type": "content_block_stop", "index": index})))
        main = len(opening)
        events += [
            StreamEvent(
                sse_event(
                    {
                        "type": "content_block_start",
                        "index": main,
                        "content_block": start_block,
                    }
                )
            ),
            StreamEvent(sse_event({"type": "ping"})),
        ]
        events += [
            StreamEvent(
                sse_event({"type": "content_block_delta", "index": main, "delta": delta}),
                content=True,
            )
            for delta in deltas
        ]
        final_usage = {k: v for k, v in usage.items() if k != "input_tokens"}
        events += [
            StreamEvent(sse_event({"type": "content_block_stop", "index": main})),
            StreamEvent(
                sse_event(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                        "usage": final_usage,
                    }
                )
            ),
            StreamEvent(sse_event({"type": "message_stop"})),
        ]
        return await self._stream(request, events, headers)

    @staticmethod
    def _split(text: str, pieces: int) -> list[str]:
        """Split ``text`` into at most ``pieces`` non-empty consecutive parts."""
        if pieces <= 0:
            return []
        size = max(math.ceil(len(text) / pieces), 1)
        return [text[i : i + size] for i in range(0, len(text), size)]


# --------------------------------------------------------------------------------------------
# Broken upstreams
# --------------------------------------------------------------------------------------------


Reply = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]


class ScriptedUpstream(FakeUpstream):
    """An upstream that answers every request with ``reply(request, body)``: the broken
    behaviours real upstreams show now and then (a stream cut mid-way, malformed events, a reply
    far too large), written on the wire as they would be. Any key is accepted."""

    def __init__(self, reply: Reply | None = None) -> None:
        super().__init__({})
        self.reply: Reply = reply or self.json({})
        self.bytes_sent = 0  # body bytes written by the last `huge` reply

    def _key_of(self, headers: dict[str, str]) -> str | None:
        return headers.get("x-api-key") or _bearer(headers)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        return await self.reply(request, _parse_json(await request.read()))

    @staticmethod
    def json(payload: Any, status: int = 200) -> Reply:
        """A plain JSON reply."""

        async def reply(request: web.Request, body: Any) -> web.StreamResponse:
            return web.json_response(payload, status=status)

        return reply

    @staticmethod
    def sse_then_cut(events: list[bytes], *, cut: bool = True) -> Reply:
        """Write ``events`` (each flushed on its own), then, with ``cut``, close the connection
        before the chunked body ends: the client's read fails right after the last byte."""

        async def reply(request: web.Request, body: Any) -> web.StreamResponse:
            response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in events:
                await response.write(event)
            if not cut:
                await response.write_eof()
                return response
            assert request.transport is not None
            request.transport.close()  # FIN after the buffered bytes: nothing sent is lost on the wire
            await asyncio.sleep(1)  # the closed connection cancels this handler
            return response

        return reply

    def huge(self, size: int, *, declare_length: bool) -> Reply:
        """A JSON reply of ``size`` bytes written 1 MB at a time, with or without Content-Length."""
        block = 1024 * 1024

        async def reply(request: web.Request, body: Any) -> web.StreamResponse:
            headers = {"Content-Type": "application/json"}
            response = web.StreamResponse(status=200, headers=headers)
            if declare_length:
                response.content_length = size
            await response.prepare(request)
            self.bytes_sent = 0
            head, tail = b'{"padding":"', b'"}'
            await response.write(head)
            left = size - len(head) - len(tail)
            while left > 0:
                piece = min(block, left)
                await response.write(b"x" * piece)
                self.bytes_sent += piece
                left -= piece
            await response.write(tail)
            await response.write_eof()
            return response

        return reply
