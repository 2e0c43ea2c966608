"""What one instance changes and the others must see at once, over Redis pub/sub: key states (a
key found revoked or rate-limited is skipped by every instance) and users (created, changed or
deleted through any instance's admin API). The database stays the record; a message only says
what to re-read, or carries a key's state (which holds no secret)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine, Mapping
from typing import Any

from proxy import jsonx
from proxy.access.users import UserService
from proxy.keys.pool import Key, KeyPool
from proxy.state.fast import Background
from proxy.state.postgres import PostgresStore
from proxy.state.redis import PREFIX, RedisFastState
from proxy.usage import UsageEvent, UsageLedger

log = logging.getLogger(__name__)

KEYS_CHANNEL = "keys"
USERS_CHANNEL = "users"
ALL_USERS = "*"  # a users message naming no one token: every user changed (a quota refresh)
RECENT_SIZE = 500  # the recent requests kept for the page, from every instance
RECENT_FLUSH_S = 0.5  # recent events are pushed to Redis in batches, this often at most (the page shows them)
TOTALS_REFRESH_S = 5.0  # how often the usage totals /status shows are re-read from the database


class StateSync:
    """Publishes this instance's changes and applies the others'. Also `SharedUsers` for the
    UserService: writes that keep other instances' charges, and atomic charges."""

    def __init__(self, fast: RedisFastState, store: PostgresStore, pools: Mapping[str, KeyPool]) -> None:
        self.fast = fast
        self.store = store
        self.pools = dict(pools)
        self.users: UserService | None = None
        self._background = Background()

    # Life -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._background.bind()
        self._spawn(self.fast.listen(KEYS_CHANNEL, self._on_key))
        self._spawn(self.fast.listen(USERS_CHANNEL, self._on_user))
        if self.ledger is not None:
            self._spawn(self._refresh_totals())

    # Usage: the page's recent requests and totals, of every instance --------------------------
    ledger: UsageLedger | None = None

    def attach_ledger(self, ledger: UsageLedger) -> None:
        import redis

        self.ledger = ledger
        self._recent_out = []
        self._recent_client = redis.Redis.from_url(
            self.fast.url, socket_timeout=0.5, socket_connect_timeout=0.5, decode_responses=True
        )
        sink = ledger.sink

        def record(event: UsageEvent) -> None:
            if sink is not None:
                sink(event)
            self._recent_out.append(event)  # encoded when pushed, a batch at a time
            if len(self._recent_out) == 1:  # the first of a batch: one push for all that follow soon
                self._spawn(self._push_recent())

        ledger.sink = record
        ledger.recent_source = self.recent

    _recent_out: list[UsageEvent]

    async def _push_recent(self) -> None:
        """Push the recent events gathered meanwhile, in one round trip (not one per request)."""
        await asyncio.sleep(RECENT_FLUSH_S)
        events, self._recent_out = self._recent_out[-RECENT_SIZE:], []
        if not events:
            return
        items = [jsonx.dumps(event.public()) for event in events]
        with contextlib.suppress(Exception):
            await self.fast.redis.pipeline(transaction=True).lpush(f"{PREFIX}recent", *items).ltrim(
                f"{PREFIX}recent", 0, RECENT_SIZE - 1
            ).execute()

    def recent(self, limit: int) -> list[dict]:
        """The newest requests of every instance, first (a blocking read: the page calls it from a thread)."""
        if limit <= 0:
            return []
        rows = self._recent_client.lrange(f"{PREFIX}recent", 0, min(limit, RECENT_SIZE) - 1)
        return [json.loads(row) for row in rows]

    async def _refresh_totals(self) -> None:
        """Re-read the usage totals every few seconds, so that /status counts every instance's."""
        assert self.ledger is not None
        while True:
            await asyncio.sleep(TOTALS_REFRESH_S)
            try:
                totals = await asyncio.to_thread(self.store.usage_totals)
            except Exception:
                continue
            self.ledger.restore(*totals)

    async def aclose(self) -> None:
        client = getattr(self, "_recent_client", None)
        if client is not None:
            client.close()
        for task in list(self._background.tasks):
            task.cancel()
        for task in list(self._background.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` on the app's loop, from the loop or from another thread."""
        self._background.spawn(coro)

    async def _publish(self, channel: str, message: dict) -> None:
        message["i"] = self.fast.instance_id
        with contextlib.suppress(Exception):  # Redis down: /health says so; the store keeps the truth
            await self.fast.publish(channel, json.dumps(message, separators=(",", ":")))

    # Keys -----------------------------------------------------------------------------------
    def key_changed(self, pool: KeyPool, key: Key) -> None:
        """After a pool's own on_change (which saves the state): tell the other instances."""
        state = pool.export_state(key)
        self._spawn(self._publish(KEYS_CHANNEL, {"s": pool.service, "k": key.id, "st": state}))

    def _on_key(self, raw: str) -> None:
        message = json.loads(raw)
        if message.get("i") == self.fast.instance_id:
            return
        pool = self.pools.get(message.get("s"))
        if pool is not None and isinstance(message.get("st"), dict):
            pool.restore({str(message.get("k")): message["st"]})

    # Users (SharedUsers) ----------------------------------------------------------------------
    def fetch(self, token: str) -> dict | None:
        return self.store.load_user(token)

    def save(self, record: dict, *, counters: bool) -> None:
        self.store.save_user(record, counters=counters)
        self.changed(record["token"], counters=counters)

    def durable_used(self, token: str, family: str, period_start: float | None) -> int | None:
        """Tokens `token` used of `family` in the period starting at `period_start`, as committed."""
        record = self.store.load_user(token)
        if record is None:
            return None
        if period_start is not None and float(record.get("counts_since") or 0) < period_start:
            return 0  # the record's counts are of an earlier period
        return int((record.get("token_counts") or {}).get(family, 0))

    def charge(self, token: str, family: str, tokens: int, *, since: float, now: float) -> None:
        self.store.charge_user(token, family, tokens, since=since, now=now)

    def refresh_quotas(self, defaults: Mapping[str, int], token: str | None = None) -> None:
        """Quota refresh on the shared counts (blocking: the refresher runs it in a thread): the
        database sets the limits from every instance's charges; then every instance re-reads."""
        self.store.refresh_limits(defaults, token)
        records = [self.store.load_user(token)] if token is not None else self.store.load_users()
        if self.users is not None:
            for record in records:
                if record is not None:
                    self.users.absorb(record, record["token"])
        self._spawn(self._publish(USERS_CHANNEL, {"t": token if token is not None else ALL_USERS}))

    def changed(self, token: str, *, counters: bool) -> None:
        if counters:  # the administrator set the counts: shared quota state starts again from them
            self._spawn(self._forget_quotas(token))
        self._spawn(self._publish_user(token))

    def deleted(self, token: str) -> None:
        self._spawn(self._publish_user(token))

    async def _publish_user(self, token: str) -> None:
        """Tell the others once the change is durable, so that what they re-read has it."""
        with contextlib.suppress(Exception):
            await self.store.committed()
        await self._publish(USERS_CHANNEL, {"t": token})

    async def _forget_quotas(self, token: str) -> None:
        with contextlib.suppress(Exception):
            await self.store.committed()  # the new counts are durable before Redis is re-seeded
            redis = self.fast.redis
            async for name in redis.scan_iter(match=f"{PREFIX}q:{quota_owner(token)}:*", count=500):
                await redis.delete(name)

    def _on_user(self, raw: str) -> None:
        message = json.loads(raw)
        if message.get("i") == self.fast.instance_id or self.users is None:
            return
        token = str(message.get("t"))
        self._spawn(self._reload_all() if token == ALL_USERS else self._reload(token))

    async def _reload_all(self) -> None:
        assert self.users is not None
        try:
            records = await asyncio.to_thread(self.store.load_users)
        except Exception:
            log.exception("sync: could not reload the users another instance changed")
            return
        for record in records:
            self.users.absorb(record, record["token"])

    async def _reload(self, token: str) -> None:
        assert self.users is not None
        try:
            record = await asyncio.to_thread(self.store.load_user, token)
        except Exception:
            log.exception("sync: could not reload a user changed by another instance")
            return
        self.users.absorb(record, token)


def quota_owner(token: str) -> str:
    """How a user is named in shared quota keys: a hash, so Redis never holds a usable token."""
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()[:24]
