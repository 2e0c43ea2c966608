"""Quota bookkeeping for requests in progress, and the reply allowance that keeps a quota exact.

A request holds `prompt + reply allowance` tokens of its user's quota while it runs; the reply
allowance is written into the request (`max_tokens` and kin) whenever the client asked for more
than is left, or asked for nothing and the model could write more than is left. So the upstream
can never charge more than was held, and the held amounts never add up to more than the quota.

The state lives behind `Holds` and `InFlight`, small classes with plain methods, so that a shared
backend (Redis, for several instances) can take their place.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from proxy.errors import Kind, ProxyError

# The most a model writes when the request sets no limit (its documented maximum output), for the
# families where a client may leave it unset. Unknown models: 4,096, which every chat model takes.
FAMILY_MAX_OUTPUT = {
    "gpt-3.5-turbo": 4096,
    "gpt-4": 8192,
    "gpt-4-32k": 8192,
    "gpt-4-turbo": 4096,
    "gpt-4o": 16_384,
    "gpt-4o-mini": 16_384,
    "gpt-4.1": 32_768,
    "gpt-4.1-mini": 32_768,
    "gpt-4.5": 16_384,
    "gpt-5": 128_000,
    "gpt-5-mini": 128_000,
    "o-series": 100_000,
    "gpt-oss": 131_072,
    "legacy-completions": 16,  # the completions API's own default max_tokens
    "gemini-pro": 65_536,
    "gemini-flash": 65_536,
    "gemini-flash-lite": 65_536,
    "gemini": 8192,
}
DEFAULT_MAX_OUTPUT = 4096


class Holds:
    """Tokens held per (owner, family) by requests in progress. Not thread-safe by itself: the
    gatekeeper checks and holds under one lock."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], int] = {}

    def held(self, owner: str, family: str) -> int:
        return self._held.get((owner, family), 0)

    def hold(self, owner: str, family: str, amount: int) -> None:
        key = (owner, family)
        self._held[key] = self._held.get(key, 0) + amount

    def give_back(self, owner: str, family: str, amount: int) -> None:
        key = (owner, family)
        left = self._held.get(key, 0) - amount
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)


class InFlight:
    """Requests in progress per caller (a user token, or an address without users). Thread-safe."""

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()
        self._lock = threading.Lock()

    def enter(self, key: str, limit: int) -> bool:
        """Count one more request for `key` unless `limit` (0: none) are already in progress."""
        with self._lock:
            if limit and self._count[key] >= limit:
                return False
            self._count[key] += 1
            return True

    def leave(self, key: str) -> None:
        with self._lock:
            self._count[key] -= 1
            if self._count[key] <= 0:
                del self._count[key]

    def count(self, key: str) -> int:
        return self._count.get(key, 0)


@dataclass(frozen=True, slots=True)
class OutputAsk:
    """What a request asks to write: `wanted` tokens per choice (None: unset), for `n` choices;
    `ceiling` is the most the model writes when unset. `replies` is False for embeddings."""

    wanted: int | None
    n: int = 1
    ceiling: int = DEFAULT_MAX_OUTPUT
    replies: bool = True


NO_REPLY = OutputAsk(wanted=0, n=1, ceiling=0, replies=False)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def output_ask(kind: str, family: str, payload: dict, *, translated_default: int) -> OutputAsk:
    """What `payload` (in the client's format, before any translation) asks the model to write."""
    if kind in ("embeddings", "count_tokens"):
        return NO_REPLY
    if kind == "generate":  # Gemini's native request
        config = payload.get("generationConfig")
        config = config if isinstance(config, dict) else {}
        return OutputAsk(
            wanted=_count(config.get("maxOutputTokens")) or None,
            n=max(1, _count(config.get("candidateCount"))),
            ceiling=FAMILY_MAX_OUTPUT.get(family, DEFAULT_MAX_OUTPUT),
        )
    if kind == "responses":
        return OutputAsk(
            wanted=_count(payload.get("max_output_tokens")) or None,
            ceiling=FAMILY_MAX_OUTPUT.get(family, DEFAULT_MAX_OUTPUT),
        )
    if kind == "messages":
        return OutputAsk(wanted=_count(payload.get("max_tokens")) or None, ceiling=translated_default)
    wanted = _count(payload.get("max_completion_tokens")) or _count(payload.get("max_tokens")) or None
    n = max(1, _count(payload.get("n")))
    if family.startswith("claude") or family == "anthropic-other":  # the OpenAI-format door to Claude
        return OutputAsk(wanted=wanted, n=n, ceiling=translated_default)
    return OutputAsk(wanted=wanted, n=n, ceiling=FAMILY_MAX_OUTPUT.get(family, DEFAULT_MAX_OUTPUT))


def reply_allowance(ask: OutputAsk, room: int) -> tuple[int, int | None]:
    """(tokens to hold for the reply, the per-choice cap to write into the request or None), given
    `room` tokens left after the prompt. ValueError when not even one token per choice fits."""
    if not ask.replies:
        if room < 0:
            raise ValueError
        return 0, None
    per_choice = room // ask.n
    if per_choice < 1:
        raise ValueError
    if ask.wanted is not None:
        if ask.wanted <= per_choice:
            return ask.wanted * ask.n, None
        return per_choice * ask.n, per_choice
    if ask.ceiling <= per_choice:
        return ask.ceiling * ask.n, None  # the model cannot write more than is held
    return per_choice * ask.n, per_choice


# Models that refuse `max_tokens` and take only `max_completion_tokens`.
REASONING_FAMILIES = frozenset({"o-series", "gpt-5", "gpt-5-mini"})


def apply_cap(kind: str, payload: dict, cap: int | None, family: str = "") -> None:
    """Write a per-choice reply cap into `payload` (the client's format, before translation),
    in the field the client used; when it used none, the one the model takes."""
    if cap is None:
        return
    if kind == "responses":
        payload["max_output_tokens"] = cap
        return
    if kind == "generate":
        config = payload.get("generationConfig")
        if not isinstance(config, dict):
            config = payload["generationConfig"] = {}
        config["maxOutputTokens"] = cap
        return
    if kind == "messages":
        payload["max_tokens"] = cap
        thinking = payload.get("thinking")
        if isinstance(thinking, dict) and _count(thinking.get("budget_tokens")) >= cap:
            thinking["budget_tokens"] = max(cap - 1, 1)  # must stay below max_tokens
        return
    if "max_completion_tokens" in payload or (kind == "chat" and family in REASONING_FAMILIES):
        payload["max_completion_tokens"] = cap
        payload.pop("max_tokens", None)
    else:
        payload["max_tokens"] = cap


def quota_refusal(family: str, *, limit: int, used: int, held: int, prompt: int, refills_at: str | None) -> ProxyError:
    """Why a request does not fit in what is left: 402 with `x-should-retry: false` when the quota
    is spent or the prompt alone is too big (retrying cannot help before the refill); 429 with
    Retry-After when it would fit but the user's own requests in progress hold the rest."""
    refills = f"It refills at {refills_at}." if refills_at else "It does not refill; ask the administrator."
    if held and used + prompt < limit:
        return ProxyError(
            429,
            f"The rest of your {family} quota is held by your requests in progress ({used} of {limit} tokens "
            f"used, {held} held). Try again when they finish.",
            Kind.RATE_LIMIT,
            headers={"Retry-After": "2"},
            code="quota_held",
        )
    if used >= limit:
        message = f"Your token quota for {family} is spent: {used} of {limit} tokens used. {refills}"
    else:
        message = (
            f"This request does not fit in your token quota for {family}: its prompt is about {prompt} "
            f"tokens and {limit - used} of {limit} are left. Send a shorter conversation, or wait. {refills}"
        )
    return ProxyError(402, message, Kind.QUOTA, headers={"x-should-retry": "false"}, code="quota_exceeded")
