"""Quota refresh as the Node original does it: on a schedule (QUOTA_REFRESH_PERIOD: hourly,
daily or a cron expression, UTC), each user's limit for a family is set to what they have used
plus the family's default quota (TOKEN_QUOTA_<FAMILY>), so counts are kept and unused quota does
not roll over. Temporary users are skipped. The admin can also refresh one user, or reset every
user's counts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from croniter import croniter

log = logging.getLogger("proxy.access")

ALIASES = {"hourly": "0 * * * *", "daily": "0 0 * * *"}


def cron_of(period: str) -> str | None:
    """The cron expression of a QUOTA_REFRESH_PERIOD value, or None when quotas never refresh."""
    period = (period or "").strip()
    if not period:
        return None
    return ALIASES.get(period.lower(), period)


def check_period(period: str) -> str:
    """Raise ValueError unless `period` is empty, hourly, daily or a valid 5-field cron expression."""
    expression = cron_of(period)
    if expression is not None and (len(expression.split()) != 5 or not croniter.is_valid(expression)):
        raise ValueError("must be hourly, daily or a cron expression of 5 fields (minute hour day month weekday)")
    return period


def next_fire(period: str, now: float) -> float | None:
    """When the schedule next fires after `now` (UTC), or None without a schedule."""
    expression = cron_of(period)
    if expression is None:
        return None
    return float(croniter(expression, datetime.fromtimestamp(now, UTC)).get_next(float))


class QuotaRefresher:
    def __init__(
        self,
        users: Any,
        defaults: Mapping[str, int],
        period: str,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.users = users
        self.sleep = sleep
        self.defaults = {family: int(n) for family, n in defaults.items() if int(n) > 0}
        self.period = period
        self.clock = clock

    def _shared(self) -> Any:
        """With several instances, the refresh is done where every instance's counts are."""
        shared = getattr(self.users, "shared", None)
        return shared if hasattr(shared, "refresh_quotas") else None

    def refresh_one(self, user: Any) -> dict[str, int]:
        """Top `user` up: limit = used + default, for every family with a default quota."""
        shared = self._shared()
        if shared is not None:
            shared.refresh_quotas(self.defaults, user.token)
            return dict(user.token_limits)  # re-read in place
        limits = dict(user.token_limits)
        for family, amount in self.defaults.items():
            limits[family] = user.token_counts.get(family, 0) + amount
        self.users.update(user.token, {"token_limits": limits})
        return limits

    def refresh_all(self) -> int:
        """Refresh every user but temporary ones; returns how many."""
        shared = self._shared()
        if shared is not None:  # one statement; every instance may run it at a firing: same result
            shared.refresh_quotas(self.defaults)
            count = sum(1 for user in self.users.all() if user.type != "temporary")
            log.info("quotas: refreshed %d users", count)
            return count
        count = 0
        for user in self.users.all():
            if user.type == "temporary":
                continue
            self.refresh_one(user)
            count += 1
        log.info("quotas: refreshed %d users", count)
        return count

    def reset_all(self) -> int:
        """Zero every user's token counts (their limits stay); returns how many users."""
        users = self.users.all()
        for user in users:
            self.users.update(user.token, {"token_counts": {}})
        log.info("quotas: reset the counts of %d users", len(users))
        return len(users)

    async def run(self) -> None:
        """Refresh at every firing of the schedule until cancelled."""
        while True:
            due = next_fire(self.period, self.clock())
            if due is None:
                return
            await self.sleep(max(due - self.clock(), 0.0) + 0.01)
            try:
                await asyncio.to_thread(self.refresh_all)  # thousands of users: off the event loop
            except Exception:
                log.exception("quotas: the scheduled refresh failed")
