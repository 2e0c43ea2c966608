"""Shared fast state: request-rate windows, concurrency slots, quota holds and usage in the
current period, and the guessing lockout. One interface, two backends: `MemoryFastState` (one
process, the default) and `RedisFastState` (proxy/state/redis.py: every instance shares it).

Every operation that checks and then counts is one atomic step, so two instances racing for the
last of a quota or a rate limit cannot both win. A request's slot and holds are named after the
instance that took them, so those of an instance killed mid-request are dropped once its
heartbeat stops, instead of being held forever.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Refusal = Literal["rate", "quota", "slots"]


class Background:
    """Coroutines run in the background on the app's loop, started from the loop or from another
    thread (the users service and key pools call in from threads); each kept until it ends."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        """Remember the running loop, for calls from other threads."""
        self.loop = asyncio.get_running_loop()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        loop = asyncio._get_running_loop()  # noqa: SLF001 (None off the loop, where get_ raises)
        if loop is not None:
            task = loop.create_task(coro)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.spawn, coro)
        else:
            coro.close()


class FastStateError(Exception):
    """The shared state cannot be reached: requests fail closed (503) until it returns."""


class RateLimited(Exception):
    """`hold` found the rate limit reached meanwhile (the rate of a request under a quota is
    counted only once its hold succeeds: a request refused for quota uses up no rate)."""

    def __init__(self, count: int, reset_s: int) -> None:
        super().__init__(count, reset_s)
        self.count, self.reset_s = count, reset_s


@dataclass(frozen=True, slots=True)
class Entry:
    """What `enter` decided. `left`: tokens left of the quota (limit - used - held) when a quota
    applies, else None. `rate_*` describe the rate window after this request (for headers)."""

    refused: Refusal | None
    left: int | None = None
    used: int = 0
    held: int = 0
    rate_count: int = 0
    rate_reset_s: int = 0
    seeded: bool = False  # the shared count was missing and started from `Limits.used`


@dataclass(slots=True)
class Ticket:
    """One request's claims in the shared state, handed back to `finish` exactly once."""

    request_id: str
    slot_key: str | None = None
    quota_key: str | None = None
    held: int = 0
    rate: tuple[str, int, float] | None = None  # a rate hit deferred to `hold`: (key, limit, window)
    rate_count: int = 0  # the rate window after the deferred hit
    rate_reset_s: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request is checked against. A key of None (or a limit of 0) skips that check."""

    rate_key: str | None = None
    rate_limit: int = 0
    window_s: float = 60.0
    slot_key: str | None = None
    slot_limit: int = 0
    quota_key: str | None = None
    quota_limit: int = 0
    used: int = 0  # tokens used in the period as this process knows it (shared state: the seed)
    period_s: float = 0.0  # how long the quota key lives (0: for ever)
    defer_rate: bool = False  # under a quota, count the rate only when `hold` succeeds


class FastState(Protocol):
    instance_id: str

    async def enter(self, limits: Limits, now: float | None = None) -> tuple[Entry, Ticket]: ...
    async def hold(self, ticket: Ticket, amount: int, limit: int, used: int) -> int | None: ...
    async def finish(self, ticket: Ticket, used: int = 0) -> None: ...
    async def failed_guess(self, client: str, limit: int, window_s: float, lockout_s: float) -> bool: ...
    async def locked_out(self, client: str) -> int | None: ...
    def healthy(self) -> str | None: ...


def new_instance_id() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


@dataclass
class _Window:
    hits: deque[float] = field(default_factory=deque)


class MemoryFastState:
    """`FastState` for one process: plain dictionaries under one lock. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.instance_id = new_instance_id()
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, deque[float]] = {}
        self._slots: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}
        self._ids = itertools.count()
        self._next_sweep = 0.0

    def healthy(self) -> str | None:
        return None

    async def enter(self, limits: Limits, now: float | None = None) -> tuple[Entry, Ticket]:
        now = self._clock() if now is None else now
        ticket = Ticket(f"{self.instance_id}|{next(self._ids)}")
        with self._lock:
            self._sweep(now)
            count, reset = 0, 0
            hits = None
            if limits.rate_key is not None and limits.rate_limit:
                hits = self._trim(self._windows, limits.rate_key, now - limits.window_s)
                count = len(hits)
                reset = math.ceil(hits[0] + limits.window_s - now) if hits else math.ceil(limits.window_s)
                if count >= limits.rate_limit:
                    return Entry("rate", rate_count=count, rate_reset_s=max(reset, 1)), ticket
            left = used = held = None
            if limits.quota_key is not None and limits.quota_limit:
                used = limits.used
                held = self._held.get(limits.quota_key, 0)
                left = limits.quota_limit - used - held
                if left <= 0:
                    return Entry("quota", left=left, used=used, held=held, rate_count=count), ticket
            if limits.slot_key is not None and limits.slot_limit:
                if self._slots.get(limits.slot_key, 0) >= limits.slot_limit:
                    return Entry("slots", left=left, rate_count=count), ticket
                self._slots[limits.slot_key] = self._slots.get(limits.slot_key, 0) + 1
                ticket.slot_key = limits.slot_key
            if hits is not None and limits.defer_rate and left is not None:
                ticket.rate = (limits.rate_key, limits.rate_limit, limits.window_s)  # type: ignore[assignment]
            elif hits is not None:
                if not hits:
                    reset = math.ceil(limits.window_s)
                hits.append(now)
                self._windows[limits.rate_key] = hits  # type: ignore[index]
                count += 1
            ticket.quota_key = limits.quota_key if left is not None else None
        entry = Entry(None, left=left, used=used or 0, held=held or 0, rate_count=count, rate_reset_s=max(reset, 1))
        return entry, ticket

    async def hold(self, ticket: Ticket, amount: int, limit: int, used: int) -> int | None:
        """Hold `amount` of the quota for this request if it fits; else the tokens left. In one
        process, `used` (the users' own count) is the truth; shared, it only seeds."""
        key = ticket.quota_key
        if key is None:
            return None
        with self._lock:
            left = limit - used - self._held.get(key, 0)
            if amount > left:
                return left
            if ticket.rate is not None:
                rate_key, rate_limit, window_s = ticket.rate
                now = self._clock()
                hits = self._trim(self._windows, rate_key, now - window_s)
                reset = max(math.ceil(hits[0] + window_s - now), 1) if hits else max(math.ceil(window_s), 1)
                if len(hits) >= rate_limit:
                    raise RateLimited(len(hits), reset)
                hits.append(now)
                self._windows[rate_key] = hits
                ticket.rate, ticket.rate_count, ticket.rate_reset_s = None, len(hits), reset
            self._held[key] = self._held.get(key, 0) + amount
            ticket.held += amount
        return None

    async def finish(self, ticket: Ticket, used: int = 0) -> None:
        """Give back the slot and what was held; count `used` tokens against the shared quota
        (in one process the users' own count does, so `used` is not kept here)."""
        with self._lock:
            if ticket.slot_key is not None:
                left = self._slots.get(ticket.slot_key, 0) - 1
                if left > 0:
                    self._slots[ticket.slot_key] = left
                else:
                    self._slots.pop(ticket.slot_key, None)
                ticket.slot_key = None
            key = ticket.quota_key
            if key is not None:
                held = self._held.get(key, 0) - ticket.held
                if held > 0:
                    self._held[key] = held
                else:
                    self._held.pop(key, None)
                ticket.quota_key, ticket.held = None, 0

    async def failed_guess(self, client: str, limit: int, window_s: float, lockout_s: float) -> bool:
        now = self._clock()
        with self._lock:
            failures = self._trim(self._failures, client, now - window_s)
            failures.append(now)
            self._failures[client] = failures
            if len(failures) >= limit:
                started = self._locked_until.get(client, 0.0) <= now
                self._locked_until[client] = now + lockout_s
                return started
        return False

    async def locked_out(self, client: str) -> int | None:
        until = self._locked_until.get(client)
        if until is None:
            return None
        remaining = until - self._clock()
        return max(math.ceil(remaining), 1) if remaining > 0 else None

    @staticmethod
    def _trim(table: dict[str, deque[float]], key: str, horizon: float) -> deque[float]:
        hits = table.get(key)
        if hits is None:
            return deque()
        while hits and hits[0] <= horizon:
            hits.popleft()
        return hits

    def _sweep(self, now: float) -> None:
        """Forget quiet windows and ended lockouts, once a minute: memory stays bounded."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 60.0
        for table in (self._windows, self._failures):
            for key in [k for k, hits in table.items() if not hits or hits[-1] <= now - 3600]:
                del table[key]
        self._locked_until = {c: t for c, t in self._locked_until.items() if t > now}
