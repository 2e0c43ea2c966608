"""Reading Google's error bodies, and rendering them in OpenAI's shape (pure)."""

from __future__ import annotations

from typing import Any

_OPENAI_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",
    "OUT_OF_RANGE": "invalid_request_error",
    "NOT_FOUND": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error",
    "PERMISSION_DENIED": "permission_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
    "UNAVAILABLE": "server_error",
    "INTERNAL": "server_error",
    "DEADLINE_EXCEEDED": "timeout_error",
}


def unwrap(body: Any) -> dict:
    """The `error` object of a Google error body: `{"error": {...}}`, or a list of such (what the
    OpenAI-compatible endpoint sends); {} when there is none."""
    if isinstance(body, list) and body:
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def error_info(error: dict) -> tuple[str, dict[str, str]]:
    """(the ErrorInfo reason, the first quota violation's {"id", "limit"}) in an error's details."""
    reason = ""
    quota: dict[str, str] = {}
    for detail in error.get("details") or ():
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.ErrorInfo") and not reason:
            reason = str(detail.get("reason") or "")
        elif kind.endswith("google.rpc.QuotaFailure") and not quota:
            for violation in detail.get("violations") or ():
                if isinstance(violation, dict):
                    quota = {"id": str(violation.get("quotaId") or ""), "limit": str(violation.get("quotaValue") or "")}
                    break
    return reason, quota


def google_error_to_openai(status: int, body: Any) -> Any:
    """A Google error as OpenAI's `{"error": {"message", "type", "param", "code"}}`; an OpenAI-shaped
    body (or anything else) unchanged."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "type" in body["error"]:
        return body
    error = unwrap(body)
    if not error:
        return body
    google_status = str(error.get("status") or "")
    reason, _ = error_info(error)
    return {
        "error": {
            "message": str(error.get("message") or f"The upstream answered {status}."),
            "type": _OPENAI_TYPES.get(google_status, "upstream_error"),
            "param": None,
            "code": reason.lower() or google_status.lower() or None,
        }
    }
