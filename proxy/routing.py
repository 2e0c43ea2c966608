"""The allow-list: which client paths exist, matched on the raw path so no encoding slips through."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.errors import Kind, ProxyError
from proxy.providers.base import Dialect, Endpoint


@dataclass
class Match:
    service: str
    endpoint: Endpoint


@dataclass
class Router:
    """Maps (method, raw path) to an allow-listed endpoint of a configured dialect."""

    dialects: dict[str, Dialect]
    _table: dict[tuple[str, str, tuple[str, ...]], Endpoint] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, dialect in self.dialects.items():
            for endpoint in dialect.endpoints:
                self._table[(name, endpoint.method, endpoint.path)] = endpoint

    def match(self, method: str, raw_path: bytes) -> Match:
        """Return the endpoint, or raise a 404 ProxyError for anything not on the list.

        Percent-encoded bytes, dot segments and case variants never match: the path must be
        spelled exactly as listed. Repeated slashes and a missing `/v1` are tolerated.
        """
        segments = self._segments(raw_path)
        service = segments[1] if len(segments) > 1 else ""
        rest = segments[2:]
        if rest and rest[0] == "v1":
            rest = rest[1:]
        endpoint = self._table.get((service, method.upper(), tuple(rest)))
        if endpoint is None:
            raise not_found(method, raw_path)
        return Match(service, endpoint)

    def shape_for(self, raw_path: bytes) -> str:
        """The error shape a client at this path expects, even when the path itself is refused."""
        segments = [s for s in raw_path.decode("ascii", errors="replace").split("/") if s]
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


def not_found(method: str, raw_path: bytes) -> ProxyError:
    shown = raw_path.decode("ascii", errors="replace")[:200]
    return ProxyError(
        404,
        f"{method.upper()} {shown} is not available through this proxy. "
        "Allowed: model lists and chat/text completions, embeddings and messages.",
        Kind.NOT_FOUND,
    )
