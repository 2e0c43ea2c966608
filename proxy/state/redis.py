"""`FastState` on Redis, shared by every instance: each check-and-count is one Lua script.

Keys (all under `oaip:`): `r:<caller>` a sorted set of the requests in the rate window;
`s:<caller>` a hash of the requests holding a concurrency slot; `q:<quota>` the tokens used in
the quota period (seeded from the durable count when missing, e.g. after a Redis restart) and
`qh:<quota>` the tokens held per request; `g:<client>` wrong credentials in the guessing window
and `gl:<client>` the lockout. A request id is `<instance>|<n>`: slots and holds of an instance
whose heartbeat (`hb:<instance>`) has expired, one killed mid-request, are dropped when next seen.

A single Redis (or a primary with replicas) is expected, not Redis Cluster: the scripts read
heartbeat keys they cannot declare.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from proxy.state.fast import Background, Entry, FastStateError, Limits, RateLimited, Ticket, new_instance_id

log = logging.getLogger(__name__)

PREFIX = "oaip:"
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_MS = 10_000  # an instance silent this long is dead: its slots and holds are dropped
TIMEOUT_S = 1.0

T = TypeVar("T")

_LIVE = """
local function live(hkey, prefix, sum)
  local fields = redis.call('HGETALL', hkey)
  local total = 0
  for i = 1, #fields, 2 do
    local inst = string.match(fields[i], '^([^|]*)|')
    if inst and redis.call('EXISTS', prefix .. inst) == 1 then
      if sum then total = total + tonumber(fields[i + 1]) else total = total + 1 end
    else
      redis.call('HDEL', hkey, fields[i])
    end
  end
  return total
end
"""

# KEYS: rate, slots, quota, holds. ARGV: now_ms, rate_limit, window_ms, slot_limit, quota_limit,
# used_seed, request_id, period_ms, heartbeat prefix, defer (1: under a quota, `hold` counts the rate).
# Returns {refused (0 none, 1 rate, 2 quota, 3 slots), has_quota, left, used, held, count, reset_ms}.
_ENTER = _LIVE + """
local now = tonumber(ARGV[1])
local rate_limit, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local count, reset = 0, window
if rate_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  count = redis.call('ZCARD', KEYS[1])
  if count > 0 then
    reset = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]) + window - now
  end
  if count >= rate_limit then return {1, 0, 0, 0, 0, count, reset} end
end
local quota_limit, has_quota, left, used, held = tonumber(ARGV[5]), 0, 0, 0, 0
if quota_limit > 0 then
  has_quota = 1
  if redis.call('HSETNX', KEYS[3], 'used', ARGV[6]) == 1 then has_quota = 2 end
  used = tonumber(redis.call('HGET', KEYS[3], 'used'))
  held = live(KEYS[4], ARGV[9], true)
  left = quota_limit - used - held
  local period = tonumber(ARGV[8])
  if period > 0 then
    redis.call('PEXPIRE', KEYS[3], period)
    redis.call('PEXPIRE', KEYS[4], period)
  end
  if left <= 0 then return {2, 1, left, used, held, count, reset} end
end
local slot_limit = tonumber(ARGV[4])
if slot_limit > 0 then
  if live(KEYS[2], ARGV[9], false) >= slot_limit then return {3, has_quota, left, used, held, count, reset} end
  redis.call('HSET', KEYS[2], ARGV[7], 1)
  redis.call('PEXPIRE', KEYS[2], 86400000)
end
if rate_limit > 0 and not (has_quota > 0 and ARGV[10] == '1') then
  redis.call('ZADD', KEYS[1], now, ARGV[7])
  redis.call('PEXPIRE', KEYS[1], window)
  count = count + 1
end
return {0, has_quota, left, used, held, count, reset}
"""

# KEYS: quota, holds, rate. ARGV: amount, limit, request_id, heartbeat prefix, used_seed, now_ms,
# rate_limit (0: counted already), window_ms.
# Returns {1, count, reset_ms} when held, {0, left} when the quota has not room, {2, count, reset_ms}
# when the rate limit was reached meanwhile.
_HOLD = _LIVE + """
redis.call('HSETNX', KEYS[1], 'used', ARGV[5])
local used = tonumber(redis.call('HGET', KEYS[1], 'used'))
local left = tonumber(ARGV[2]) - used - live(KEYS[2], ARGV[4], true)
if tonumber(ARGV[1]) > left then return {0, left} end
local rate_limit, now, window = tonumber(ARGV[7]), tonumber(ARGV[6]), tonumber(ARGV[8])
local count, reset = 0, window
if rate_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
  count = redis.call('ZCARD', KEYS[3])
  if count > 0 then reset = tonumber(redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2]) + window - now end
  if count >= rate_limit then return {2, count, reset} end
  redis.call('ZADD', KEYS[3], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[3], window)
  count = count + 1
end
redis.call('HINCRBY', KEYS[2], ARGV[3], ARGV[1])
return {1, count, reset}
"""

# KEYS: slots, quota, holds. ARGV: request_id, used.
_FINISH = """
if KEYS[1] ~= '' then redis.call('HDEL', KEYS[1], ARGV[1]) end
if KEYS[2] ~= '' then
  redis.call('HDEL', KEYS[3], ARGV[1])
  if tonumber(ARGV[2]) > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HINCRBY', KEYS[2], 'used', ARGV[2])
  end
end
return 1
"""

# KEYS: failures, lock. ARGV: now_ms, limit, window_ms, lockout_ms, member. Returns 1 when a lockout starts.
_GUESS = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local started = redis.call('EXISTS', KEYS[2]) == 0
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
  if started then return 1 end
end
return 0
"""


_RAISE = """
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
if tonumber(ARGV[1]) > used then redis.call('HSET', KEYS[1], 'used', ARGV[1]) end
return 1
"""


class RedisFastState:
    """`FastState` on one Redis. Errors reaching it raise FastStateError (requests fail closed)
    and mark it unhealthy until the heartbeat gets through again."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        self.instance_id = new_instance_id()
        self.url = url
        self._clock = clock
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S, decode_responses=True
        )
        self._enter = self.redis.register_script(_ENTER)
        self._hold = self.redis.register_script(_HOLD)
        self._finish = self.redis.register_script(_FINISH)
        self._guess = self.redis.register_script(_GUESS)
        self._raise = self.redis.register_script(_RAISE)
        self._ids = itertools.count()
        self._problem: str | None = None
        self._batch: list[tuple[Any, list, list, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self._background = Background()

    # Life -----------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` in the background on the app's loop (from the loop or another thread)."""
        self._background.spawn(coro)

    async def start(self) -> None:
        """Keep beating (which also notices Redis coming back); FastStateError if it is away now."""
        self._background.bind()
        self._task = asyncio.create_task(self._heartbeat(), name="redis-heartbeat")
        await self._call(self._beat())
        for script in (self._enter, self._hold, self._finish):  # the request path's, loaded once
            await self._call(self.redis.script_load(script.script))

    async def aclose(self) -> None:
        if self._background.tasks:  # slots and holds being given back: let them land
            await asyncio.wait(list(self._background.tasks), timeout=2)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(f"{PREFIX}hb:{self.instance_id}")
        await self.redis.aclose()

    async def _beat(self) -> None:
        await self.redis.set(f"{PREFIX}hb:{self.instance_id}", "1", px=HEARTBEAT_TTL_MS)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S if self._problem is None else 0.5)
            with contextlib.suppress(FastStateError):
                await self._call(self._beat())

    def healthy(self) -> str | None:
        """None when Redis answered last time, else what went wrong."""
        return self._problem

    def now_ms(self) -> int:
        """This state's clock, in milliseconds (what its scripts are given as 'now')."""
        return int(self._clock() * 1000)

    async def call(self, call: Awaitable[T]) -> T:
        """Await a Redis call of this state's client: FastStateError (and the health noted) when
        Redis is unreachable, the health restored when it answers again."""
        return await self._call(call)

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            result = await call
        except (RedisError, OSError) as exc:
            problem = f"Redis is unavailable ({type(exc).__name__})"
            if self._problem is None:
                log.error("redis: %s: %s", problem, str(exc)[:200])
            self._problem = problem
            raise FastStateError(problem) from None
        if self._problem is not None:
            log.info("redis: reachable again")
            self._problem = None
        return result

    # The request path's scripts, a loop turn's at a time -----------------------------------------
    async def _run(self, script: Any, keys: list, args: list) -> Any:
        """Run `script` in the pipeline of this loop turn: the requests that reach Redis in one
        turn share one round trip (redis-py's CPU per call: ~70 µs alone, ~20 µs pipelined)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._batch.append((script, keys, args, future))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        self.spawn(self._send(batch))

    async def _send(self, batch: list[tuple[Any, list, list, asyncio.Future]]) -> None:
        try:
            results = await self._pipeline(batch)
            again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if again:  # the first use, or Redis restarted: load the scripts, run only those again
                for script in {id(batch[i][0]): batch[i][0] for i in again}.values():
                    await self.redis.script_load(script.script)
                for i, result in zip(again, await self._pipeline([batch[i] for i in again]), strict=True):
                    results[i] = result
        except BaseException as exc:
            # Every request of the batch is told (Redis away: a 503); none waits for ever, whatever
            # failed (an error of redis-py's own, or this task cancelled at shutdown).
            failure = exc if isinstance(exc, RedisError | OSError) else RedisError(f"pipeline failed: {exc!r}")
            for *_, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            if failure is not exc:
                log.exception("redis: the pipeline failed")
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(self, batch: list[tuple[Any, list, list, asyncio.Future]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    # FastState ------------------------------------------------------------------------------
    async def enter(self, limits: Limits, now: float | None = None) -> tuple[Entry, Ticket]:
        now_ms = int((self._clock() if now is None else now) * 1000)
        ticket = Ticket(f"{self.instance_id}|{next(self._ids)}")
        rate = limits.rate_key is not None and limits.rate_limit > 0
        slots = limits.slot_key is not None and limits.slot_limit > 0
        quota = limits.quota_key is not None and limits.quota_limit > 0
        keys = [
            f"{PREFIX}r:{limits.rate_key}" if rate else f"{PREFIX}-",
            f"{PREFIX}s:{limits.slot_key}" if slots else f"{PREFIX}-",
            f"{PREFIX}q:{limits.quota_key}" if quota else f"{PREFIX}-",
            f"{PREFIX}qh:{limits.quota_key}" if quota else f"{PREFIX}-",
        ]
        args = [
            now_ms, limits.rate_limit if rate else 0, int(limits.window_s * 1000), limits.slot_limit if slots else 0,
            limits.quota_limit if quota else 0, limits.used, ticket.request_id, int(limits.period_s * 1000),
            f"{PREFIX}hb:", 1 if limits.defer_rate else 0,
        ]  # fmt: skip
        refused, has_quota, left, used, held, count, reset_ms = await self._call(self._run(self._enter, keys, args))
        reset_s = max(math.ceil(int(reset_ms) / 1000), 1)
        entry = Entry(
            (None, "rate", "quota", "slots")[int(refused)],  # type: ignore[arg-type]
            left=int(left) if int(has_quota) else None,
            used=int(used),
            held=int(held),
            rate_count=int(count),
            rate_reset_s=reset_s,
            seeded=int(has_quota) == 2,
        )
        if entry.refused is None:
            ticket.slot_key = keys[1] if slots else None
            ticket.quota_key = limits.quota_key if quota else None
            if quota and rate and limits.defer_rate:
                ticket.rate = (keys[0], limits.rate_limit, limits.window_s)
        return entry, ticket

    async def hold(self, ticket: Ticket, amount: int, limit: int, used: int) -> int | None:
        if ticket.quota_key is None:
            return None
        rate_key, rate_limit, window_s = ticket.rate or (f"{PREFIX}-", 0, 60.0)
        keys = [f"{PREFIX}q:{ticket.quota_key}", f"{PREFIX}qh:{ticket.quota_key}", rate_key]
        now_ms = int(self._clock() * 1000)
        args = [amount, limit, ticket.request_id, f"{PREFIX}hb:", used, now_ms, rate_limit, int(window_s * 1000)]
        result = await self._call(self._run(self._hold, keys, args))
        if int(result[0]) == 1:
            ticket.held += amount
            if ticket.rate is not None:
                ticket.rate_count, ticket.rate_reset_s = int(result[1]), max(math.ceil(int(result[2]) / 1000), 1)
                ticket.rate = None
            return None
        if int(result[0]) == 2:
            raise RateLimited(int(result[1]), max(math.ceil(int(result[2]) / 1000), 1))
        return int(result[1])

    async def finish(self, ticket: Ticket, used: int = 0) -> None:
        quota = ticket.quota_key
        keys = [
            ticket.slot_key or "",
            f"{PREFIX}q:{quota}" if quota else "",
            f"{PREFIX}qh:{quota}" if quota else "",
        ]
        ticket.slot_key = ticket.quota_key = None
        ticket.held = 0
        if any(keys):
            await self._call(self._run(self._finish, keys, [ticket.request_id, max(int(used), 0)]))

    async def raise_used(self, quota_key: str, used: int) -> None:
        """Raise a quota's used count to at least `used` (the durable count), never lower it."""
        await self._call(self._raise(keys=[f"{PREFIX}q:{quota_key}"], args=[int(used)]))

    async def failed_guess(self, client: str, limit: int, window_s: float, lockout_s: float) -> bool:
        now_ms = int(self._clock() * 1000)
        member = f"{self.instance_id}|{next(self._ids)}"
        keys = [f"{PREFIX}g:{client}", f"{PREFIX}gl:{client}"]
        args = [now_ms, limit, int(window_s * 1000), int(lockout_s * 1000), member]
        return int(await self._call(self._guess(keys=keys, args=args))) == 1

    async def locked_out(self, client: str) -> int | None:
        ttl = await self._call(self.redis.pttl(f"{PREFIX}gl:{client}"))
        return max(math.ceil(int(ttl) / 1000), 1) if int(ttl) > 0 else None

    # Beyond limits: changes other instances must see ----------------------------------------
    async def publish(self, channel: str, message: str) -> None:
        await self._call(self.redis.publish(f"{PREFIX}{channel}", message))

    async def listen(self, channel: str, handle: Callable[[str], Any]) -> None:
        """Call `handle(message)` for each message on `channel` until cancelled; reconnects."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(f"{PREFIX}{channel}")
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        try:
                            handle(message["data"])
                        except Exception:
                            log.exception("redis: handling a message on %s failed", channel)
            except (RedisError, OSError):
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
