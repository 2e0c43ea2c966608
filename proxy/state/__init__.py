"""Where the proxy's state lives: the durable `Store` (SQLite or Postgres) and the fast state
(limits, reservations, lockouts: in this process, or on Redis), chosen by settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.config import Settings
from proxy.state.fast import FastState, FastStateError, MemoryFastState
from proxy.state.health import Dependencies
from proxy.store import SQLiteStore, Store, StoreError

if TYPE_CHECKING:
    from proxy.access.gatekeeper import Gatekeeper
    from proxy.access.queue import RequestQueue
    from proxy.access.ratelimit import FailureGuard
    from proxy.access.users import UserService
    from proxy.keys.pool import KeyPool
    from proxy.state.gate import SharedGuesses
    from proxy.state.lines import SharedLines
    from proxy.state.sync import StateSync

__all__ = ["FastState", "Shared", "Store", "StoreError", "open_store", "share"]

log = logging.getLogger(__name__)


def open_store(settings: Settings) -> Store:
    """The store DATABASE_URL names (SQLite in DATA_DIR by default). Raises StoreError with the reason."""
    if settings.database_kind == "postgres":
        from proxy.state.postgres import PostgresStore

        return PostgresStore(settings.database_url, shared=settings.shared_state)
    path = settings.sqlite_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return SQLiteStore(path)


@dataclass
class Shared:
    """The fast state, and (with Redis and Postgres) what keeps the instances in step."""

    fast: FastState
    sync: StateSync | None = None
    page_secret: str | None = None  # the page's proof for its own calls, the same on every instance
    guesses: SharedGuesses | None = None
    guards: list[SharedGuesses] = field(default_factory=list)  # the admin key's, the info password's
    lines: SharedLines | None = None  # the queue's lines of every instance, for wait estimates
    _tasks: list[asyncio.Task] = field(default_factory=list, repr=False)

    def guard(self, scope: str, limit: int, window_s: float, lockout_s: float) -> FailureGuard:
        """A guessing lockout for `scope` ("admin", "info"): shared by every instance with Redis
        (wrong guesses counted together, a lockout announced to all), else this process's own."""
        from proxy.access.ratelimit import FailureGuard
        from proxy.state.redis import RedisFastState

        if not isinstance(self.fast, RedisFastState):
            return FailureGuard(limit=limit, window_s=window_s, lockout_s=lockout_s)
        from proxy.state.gate import SharedGuesses

        guard = SharedGuesses(self.fast, self.fast.spawn, limit, window_s, lockout_s, scope=f"{scope}:")
        self.guards.append(guard)
        return guard

    async def start(self) -> None:
        start = getattr(self.fast, "start", None)
        if start is not None:
            try:
                await start()
            except FastStateError as exc:  # serve 503s (see /health) until Redis is back
                log.error("shared state: %s; requests are refused until it is back", exc)
        if self.sync is not None:
            await self.sync.start()
        for guesses in [self.guesses, *self.guards]:
            if guesses is not None:
                self._tasks.append(asyncio.create_task(guesses.listen(), name="shared-lockouts"))
        if self.lines is not None:
            self._tasks.append(asyncio.create_task(self.lines.run(), name="shared-queue-lines"))

    def share_queue(self, queue: RequestQueue) -> None:
        """With Redis, the queue's wait estimates count every instance's waiting requests."""
        from proxy.state.redis import RedisFastState

        if isinstance(self.fast, RedisFastState):
            from proxy.state.lines import SharedLines

            self.lines = SharedLines(self.fast, queue)

    async def aclose(self) -> None:
        for task in self._tasks:  # the loops that run for the whole life (listeners, exchanges)
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.sync is not None:
            await self.sync.aclose()
        close = getattr(self.fast, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def _then(first: Callable[[Any], None] | None, then: Callable[[Any], None]) -> Callable[[Any], None]:
    def both(value: Any) -> None:
        if first is not None:
            first(value)
        then(value)

    return both


def _shared_secret(url: str, name: str) -> str | None:
    """A random secret every instance agrees on (the first to start picks it), or None when Redis
    cannot be reached now (each instance then keeps its own)."""
    import secrets

    import redis

    from proxy.state.redis import PREFIX

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
    try:
        client.set(f"{PREFIX}{name}", secrets.token_urlsafe(32), nx=True)
        return client.get(f"{PREFIX}{name}")
    except (redis.RedisError, OSError) as exc:
        log.warning("shared state: no shared %s (%s); the page's calls must reach this instance", name, exc)
        return None
    finally:
        client.close()


def share(
    settings: Settings,
    store: Store,
    users: UserService,
    pools: Mapping[str, KeyPool],
    dependencies: Dependencies,
    gatekeeper: Gatekeeper | None = None,
) -> Shared:
    """Build the fast state the settings ask for and hook the gate, users and key pools to it."""
    if not settings.redis_url:
        return Shared(MemoryFastState())
    from proxy.state.gate import SharedGate, SharedGuesses
    from proxy.state.redis import RedisFastState

    fast = RedisFastState(settings.redis_url)
    dependencies.add("redis", fast.healthy)
    shared = Shared(fast, page_secret=_shared_secret(settings.redis_url, "page-secret"))
    if gatekeeper is not None:
        gatekeeper.shared = gate = SharedGate(fast, fast.spawn)
        local = gatekeeper._guesses
        guesses = SharedGuesses(fast, fast.spawn, local.limit, local.window_s, local.lockout_s, gatekeeper._clock)
        gatekeeper._guesses = shared.guesses = guesses
    from proxy.state.postgres import PostgresStore

    if isinstance(store, PostgresStore):
        from proxy.state.sync import StateSync

        sync = StateSync(fast, store, pools)
        for pool in pools.values():  # after what the pool already does on a change (save, wake the queue)
            pool.on_change = _then(pool.on_change, lambda key, pool=pool: sync.key_changed(pool, key))
        users.shared = sync
        sync.users = users
        shared.sync = sync
        if gatekeeper is not None:
            gate.durable_used = sync.durable_used
    return shared
