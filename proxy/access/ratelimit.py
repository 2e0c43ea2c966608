"""Request-rate limits: a sliding one-minute window per caller, and a lockout for key guessers."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Whether one more request fits, and what the rate-limit headers should say."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the oldest counted request leaves the window

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.reset_s)
        return headers


class SlidingWindow:
    """At most `limit` hits per `window_s` seconds for each key; exact, not bucketed.

    `check` only looks; `hit` counts. Keeping them apart lets a caller count a request only
    once every other check on it has passed."""

    def __init__(self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._next_sweep = 0.0

    def check(self, key: str) -> RateDecision:
        now = self._clock()
        hits = self._trimmed(key, now)
        count = len(hits) if hits else 0
        reset = math.ceil(hits[0] + self.window_s - now) if hits else math.ceil(self.window_s)
        return RateDecision(
            allowed=count < self.limit,
            limit=self.limit,
            remaining=max(self.limit - count, 0),
            reset_s=max(reset, 1),
        )

    def hit(self, key: str) -> None:
        now = self._clock()
        self._hits.setdefault(key, deque()).append(now)
        if now >= self._next_sweep:
            self._sweep(now)

    def forget(self, key: str) -> None:
        self._hits.pop(key, None)

    def _trimmed(self, key: str, now: float) -> deque[float] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        horizon = now - self.window_s
        while hits and hits[0] <= horizon:
            hits.popleft()
        return hits

    def _sweep(self, now: float) -> None:
        """Forget keys with no recent hits, so a stream of one-off IPs cannot grow memory."""
        for key in [k for k, hits in self._hits.items() if not hits or hits[-1] <= now - self.window_s]:
            del self._hits[key]
        self._next_sweep = now + self.window_s


class FailureGuard:
    """Locks out a client after `limit` failures within `window_s`, for `lockout_s` seconds.

    While locked out, the client is refused even with the right credential, so guessing a key
    costs `lockout_s` per `limit` guesses."""

    def __init__(
        self,
        limit: int = 10,
        window_s: float = 300.0,
        lockout_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.lockout_s = lockout_s
        self._clock = clock
        self._failures = SlidingWindow(limit, window_s, clock)
        self._locked_until: dict[str, float] = {}

    def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None when it is not locked out."""
        until = self._locked_until.get(client)
        if until is None:
            return None
        remaining = until - self._clock()
        if remaining <= 0:
            del self._locked_until[client]
            return None
        return max(math.ceil(remaining), 1)

    def failed(self, client: str) -> None:
        now = self._clock()
        self._failures.hit(client)
        if not self._failures.check(client).allowed:
            self._locked_until[client] = now + self.lockout_s
        if len(self._locked_until) > 1000:  # forget lockouts that have ended
            self._locked_until = {c: t for c, t in self._locked_until.items() if t > now}

    def succeeded(self, client: str) -> None:
        self._failures.forget(client)
