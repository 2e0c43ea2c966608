"""Anthropic message and error replies -> OpenAI ``chat.completion`` and error shapes."""

from __future__ import annotations

import json
from typing import Any

from proxy.providers.anthropic.translate.reasoning import JSON_TOOL

__all__ = [
    "anthropic_error_to_openai",
    "anthropic_to_openai_response",
    "completion_id",
    "finish_reason",
    "openai_usage",
]

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error type -> (OpenAI error type, OpenAI error code). Types follow the
# proxy's own OpenAI error shapes (proxy/errors.py) so clients see one vocabulary.
_ERROR_TYPES: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("permission_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "api_error": ("upstream_error", "api_error"),
    "overloaded_error": ("service_unavailable", "overloaded"),
    "timeout_error": ("timeout_error", "timeout"),
}
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def completion_id(message_id: str | None) -> str:
    """The OpenAI completion id for an Anthropic message id."""
    return "chatcmpl-" + (message_id or "unknown")


def finish_reason(stop_reason: str | None) -> str | None:
    """Anthropic ``stop_reason`` -> OpenAI ``finish_reason`` (unknown reasons read as "stop")."""
    if stop_reason is None:
        return None
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def openai_usage(usage: dict | None) -> dict[str, Any]:
    """Anthropic usage -> OpenAI usage.

    Anthropic counts cached prompt tokens apart from ``input_tokens``; OpenAI's
    ``prompt_tokens`` includes them, with cache reads repeated in ``prompt_tokens_details``.
    """
    usage = usage if isinstance(usage, dict) else {}
    cache_read = _count(usage.get("cache_read_input_tokens"))
    prompt = _count(usage.get("input_tokens")) + _count(
        usage.get("cache_creation_input_tokens")
    )
    prompt += cache_read
    completion = _count(usage.get("output_tokens"))
    result: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cache_read:
        result["prompt_tokens_details"] = {"cached_tokens": cache_read}
    details = usage.get("output_tokens_details")
    thinking = details.get("thinking_tokens") if isinstance(details, dict) else None
    if isinstance(thinking, int) and thinking > 0:
        result["completion_tokens_details"] = {"reasoning_tokens": thinking}
    return result


def _count(value: Any) -> int:
    """A token count from the upstream; anything that is not a non-negative integer reads as 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def anthropic_to_openai_response(body: dict, *, created: int) -> dict:
    """Anthropic message -> OpenAI chat.completion.

    Text blocks are concatenated; tool_use blocks become ``tool_calls`` with JSON-string
    arguments, except the response_format tool, whose input is the content. Thinking comes back
    as ``reasoning_content`` (what OpenAI-format clients read) and, with signatures and redacted
    thinking, as ``thinking_blocks`` to send back in a later turn. Server-tool blocks are omitted.
    """
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []
    content = body.get("content")
    blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    for block in blocks:
        if block.get("type") == "text":
            texts.append(block["text"] if isinstance(block.get("text"), str) else "")
        elif block.get("type") == "tool_use" and block.get("name") == JSON_TOOL:
            texts.append(json.dumps(block.get("input") or {}, ensure_ascii=False))
        elif block.get("type") == "tool_use":
            tool_calls.append(_tool_call(block))
        elif block.get("type") in ("thinking", "redacted_thinking"):
            thinking.append(block)
    text = "".join(texts)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    if thinking:
        reasoning = "".join(
            b["thinking"] for b in thinking if b.get("type") == "thinking" and isinstance(b.get("thinking"), str)
        )
        message["reasoning_content"] = reasoning
        message["thinking_blocks"] = thinking
    stop_reason = body.get("stop_reason")
    json_answer = any(b.get("type") == "tool_use" and b.get("name") == JSON_TOOL for b in blocks)
    if stop_reason == "tool_use" and json_answer and not tool_calls:
        stop_reason = "end_turn"  # only the response_format tool: an answer, not a call
    return {
        "id": completion_id(body.get("id") if isinstance(body.get("id"), str) else None),
        "object": "chat.completion",
        "created": created,
        "model": body.get("model") if isinstance(body.get("model"), str) else "",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(stop_reason) or "stop",
            }
        ],
        "usage": openai_usage(body.get("usage")),
    }


def _tool_call(block: dict) -> dict[str, Any]:
    return {
        "id": str(block.get("id") or ""),
        "type": "function",
        "function": {
            "name": str(block.get("name") or ""),
            "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
        },
    }


def anthropic_error_to_openai(status: int, body: dict | None) -> dict:
    """Anthropic error body -> OpenAI error body.

    ``{'type': 'error', 'error': {'type', 'message'}}`` becomes
    ``{'error': {'message', 'type', 'param': None, 'code'}}``. ``code`` carries the
    OpenAI-style code clients switch on (``invalid_api_key``, ``rate_limit_exceeded``,
    ``insufficient_quota`` ...); unknown Anthropic types are passed through as both.
    """
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {}
    anthropic_type = error.get("type")
    if not isinstance(anthropic_type, str) or not anthropic_type:
        anthropic_type = _STATUS_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"Upstream Anthropic API returned HTTP {status} ({anthropic_type})."
    openai_type, code = _ERROR_TYPES.get(
        anthropic_type, (anthropic_type, anthropic_type)
    )
    return {
        "error": {"message": message, "type": openai_type, "param": None, "code": code}
    }
