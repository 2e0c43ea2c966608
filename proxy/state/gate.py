"""The gatekeeper's limits when several instances share them: the same checks, in the same order
and with the same answers as `Gatekeeper.enter`/`hold` in one process, made by the shared fast
state in atomic steps (proxy/state/redis.py), so that two instances racing for the last of a
quota, a rate limit or a concurrency slot cannot both win.

`Gatekeeper.admit_request` hands over to `SharedGate.admit_request` when `gatekeeper.shared` is
set; `settle` and `release` give the request's claims back through `finish`. The guessing lockout
is shared by `SharedGuesses`: failures are counted in Redis, and a lockout started by any
instance is announced to all, whose (synchronous) check stays a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from proxy.access.ratelimit import FailureGuard, RateDecision, network_of
from proxy.errors import DEPENDENCY_DOWN, Kind, ProxyError
from proxy.state.fast import FastStateError, Limits, RateLimited, Ticket
from proxy.state.redis import RedisFastState

if TYPE_CHECKING:
    from proxy.access.gatekeeper import Admission, Caller, Gatekeeper

log = logging.getLogger("proxy.access")

LOCKOUTS_CHANNEL = "lockouts"
HOLD_TRIES = 4  # others' holds may shrink what is left between the look and the hold


def owner(credential: str) -> str:
    """How a caller is named in shared keys: a hash, so Redis never holds a usable token."""
    return hashlib.sha256(credential.encode()).hexdigest()[:24]


def unavailable() -> ProxyError:
    return ProxyError(
        503, "This proxy cannot check limits right now (its shared state is unavailable); try again shortly.",
        Kind.UNAVAILABLE, headers={"Retry-After": "5"}, code=DEPENDENCY_DOWN,
    )  # fmt: skip


class SharedGate:
    def __init__(
        self,
        fast: RedisFastState,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        durable_used: Callable[[str, str, float | None], int | None] | None = None,
    ) -> None:
        self.fast = fast
        self._spawn = spawn
        # A user's tokens used in the period as the database has them (blocking: run in a thread).
        self.durable_used = durable_used

    async def _reseed(self, token: str, family: str, quota_key: str, start: float | None) -> None:
        """A shared count just started from this instance's copy of the user, which may be behind
        other instances' charges (after a Redis restart): raise it to the database's count."""
        assert self.durable_used is not None
        with contextlib.suppress(Exception):
            used = await asyncio.to_thread(self.durable_used, token, family, start)
            if used:
                await self.fast.raise_used(quota_key, used)

    async def admit_request(self, gk: Gatekeeper, caller: Caller, family: str, kind: str, payload: dict) -> Admission:
        from proxy.access.gatekeeper import FREE_KINDS, Admission, _when
        from proxy.access.quota import apply_cap, output_ask, quota_refusal, reply_allowance
        from proxy.access.tokens import count_prompt_async
        from proxy.access.users import next_refill

        user = gk._user_of(caller)
        exempt = user is not None and user.exempt
        who = owner(caller.user_token) if caller.user_token else None
        rate = gk._rate if not exempt else None
        limit = 0
        if kind not in FREE_KINDS and user is not None and not exempt:
            gk.users.refresh(user)  # type: ignore[union-attr]
            limit = user.limit_for(family)
        now = gk._clock()
        period = gk.users.refresh_period if gk.users is not None else ""
        refill = next_refill(period, now)  # refills raise limits (refresh.py): counts never reset by time
        limits = Limits(
            rate_key=f"{who or 'ip:' + caller.ip}" if rate is not None else None,
            rate_limit=rate.limit if rate is not None else 0,
            window_s=rate.window_s if rate is not None else 60.0,
            slot_key=None if exempt or not gk.concurrency else (who or f"ip:{network_of(caller.ip)}"),
            slot_limit=gk.concurrency,
            quota_key=f"{who}:{family}" if limit and who else None,
            quota_limit=limit,
            used=user.token_counts.get(family, 0) if user is not None and limit else 0,
            period_s=0.0,
            defer_rate=True,
        )
        if not (limits.rate_limit or limits.slot_key or limits.quota_key):
            return Admission(caller=caller, family=family, user=user)  # nothing to check: no round trip
        try:
            entry, ticket = await self.fast.enter(limits)
        except FastStateError:
            raise unavailable() from None
        refills = _when(refill) if refill is not None else None
        if entry.seeded and self.durable_used is not None and caller.user_token and limits.quota_key:
            self._spawn(self._reseed(caller.user_token, family, limits.quota_key, None))
        if entry.refused == "rate":
            raise _rate_refusal(limits.rate_limit, entry.rate_reset_s)
        if entry.refused == "quota":
            raise quota_refusal(family, limit=limit, used=entry.used, held=entry.held, prompt=0, refills_at=refills)
        if entry.refused == "slots":
            raise ProxyError(
                429,
                f"Too many requests at once: at most {gk.concurrency} in progress. Try again when one ends.",
                Kind.RATE_LIMIT, headers={"Retry-After": "1"}, code="too_many_concurrent_requests",
            )  # fmt: skip
        headers = {}
        if rate is not None and entry.left is None:
            remaining = max(rate.limit - entry.rate_count, 0)
            headers = RateDecision(True, rate.limit, remaining, entry.rate_reset_s).headers()
        admission = Admission(caller=caller, family=family, headers=headers, user=user, quota_left=entry.left)
        admission.ticket = ticket
        try:
            if entry.left is not None:
                assert user is not None
                ask = output_ask(kind, family, payload, translated_default=gk.default_max_tokens)
                claude = family.startswith("claude") or family.startswith("anthropic")
                prompt = await count_prompt_async(payload, bound=entry.left, claude=claude)
                left = entry.left
                for _ in range(HOLD_TRIES):
                    try:
                        reply, cap = reply_allowance(ask, left - prompt)
                    except ValueError:
                        raise quota_refusal(
                            family, limit=limit, used=entry.used, held=limit - entry.used - left, prompt=prompt,
                            refills_at=refills,
                        ) from None  # fmt: skip
                    try:
                        again = await self.fast.hold(ticket, prompt + reply, limit, limits.used)
                    except RateLimited as exc:
                        raise _rate_refusal(limits.rate_limit, exc.reset_s) from None
                    if again is None:
                        break
                    left = again
                else:
                    raise quota_refusal(family, limit=limit, used=entry.used, held=0, prompt=prompt, refills_at=refills)
                admission.output_cap, admission.prompt_tokens = cap, prompt
                if rate is not None:
                    remaining = max(rate.limit - ticket.rate_count, 0)
                    admission.headers = RateDecision(True, rate.limit, remaining, ticket.rate_reset_s).headers()
                apply_cap(kind, payload, cap, family)
        except FastStateError:
            self.finish(ticket)
            raise unavailable() from None
        except BaseException:
            self.finish(ticket)
            raise
        return admission

    def finish(self, ticket: Ticket, used: int = 0) -> None:
        """Give back the request's slot and holds, and count `used` tokens, without waiting."""
        self._spawn(self._finish(ticket, used))

    async def _finish(self, ticket: Ticket, used: int) -> None:
        try:
            await self.fast.finish(ticket, used)
        except FastStateError:  # Redis away: slots and holds go with this instance's heartbeat
            log.warning("shared state: could not give back a request's slot and holds")


def _rate_refusal(limit: int, reset_s: int) -> ProxyError:
    decision = RateDecision(False, limit, 0, reset_s)
    return ProxyError(
        429, f"Too many requests: at most {limit} a minute. Try again in {reset_s} s.", Kind.RATE_LIMIT,
        headers=decision.headers(),
    )  # fmt: skip


class SharedGuesses(FailureGuard):
    """The guessing lockout of every instance: failures counted in Redis; a lockout any instance
    starts is announced to all. Checking stays local (a dictionary lookup, synchronous)."""

    def __init__(
        self,
        fast: RedisFastState,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        limit: int,
        window_s: float,
        lockout_s: float,
        clock: Callable[[], float] = time.time,
        scope: str = "",
    ) -> None:
        super().__init__(limit, window_s, lockout_s, clock)
        self.fast = fast
        self._spawn = spawn
        # What is guessed ("" proxy keys and tokens, "admin:" the admin key, "info:" the service
        # info password): each its own counts and lockouts, announced on its own channel.
        self.scope = scope
        self.channel = LOCKOUTS_CHANNEL + (f":{scope.rstrip(':')}" if scope else "")

    def failed(self, client: str) -> bool:
        started = super().failed(client)
        self._spawn(self._count(client))
        return started

    async def _count(self, client: str) -> None:
        try:
            if await self.fast.failed_guess(self.scope + client, self.limit, self.window_s, self.lockout_s):
                until = self._clock() + self.lockout_s
                self._locked_until[client] = until
                message = json.dumps({"c": client, "u": until, "i": self.fast.instance_id})
                await self.fast.publish(self.channel, message)
        except FastStateError:
            pass

    def on_message(self, raw: str) -> None:
        message = json.loads(raw)
        if message.get("i") != self.fast.instance_id and isinstance(message.get("u"), int | float):
            client = str(message.get("c"))
            self._locked_until[client] = max(self._locked_until.get(client, 0.0), float(message["u"]))

    async def listen(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.fast.listen(self.channel, self.on_message)
