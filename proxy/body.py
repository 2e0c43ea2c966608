"""The client's request body: size limit, JSON object, and fields that must never travel on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from proxy import jsonx
from proxy.errors import Kind, ProxyError

# Body fields that could point a request elsewhere, dropped at the top level, the only place an
# upstream (or a library in front of one) reads them. Deeper down they are the conversation's own
# data (a tool call's arguments, a tool's input) and travel exactly as sent.
REDIRECT_FIELDS = frozenset({"api_base", "base_url", "api_key", "user_config", "extra_headers", "extra_query"})


async def read_json(
    request: Request, max_bytes: int, precheck: Callable[[bytes], None] | None = None
) -> tuple[dict, int]:
    """The body as a JSON object (with redirecting fields dropped) and its size in bytes.

    `precheck` sees the raw bytes before they are parsed, and may refuse them."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ProxyError(400, "The request body was not received completely.", Kind.INVALID_REQUEST) from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise ProxyError(400, "The request body is empty; send a JSON object.", Kind.INVALID_REQUEST)
    if precheck is not None:
        precheck(raw)
    payload = parse(raw)
    if not isinstance(payload, dict):
        raise ProxyError(400, "The request body must be a JSON object.", Kind.INVALID_REQUEST)
    drop_redirect_fields(payload)
    return payload, len(raw)


def parse(raw: bytes) -> Any:
    """A client's JSON, or a 400 saying what is wrong with it.

    orjson refuses a lone surrogate escape ("\\ud800"), which no UTF-8 text can hold and no
    upstream accepts; the stdlib, tried for what orjson refuses but is valid (NaN, huge integers),
    would let one through, so a body the stdlib parses is checked to encode as UTF-8."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        payload = jsonx.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProxyError(400, f"The request body is not valid JSON: {exc}.", Kind.INVALID_REQUEST) from None
    except RecursionError:
        raise ProxyError(400, "The request body is nested too deeply.", Kind.INVALID_REQUEST) from None
    try:
        jsonx.dumps(payload, strict=True)
    except UnicodeEncodeError:
        raise ProxyError(
            400,
            "The request body holds a lone surrogate escape (such as \\ud800), which is not a character; "
            "send valid Unicode text.",
            Kind.INVALID_REQUEST,
        ) from None
    except (TypeError, ValueError, RecursionError):
        raise ProxyError(400, "The request body is nested too deeply.", Kind.INVALID_REQUEST) from None
    return payload


def positive_int(value: Any) -> int:
    """A non-negative int from a client field, or 0 when it is not one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        413, f"The request body is larger than this proxy accepts ({limit} bytes).", Kind.TOO_LARGE
    )


def drop_redirect_fields(payload: dict) -> None:
    """Remove the top-level fields that could redirect a request (api_base, base_url, ...)."""
    for name in REDIRECT_FIELDS.intersection(payload):
        del payload[name]
