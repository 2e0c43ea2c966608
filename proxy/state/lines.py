"""The queue's wait estimates across instances: each instance's requests wait in its own line
(proxy/access/queue.py), but all lines are served by the same keys. Once a second every instance
writes its lines (how many wait, how fast they are served) to Redis and reads the others', so
that the position and wait a client is told, and what /status and the page show, count every
instance's waiting requests.

Keys: `oaip:lines` a sorted set of instances by when they last wrote, and `oaip:lines:<instance>`
their lines as JSON, expiring after a few seconds (an instance that stops is forgotten)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from proxy.access.queue import RequestQueue
from proxy.state.fast import FastStateError
from proxy.state.redis import PREFIX, RedisFastState

log = logging.getLogger(__name__)

EVERY_S = 1.0
TTL_MS = 5_000

# KEYS: the index, this instance's key. ARGV: now_ms, ttl_ms, instance id, lines JSON ('' : none),
# key prefix. Returns the other live instances' lines JSON.
_EXCHANGE = """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[1], ARGV[3])
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ttl)
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
local out = {}
for _, inst in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if inst ~= ARGV[3] then
    local lines = redis.call('GET', ARGV[5] .. inst)
    if lines then table.insert(out, lines) end
  end
end
return out
"""


class SharedLines:
    def __init__(self, fast: RedisFastState, queue: RequestQueue) -> None:
        self.fast = fast
        self.queue = queue
        self._exchange = fast.redis.register_script(_EXCHANGE)

    async def exchange(self) -> None:
        """Write this instance's lines (or remove them when it has none) and take the others'
        into `queue.peers`: one round trip."""
        mine = self.queue.lines()
        payload = json.dumps([[s, f, w, round(r, 4)] for (s, f), (w, r) in mine.items()]) if mine else ""
        instance = self.fast.instance_id
        now_ms = self.fast.now_ms()
        keys = [f"{PREFIX}lines", f"{PREFIX}lines:{instance}"]
        args = [now_ms, TTL_MS, instance, payload, f"{PREFIX}lines:"]
        self.queue.peers = merge(await self.fast.call(self._exchange(keys=keys, args=args)))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(EVERY_S)
            try:
                await self.exchange()
            except FastStateError:
                self.queue.peers = {}  # the estimates fall back to this instance's own line
            except Exception:
                log.exception("queue lines: the exchange failed")


def merge(others: list[str]) -> dict[tuple[str, str], tuple[int, float]]:
    """The other instances' lines, summed per (service, family)."""
    out: dict[tuple[str, str], tuple[int, float]] = {}
    for raw in others:
        with contextlib.suppress(ValueError, TypeError):
            for service, family, waiting, rate in json.loads(raw):
                before = out.get((str(service), str(family)), (0, 0.0))
                out[(str(service), str(family))] = (before[0] + int(waiting), before[1] + float(rate))
    return out
