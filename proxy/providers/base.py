"""What a provider dialect is, and helpers every dialect shares."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

from proxy.keys.pool import Outcome
from proxy.sse import Event
from proxy.usage import Usage


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One allow-listed route: the client's path (after /proxy/<service>/[v1/]) and its upstream path."""

    method: str
    path: tuple[str, ...]
    upstream_path: str | None  # None: answered by the proxy itself (model lists)
    kind: str  # "chat" | "completions" | "embeddings" | "messages" | "models" | "model" | "responses" | "count_tokens"
    shape: str  # the client's API shape for errors: "openai" | "anthropic"
    translated: bool = False  # OpenAI format in and out, translated to this provider's API


@dataclass(slots=True)
class Call:
    """One upstream call, as the pipeline (or a key check) asks for it, before the dialect addresses
    and authenticates it. `path` is relative to the service's root and may hold a query."""

    method: str
    path: str
    secret: str = field(repr=False)
    base_url: str
    body: bytes | None = None
    client_headers: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None


@dataclass(slots=True)
class Outbound:
    """The request that goes on the wire: where, with which headers, carrying which bytes. `url` may
    be a `yarl.URL` built with `encoded=True` when the path must go out exactly as signed (SigV4)."""

    url: Any
    headers: dict[str, str] = field(repr=False)
    body: bytes | None = None


class StreamMeter:
    """Watches a stream's events: reads usage, and decides which events reach the client."""

    def __init__(self) -> None:
        self.usage = Usage()
        self.seen_usage = False
        self.text_chars = 0
        self.finished = False

    def accept(self, event: Event) -> bool:
        """Account for one event; return False to keep it from the client."""
        return True


class Dialect:
    """A provider's differences from the common path. Subclasses fill these in."""

    name: ClassVar[str]
    key_prefix: ClassVar[str]
    endpoints: ClassVar[tuple[Endpoint, ...]]
    forward_headers: ClassVar[frozenset[str]] = frozenset({"accept"})
    response_headers: ClassVar[frozenset[str]] = frozenset({"x-request-id", "request-id"})
    models_path: ClassVar[str] = "/models"  # the upstream's model list, asked once before key checks end
    route_prefix: ClassVar[str] = ""  # a segment before /v1 in the client's base URL (/proxy/aws/claude/v1)

    def auth_headers(self, secret: str) -> dict[str, str]:
        raise NotImplementedError

    # Addressing: what to call (once per request), then where and signed how (once per key tried).
    def upstream_path(self, endpoint: Endpoint, model: str | None, stream: bool, params: Mapping[str, str]) -> str:
        """The upstream path (and query) for one request, relative to the service's root. Gemini puts
        the model and the stream mode in it; most providers use the endpoint's fixed path."""
        return endpoint.upstream_path or self.models_path

    async def target(self, call: Call) -> Outbound:
        """The wire request for one call with one key. The one place a provider addresses and
        authenticates: per-key hosts (Azure), a signature over the body (Bedrock), a minted and
        cached token (Vertex) all override this. Key checks go through it too."""
        return Outbound(call.base_url + call.path, self.outbound_headers(call.client_headers, call.secret), call.body)

    # Response framing: a streamed reply the provider frames its own way, turned into SSE bytes.
    def streams(self, content_type: str) -> bool:
        """Whether a successful reply with this content type is a stream to relay event by event."""
        return "text/event-stream" in content_type

    def stream_decoder(self) -> Callable[[bytes], bytes] | None:
        """A fresh, stateful decoder of one streamed reply's bytes into SSE bytes (Bedrock's binary
        event-stream frames), or None when the upstream streams SSE itself. It sees bytes as they
        arrive and returns the SSE bytes complete so far; it raises `upstream.StreamAbort` on bytes
        it cannot read. Meters, redaction and renderers then work on SSE as for every provider."""
        return None

    def client_credential(self, headers: Mapping[str, str], query: bytes) -> str | None:
        """A client credential sent the provider's own way, besides `Authorization: Bearer` and
        `x-api-key` (which every route accepts): e.g. Gemini's `x-goog-api-key` and `?key=`."""
        return None

    def error_shape(self, rest: tuple[str, ...]) -> str:
        """The error shape for a client path under this service (after /proxy/<service>/[v1/]),
        even one off the allow-list: that of the endpoint it names, else the dialect's own."""
        for endpoint in self.endpoints:
            if endpoint.path == rest:
                return endpoint.shape
        if "chat" in rest or not self.endpoints:
            return "openai"
        return self.endpoints[0].shape

    def client_error(self, shape: str, status: int, body: Any) -> Any:
        """An upstream error body as the client at an endpoint of `shape` reads it (unchanged by default)."""
        return body

    def model_ids(self, body: Any) -> set[str]:
        """The model ids in the upstream's model list (OpenAI's and Anthropic's `data[].id`)."""
        items = body.get("data") if isinstance(body, dict) else None
        return {str(m["id"]) for m in items or () if isinstance(m, dict) and m.get("id")}

    def outbound_headers(self, client_headers: Mapping[str, str], secret: str) -> dict[str, str]:
        """Only allow-listed client headers, plus the pool key and our own content type."""
        headers = {name: client_headers[name] for name in self.forward_headers if name in client_headers}
        headers["content-type"] = "application/json"
        headers["user-agent"] = "oai-reverse-proxy"
        headers.update(self.auth_headers(secret))
        return headers

    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        """What an error reply says about the key that got it."""
        raise NotImplementedError

    def usage_of(self, body: Any) -> Usage | None:
        """Token usage of a non-streamed reply, if the upstream gave it."""
        raise NotImplementedError

    def prepare(self, endpoint: Endpoint, payload: dict) -> dict:
        """Adjust a request before forwarding (e.g. ask for stream usage). Returns state for the meter."""
        return {}

    def revise(self, endpoint: Endpoint, payload: dict, status: int, body: Any) -> bool:
        """After a client-error reply: whether `payload` was fixed (in place) for one more try."""
        return False

    def meter(self, endpoint: Endpoint, state: dict) -> StreamMeter:
        raise NotImplementedError

    def stream_error(self, message: str) -> bytes:
        """The last event of a stream that failed midway, in this dialect's stream format."""
        raise NotImplementedError

    def model_list(self, models: Iterable[str]) -> dict:
        raise NotImplementedError


def token_count(value: Any) -> int:
    """A token count from an upstream's usage; anything but a non-negative number reads as 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and 0 <= value < 1e15:
        return int(value)
    return 0


def error_message(body: Any) -> str:
    """The human message inside an OpenAI- or Anthropic-shaped error body, or ''."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or "")
        if isinstance(err, str):
            return err
        return str(body.get("message") or "")
    return ""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """'20s', '1m30s', '250ms', '6m0s', '1h2m' or plain seconds -> seconds."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    total = 0.0
    matched = False
    for number, unit in _DURATION.findall(text):
        matched = True
        value = float(number)
        total += {"ms": value / 1000, "s": value, "m": value * 60, "h": value * 3600}[unit]
    return total if matched else None


def retry_after(headers: Mapping[str, str], now: float, *names: str) -> float | None:
    """Seconds to wait, from retry-after(-ms) or the given reset headers (durations or dates)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    for name in ("retry-after", *names):
        value = headers.get(name)
        if not value:
            continue
        seconds = parse_duration(value)
        if seconds is not None:
            return seconds
        try:
            when = parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            try:
                from datetime import datetime

                when = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
        return max(0.0, when - now)
    return None


def int_header(headers: Mapping[str, str], name: str) -> int | None:
    try:
        return int(headers[name])
    except (KeyError, ValueError):
        return None
