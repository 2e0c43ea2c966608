"""Request-rate limits: a sliding one-minute window per caller, and a lockout for key guessers."""

from __future__ import annotations

import math
import socket
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
        hits = self._hits.get(key)
        if hits is None:
            # Only the latest `limit` hits ever decide anything: older ones need no memory.
            hits = self._hits[key] = deque(maxlen=self.limit if self.limit > 0 else None)
        hits.append(now)
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

    A lockout refuses only wrong credentials (the callers check the credential first): a valid
    one from a shared address still works. Every call is O(1) (amortized): ended lockouts and
    quiet counters are swept once per window, not on each call."""

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
        self._next_sweep = 0.0

    def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None when it is not locked out."""
        until = self._locked_until.get(client)
        if until is None:
            return None
        remaining = until - self._clock()
        if remaining <= 0:
            if self._locked_until.get(client) == until:
                self._locked_until.pop(client, None)
            return None
        return max(math.ceil(remaining), 1)

    def failed(self, client: str) -> bool:
        """Count one failure; True when it starts a lockout."""
        now = self._clock()
        self._failures.hit(client)
        started = False
        if not self._failures.check(client).allowed:
            started = self._locked_until.get(client, 0.0) <= now
            self._locked_until[client] = now + self.lockout_s
        if now >= self._next_sweep:  # forget lockouts that have ended
            self._locked_until = {c: t for c, t in self._locked_until.items() if t > now}
            self._next_sweep = now + min(self.window_s, self.lockout_s)
        return started

    def succeeded(self, client: str) -> None:
        """Forget `client`'s failures. Only for a credential no one else holds (the admin key):
        where many credentials are valid, a success must not launder another guess."""
        self._failures.forget(client)


class Tarpit:
    """How long to hold a refusal to `client`: `delay_s`, for at most `held` refusals per client
    within any `delay_s` window; beyond that, 0 (answer at once rather than pile up connections)."""

    def __init__(self, delay_s: float, held: int, clock: Callable[[], float] = time.time) -> None:
        self.delay_s = delay_s
        self._window = SlidingWindow(held, delay_s, clock) if delay_s > 0 and held > 0 else None

    def delay(self, client: str) -> float:
        if self._window is None or not self._window.check(client).allowed:
            return 0.0
        self._window.hit(client)
        return self.delay_s


def network_of(ip: str) -> str:
    """The unit a per-address limit should count: an IPv4 address, or an IPv6 address's /64
    (one host commonly holds a whole /64, so counting single addresses would not hold it back).
    On every request's path, so done with inet_pton (the ipaddress module is 30 times slower)."""
    if ":" not in ip:
        return ip
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    except (OSError, ValueError):
        return ip
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


_V4_MAPPED = bytes(10) + b"\xff\xff"
