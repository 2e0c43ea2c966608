"""Spend caps per service: MAX_OUTPUT_TOKENS_<SERVICE> clamps the reply length a request asks
for; MAX_CONTEXT_TOKENS_<SERVICE> refuses a request whose prompt plus requested output is
larger. 0 means no cap. Both run before any upstream call and cost one count of the prompt."""

from __future__ import annotations

from collections.abc import Callable

from proxy.errors import Kind, ProxyError

OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Where a reply's length goes when the client gave none: Anthropic and legacy completions take
# max_tokens; OpenAI chat models take max_completion_tokens (max_tokens is refused by o-series).
_DEFAULT_FIELD = {
    "messages": "max_tokens",
    "completions": "max_tokens",
    "chat": "max_completion_tokens",
    "responses": "max_output_tokens",
}
GENERATION_KINDS = frozenset({*_DEFAULT_FIELD, "generate"})

PromptCounter = Callable[[dict, str, str], int]  # (payload, service, model) -> prompt tokens


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def clamp_output(payload: dict, kind: str, cap: int) -> int | None:
    """Lower every output-length field above `cap` to it (adding one when none is set); returns
    the output the request may now use, or None when nothing applies (no cap, or embeddings)."""
    if not cap:
        return None
    if kind == "generate":  # Gemini: generationConfig.maxOutputTokens
        config = payload.get("generationConfig")
        if not isinstance(config, dict):
            config = payload["generationConfig"] = {}
        asked_gemini = _int(config.get("maxOutputTokens"))
        if asked_gemini is None or asked_gemini > cap:
            config["maxOutputTokens"] = cap
        return min(cap, asked_gemini or cap)
    if kind not in _DEFAULT_FIELD:
        return None
    asked = [_int(payload.get(name)) for name in OUTPUT_FIELDS if name in payload]
    if not any(asked):
        payload[_DEFAULT_FIELD[kind]] = cap
        return cap
    for name in OUTPUT_FIELDS:
        value = _int(payload.get(name))
        if value is not None and value > cap:
            payload[name] = cap
    return min(cap, *(a for a in asked if a))


def requested_output(payload: dict) -> int:
    config = payload.get("generationConfig")
    gemini = _int(config.get("maxOutputTokens")) if isinstance(config, dict) else None
    return max((_int(payload.get(name)) or 0 for name in OUTPUT_FIELDS), default=gemini or 0)


def check_context(prompt: int, output: int, cap: int, service: str, *, exact: bool = True) -> None:
    """400 when prompt + output exceeds `cap` (0: no cap), naming both numbers. `exact` is False
    when counting stopped early: the prompt is then more than `prompt - 1` tokens."""
    if cap and prompt + output > cap:
        more = "" if exact else "more than "
        prompt_text = f"{more}{prompt if exact else prompt - 1}"
        raise ProxyError(
            400,
            f"This request needs {more}{prompt + output - (0 if exact else 1)} tokens "
            f"({prompt_text} of prompt + {output} of output), "
            f"more than this proxy's context limit of {cap} tokens for {service}. "
            "Shorten the conversation or lower max_tokens.",
            Kind.INVALID_REQUEST,
            code="context_length_exceeded",
        )
