"""The allow-list: which client paths exist, matched on the raw path so no encoding slips through."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.errors import Kind, ProxyError
from proxy.providers.base import Dialect, Endpoint

# A path segment naming a model (Gemini's `models/{model}:generateContent`): a plain id, no more.
MODEL_SEGMENT = r"(?P<model>[A-Za-z0-9][A-Za-z0-9._-]{0,127})"
_NO_PARAMS: Mapping[str, str] = {}


@dataclass
class Match:
    service: str
    endpoint: Endpoint
    arg: str | None = None  # the path segment an endpoint's "*" stood for (a model id)
    params: Mapping[str, str] = field(default_factory=dict)  # values from the path: {"model": ...}


def _pattern(segment: str) -> re.Pattern[str] | None:
    """A compiled matcher for a segment holding `{model}`, else None (a literal segment)."""
    if "{model}" not in segment:
        return None
    before, _, after = segment.partition("{model}")
    return re.compile(re.escape(before) + MODEL_SEGMENT + re.escape(after) + r"\Z")


@dataclass
class Router:
    """Maps (method, raw path) to an allow-listed endpoint of a configured dialect."""

    dialects: dict[str, Dialect]
    _table: dict[tuple[str, str, tuple[str, ...]], Endpoint] = field(default_factory=dict)
    # Endpoints with a `{model}` segment, per (service, method, length): few, tried in order.
    _patterns: dict[tuple[str, str, int], list[tuple[tuple, Endpoint]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, dialect in self.dialects.items():
            for endpoint in dialect.endpoints:
                matchers = tuple(_pattern(segment) or segment for segment in endpoint.path)
                if all(isinstance(m, str) for m in matchers):
                    self._table[(name, endpoint.method, endpoint.path)] = endpoint
                else:
                    slot = (name, endpoint.method, len(matchers))
                    self._patterns.setdefault(slot, []).append((matchers, endpoint))

    def match(self, method: str, raw_path: bytes) -> Match:
        """Return the endpoint, or raise a 404 ProxyError for anything not on the list.

        Percent-encoded bytes, dot segments and case variants never match: the path must be
        spelled exactly as listed. Repeated slashes and a missing `/v1` are tolerated.
        """
        segments = self._segments(raw_path)
        service = segments[1] if len(segments) > 1 else ""
        rest = segments[2:]
        if rest[:2] == ["v1", "v1"] and service in DOUBLED_V1_ACCEPTED:
            rest = rest[1:]  # a base URL pasted with /v1 into an SDK that adds its own
        if rest and rest[0] == "v1":
            rest = rest[1:]
        endpoint = self._table.get((service, method.upper(), tuple(rest)))
        if endpoint is not None:
            return Match(service, endpoint, rest[-1] if "*" in endpoint.path else None)
        if rest:
            endpoint = self._table.get((service, method.upper(), (*rest[:-1], "*")))
            if endpoint is not None:
                return Match(service, endpoint, rest[-1])
        for matchers, endpoint in self._patterns.get((service, method.upper(), len(rest)), ()):
            params: dict[str, str] = {}
            for matcher, segment in zip(matchers, rest, strict=True):
                if isinstance(matcher, str):
                    if matcher != segment:
                        break
                else:
                    found = matcher.match(segment)
                    if found is None:
                        break
                    params.update(found.groupdict())
            else:
                return Match(service, endpoint, params=params)
        raise not_found(method, raw_path)

    def shape_for(self, raw_path: bytes) -> str:
        """The error shape a client at this path expects, even when the path itself is refused."""
        segments = [s for s in raw_path.decode("ascii", errors="replace").split("/") if s]
        dialect = self.dialects.get(segments[1]) if segments[:1] == ["proxy"] and len(segments) > 1 else None
        if dialect is not None:
            rest = segments[2:]
            return dialect.error_shape(tuple(rest[1:] if rest[:1] == ["v1"] else rest))
        if segments[:2] == ["proxy", "anthropic"] and "chat" not in segments:
            return "anthropic"
        return "openai"

    @staticmethod
    def _segments(raw_path: bytes) -> list[str]:
        if b"%" in raw_path or b"\\" in raw_path:
            return []
        try:
            text = raw_path.decode("ascii")
        except UnicodeDecodeError:
            return []
        segments = [s for s in text.split("/") if s]
        if not segments or segments[0] != "proxy" or any(s in (".", "..") for s in segments):
            return []
        return segments


# Services whose SDKs add `/v1` to the base URL themselves (the anthropic SDK, litellm's
# `anthropic/`): `…/proxy/anthropic/v1` pasted there gives `/v1/v1/messages`, accepted as meant.
DOUBLED_V1_ACCEPTED = frozenset({"anthropic"})


def not_found(method: str, raw_path: bytes) -> ProxyError:
    shown = raw_path.decode("ascii", errors="replace")[:200]
    message = (
        f"{method.upper()} {shown} is not available through this proxy. "
        "Allowed: model lists and chat/text completions, responses, embeddings and messages."
    )
    segments = [s for s in shown.split("/") if s]
    if segments[2:4] == ["v1", "v1"]:
        message += f" The base URL holds /v1 twice: use /proxy/{segments[1]}/v1 as the base URL"
        message += (
            " (or /proxy/anthropic with the Anthropic SDK, which adds /v1 itself)."
            if segments[1] == "anthropic"
            else " (without another /v1)."
        )
    return ProxyError(404, message, Kind.NOT_FOUND)
