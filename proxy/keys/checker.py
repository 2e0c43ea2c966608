"""The key checker: every key at start (concurrently, bounded), then each again about every
KEY_CHECK_INTERVAL (with jitter), and all of them on demand (`recheck`, for the admin).

A check that fails on the network (or a 5xx) says nothing about the key: it is retried sooner
than the interval, with backoff, and the key keeps its state. Checks never stampede: a key
already being checked is joined, not checked twice, and a recheck joins a full check running.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import aiohttp

from proxy.keys.pool import CheckResult, Key, KeyState, Verdict
from proxy.keys.probe import Probe
from proxy.providers.anthropic import check as anthropic_check
from proxy.providers.openai import check as openai_check

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.pipeline import Service

log = logging.getLogger("proxy.keys")

CheckFn = Callable[[Probe], Awaitable[CheckResult]]
CHECKS: dict[str, CheckFn] = {"openai": openai_check.check, "anthropic": anthropic_check.check}
NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
MIN_GAP = 1.0  # the periodic loop never wakes more often than this

Ident = tuple[str, str]  # (service, key id)


def check_of(service: Service) -> CheckFn | None:
    """The service's own key check (providers in folders bring theirs), else its dialect's."""
    return service.check or CHECKS.get(service.dialect.name)


class KeyChecker:
    def __init__(
        self,
        services: Mapping[str, Service],
        session: Callable[[], aiohttp.ClientSession],
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        retry_delay: float = 30.0,
        timeout: float = 20.0,
        jitter: float = 0.1,
    ) -> None:
        self.services = services
        self._session = session
        self.interval = settings.key_check_interval
        self.concurrency = settings.key_check_concurrency
        self.retry_delay = min(retry_delay, self.interval)
        self.timeout = timeout
        self.jitter = jitter
        self._clock, self._sleep, self._rand = clock, sleep, rand
        self._limit = asyncio.Semaphore(self.concurrency)
        self._due: dict[Ident, float] = {}
        self._failures: dict[Ident, int] = {}
        self._inflight: dict[Ident, asyncio.Task[None]] = {}
        self._round: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None

    # Public API ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Check every key now, in the background, then keep checking; returns at once."""
        if self._loop is not None:
            return
        for service in self.services.values():
            if service.pool.keys and check_of(service) is not None:
                service.pool.checking = True
        self._loop = asyncio.create_task(self._run(), name="key-checker")

    async def stop(self) -> None:
        """Cancel the loop and any check in flight."""
        tasks = [t for t in (self._loop, self._round, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = self._round = None
        self._set_checking(False)

    async def check_all(self) -> None:
        """Check every key not known to be revoked, and wait until all are done."""
        await self._check(self._keys(include_revoked=False))

    async def recheck(self) -> None:
        """Check every key again, revoked ones included; joins a full check already running."""
        if self._round is None or self._round.done():
            self._round = asyncio.create_task(self._check(self._keys(include_revoked=True)))
        await asyncio.shield(self._round)

    def next_check(self, service: str, key_id: str) -> float | None:
        """When a key is due for its next check (epoch seconds), if it was checked."""
        return self._due.get((service, key_id))

    # The loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        started = time.monotonic()
        try:
            self._round = asyncio.create_task(self._check(self._keys(include_revoked=False)))
            await asyncio.shield(self._round)
        finally:
            self._set_checking(False)
        self._log_summary(time.monotonic() - started)
        while True:
            await self._sleep(self._next_delay())
            now = self._clock()
            due = [(s, k) for s, k in self._keys(include_revoked=False) if self._due.get((s, k.id), 0.0) <= now]
            try:
                await self._check(due)
            except Exception:  # a bug must not end the periodic checks
                log.exception("periodic key check failed")

    def _next_delay(self) -> float:
        now = self._clock()
        pending = [self._due.get((s, k.id), now) for s, k in self._keys(include_revoked=False)]
        if not pending:
            return self.interval
        return min(max(min(pending) - now, MIN_GAP), self.interval)

    def _keys(self, *, include_revoked: bool) -> list[tuple[str, Key]]:
        return [
            (name, key)
            for name, service in self.services.items()
            if check_of(service) is not None
            for key in service.pool.keys
            if include_revoked or key.state is not KeyState.REVOKED
        ]

    def _log_summary(self, seconds: float) -> None:
        for name, service in self.services.items():
            snap = service.pool.snapshot()
            log.info(
                "%s keys checked in %.1fs: %d active (%d rate-limited), %d revoked, %d over quota, "
                "%d not yet known; %d trial",
                name, seconds, snap["active"], snap["rate_limited"], snap["revoked"], snap["over_quota"],
                snap["unchecked"], snap["trial"],
            )  # fmt: skip

    def _set_checking(self, value: bool) -> None:
        for service in self.services.values():
            service.pool.checking = value

    # One key -------------------------------------------------------------------------------
    async def _check(self, keys: list[tuple[str, Key]]) -> None:
        if keys:
            await asyncio.gather(*(self._join(name, key) for name, key in keys))

    async def _join(self, name: str, key: Key) -> None:
        """Check a key, or wait for the check of it already running."""
        ident = (name, key.id)
        task = self._inflight.get(ident)
        if task is None:
            task = asyncio.create_task(self._check_one(name, key))
            self._inflight[ident] = task
            task.add_done_callback(lambda _: self._inflight.pop(ident, None))
        await asyncio.shield(task)

    async def _check_one(self, name: str, key: Key) -> None:
        service = self.services[name]
        async with self._limit:
            probe = Probe(self._session(), service.base_url, key.secret, service.dialect, self.timeout)
            check = check_of(service)
            try:
                if check is None:
                    raise RuntimeError("no key check for this service")
                result = await check(probe)
            except NETWORK_ERRORS as exc:
                result = CheckResult(Verdict.RETRYABLE, detail=type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - one surprising reply must not stop the checker
                log.warning("check of key %s failed unexpectedly (%s)", key.id, type(exc).__name__)
                result = CheckResult(Verdict.RETRYABLE, detail=type(exc).__name__)
        service.pool.checked(key, result)
        self._schedule((name, key.id), result)
        log.debug("key %s checked: %s, tier %s (%s)", key.id, result.verdict.value, result.tier, result.detail)

    def _schedule(self, ident: Ident, result: CheckResult) -> None:
        if result.verdict is Verdict.RETRYABLE:
            failures = self._failures[ident] = self._failures.get(ident, 0) + 1
            delay = min(self.interval, self.retry_delay * 2 ** (failures - 1))
        else:
            self._failures.pop(ident, None)
            delay = self.interval * (1 + self.jitter * (2 * self._rand() - 1))
        self._due[ident] = self._clock() + delay
