"""Error shapes per client dialect, and redaction of anything secret."""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum


class Kind(StrEnum):
    """What went wrong, independent of the API shape it is reported in."""

    INVALID_REQUEST = "invalid_request"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    RATE_LIMIT = "rate_limit"
    QUOTA = "quota"
    UPSTREAM = "upstream"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"


class ProxyError(Exception):
    """An error answered by the proxy itself, rendered in the client's API shape."""

    def __init__(
        self, status: int, message: str, kind: Kind, *, headers: dict[str, str] | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}
        self.code = code


_OPENAI_TYPES = {
    Kind.INVALID_REQUEST: "invalid_request_error",
    Kind.AUTHENTICATION: "invalid_request_error",
    Kind.PERMISSION: "permission_error",
    Kind.NOT_FOUND: "invalid_request_error",
    Kind.TOO_LARGE: "invalid_request_error",
    Kind.RATE_LIMIT: "rate_limit_error",
    Kind.QUOTA: "insufficient_quota",
    Kind.UPSTREAM: "upstream_error",
    Kind.TIMEOUT: "timeout_error",
    Kind.UNAVAILABLE: "service_unavailable",
}
_OPENAI_CODES = {
    Kind.AUTHENTICATION: "invalid_api_key",
    Kind.NOT_FOUND: "unknown_url",
    Kind.TOO_LARGE: "request_too_large",
    Kind.RATE_LIMIT: "rate_limit_exceeded",
    Kind.QUOTA: "insufficient_quota",
}
_ANTHROPIC_TYPES = {
    Kind.INVALID_REQUEST: "invalid_request_error",
    Kind.AUTHENTICATION: "authentication_error",
    Kind.PERMISSION: "permission_error",
    Kind.NOT_FOUND: "not_found_error",
    Kind.TOO_LARGE: "request_too_large",
    Kind.RATE_LIMIT: "rate_limit_error",
    Kind.QUOTA: "rate_limit_error",
    Kind.UPSTREAM: "api_error",
    Kind.TIMEOUT: "api_error",
    Kind.UNAVAILABLE: "overloaded_error",
}


def openai_error(message: str, kind: Kind, code: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES[kind],
            "param": None,
            "code": code or _OPENAI_CODES.get(kind),
        }
    }


def anthropic_error(message: str, kind: Kind, code: str | None = None) -> dict:
    """Anthropic's error body: {"type": "error", "error": {"type", "message"}}."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES[kind], "message": message}}


SHAPES = {"openai": openai_error, "anthropic": anthropic_error}

# Tokens that look like provider secrets, whether or not they are configured here.
_SECRET_PATTERN = re.compile(
    r"(?:sk-ant-[A-Za-z0-9_\-]{8,}|sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{16,}|(?<![A-Za-z0-9])AIza[0-9A-Za-z_\-]{30,})"
)


class Redactor:
    """Replaces every configured secret, and anything shaped like a provider key, with a marker."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets.update(s for s in secrets if s and len(s) >= 4)
        if self._secrets:
            alternatives = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in alternatives))

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub("[redacted]", text)
        return _SECRET_PATTERN.sub("[redacted]", text)

    def scrub(self, value: object) -> object:
        """Redact every string inside a JSON-like value."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub(v) for v in value]
        return value
