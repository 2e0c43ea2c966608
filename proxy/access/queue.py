"""The fair queue: when no key can take a request now, the request waits here for one.

The gatekeeper decides *whether* a request may run; the queue decides *when* it may take a key.
Waiting requests of one service are served in fair order: round-robin between users (or
addresses), first come first served within a user, and a request that a key refused with a 429
goes back to its own place, not behind newcomers. The order is start-time fair queuing: a request
is tagged with its user's round (the service's current round when the user has nothing running,
else one past the user's last tag), and the lowest (tag, arrival) goes first.

Nothing polls. Waiting requests are looked at again when a request on a key ends, when a reply
says a key has headroom again, when a key changes (the checker), and by a timer set for the
moment the earliest lockout ends. A global cap (UPSTREAM_MAX_CONNECTIONS) on upstream requests in
flight makes requests beyond it wait in the same line.

The line holds asyncio futures, so it is per instance. With several instances the wait estimates
take the others' lines into account: each instance publishes its lines (how many wait, how fast
they are served) and reads the others' (proxy/state/lines.py, on Redis) into `peers`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from proxy.keys.pool import Key, KeyPool
from proxy.providers.base import int_header, retry_after

EWMA_ALPHA = 0.2  # weight of the newest interval in the moving estimate
PACE_FRESH_S = 60.0  # a line's pace is told to other instances while it served within this long
_WAITING, _GRANTED, _OUT = 1, 2, 3


class QueueTimeout(Exception):
    """The request waited QUEUE_TIMEOUT seconds without a key."""

    def __init__(self, waited_s: float, timeout_s: float) -> None:
        super().__init__(f"waited {waited_s:.1f} s")
        self.waited_s, self.timeout_s = waited_s, timeout_s


class QueueFull(Exception):
    """MAX_QUEUE_LENGTH requests already wait for this family."""

    def __init__(self, waiting: int, estimate_s: float) -> None:
        super().__init__(f"{waiting} waiting")
        self.waiting, self.estimate_s = waiting, estimate_s


def headroom_of(headers: Mapping[str, str]) -> tuple[int | None, float | None]:
    """Requests left before the key's reset and seconds until it, from a reply's rate-limit headers
    (OpenAI's x-ratelimit-*-requests or Anthropic's anthropic-ratelimit-requests-*)."""
    for remaining_name, reset_name in (
        ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
        ("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"),
    ):
        remaining = int_header(headers, remaining_name)
        if remaining is not None:
            reset = headers.get(reset_name)
            return remaining, retry_after({reset_name: reset}, time.time(), reset_name) if reset else None
    return None, None


class Line:
    """One service's line for one model family: how many wait, and the moving wait estimate.

    The estimate is the line's recent time between grants (an exponentially weighted average,
    measured only while someone waited) times the position; at least the time until the next
    key's lockout ends."""

    __slots__ = ("family", "waiting", "interval", "last_grant", "busy_since", "recent_wait")

    def __init__(self, family: str) -> None:
        self.family = family
        self.waiting = 0
        self.interval: float | None = None
        self.last_grant = 0.0
        self.busy_since = 0.0
        self.recent_wait: float | None = None

    def granted(self, now: float, waited: float) -> None:
        gap = now - max(self.last_grant, self.busy_since)
        self.interval = gap if self.interval is None else self.interval + EWMA_ALPHA * (gap - self.interval)
        self.recent_wait = waited if self.recent_wait is None else self.recent_wait + EWMA_ALPHA * (
            waited - self.recent_wait
        )
        self.last_grant = now

    def estimate(self, position: int, unlock_in: float) -> float:
        return max(unlock_in, position * (self.interval or 0.0))


class Ticket:
    """One request's place in line, kept across re-queues (its fairness tag never changes)."""

    __slots__ = (
        "service", "family", "user", "model", "tag", "seq", "state", "future", "timer", "deadline",
        "queued_s", "entered", "key", "key_seq", "exclude", "on_queued", "line",
    )  # fmt: skip

    def __init__(self, service: str, family: str, user: str, model: str | None, line: Line) -> None:
        self.service, self.family, self.user, self.model, self.line = service, family, user, model, line
        self.tag: int | None = None
        self.seq = 0
        self.state = 0
        self.future: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None
        self.queued_s = 0.0  # time spent waiting, over every wait of this request
        self.entered = 0.0
        self.key: Key | None = None  # the key this request holds now
        self.key_seq = 0
        self.exclude: frozenset[str] = frozenset()
        self.on_queued: Callable[[], None] | None = None  # told each time the request starts to wait

    @property
    def waiting(self) -> bool:
        return self.state == _WAITING

    @property
    def waited_s(self) -> float:
        """Time spent in line so far, the current wait included."""
        return self.queued_s + (time.monotonic() - self.entered if self.state == _WAITING else 0.0)

    def __lt__(self, other: Ticket) -> bool:  # heap ties never reach here: (tag, seq) are unique
        return self.seq < other.seq


class _Service:
    __slots__ = ("pool", "heap", "waiting", "round", "users", "timer", "timer_at", "lines")

    def __init__(self, pool: KeyPool) -> None:
        self.pool = pool
        self.heap: list[tuple[int, int, Ticket]] = []
        self.waiting = 0
        self.round = 0  # the fairness tag last served from the line
        self.users: dict[str, list[int]] = {}  # user -> [requests active, last tag]
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.lines: dict[str, Line] = {}


class RequestQueue:
    """The waiting lines of every service, and the cap on upstream requests in flight."""

    def __init__(
        self,
        pools: Mapping[str, KeyPool],
        *,
        timeout: float = 0.0,
        max_length: int = 1000,
        max_connections: int = 512,
        clock: Callable[[], float] = time.monotonic,  # Ticket.waited_s assumes this one
    ) -> None:
        self.timeout = timeout
        self.max_length = max_length
        self.max_connections = max_connections
        self.clock = clock
        self.in_flight = 0
        self._services = {name: _Service(pool) for name, pool in pools.items()}
        self._seq = itertools.count(1)
        self._scheduled = False
        # Other instances' lines: (service, family) -> (requests waiting, grants per second).
        self.peers: dict[tuple[str, str], tuple[int, float]] = {}

    @property
    def enabled(self) -> bool:
        """QUEUE_TIMEOUT=0 turns waiting off: no free key means an immediate 429, as before."""
        return self.timeout > 0

    # A request's way through ------------------------------------------------------------------
    def ticket(self, service: str, family: str, user: str, model: str | None) -> Ticket:
        svc = self._services[service]
        line = svc.lines.get(family)
        if line is None:
            line = svc.lines[family] = Line(family)
        return Ticket(service, family, user, model, line)

    async def acquire(self, ticket: Ticket, exclude: set[str] | frozenset[str] = frozenset()) -> Key | None:
        """A key for `ticket`, now or after waiting its turn; None when no key could ever serve it
        (the pool explains why). Raises QueueFull or QueueTimeout."""
        svc = self._services[ticket.service]
        if ticket.tag is None:
            self._tag(svc, ticket)
        room = not self.enabled or self.in_flight < self.max_connections
        if room and not svc.waiting:
            key = svc.pool.select(ticket.model, exclude)
            if key is not None:
                self._take(ticket, key)
                return key
        if not self.enabled or not svc.pool.could_serve(ticket.model, exclude):
            return None
        line = ticket.line
        if line.waiting >= self.max_length:
            raise QueueFull(line.waiting, self.estimate(ticket.service, line, line.waiting + 1))
        now = self.clock()
        if ticket.deadline is None:
            ticket.deadline = now + self.timeout
        if ticket.deadline <= now:
            raise QueueTimeout(ticket.queued_s, self.timeout)
        loop = asyncio.get_running_loop()
        future = ticket.future = loop.create_future()
        ticket.exclude = frozenset(exclude)
        ticket.state, ticket.entered = _WAITING, now
        if not ticket.seq:  # kept when it comes back after a 429: its place in line
            ticket.seq = next(self._seq)
        assert ticket.tag is not None
        heapq.heappush(svc.heap, (ticket.tag, ticket.seq, ticket))
        svc.waiting += 1
        if not line.waiting:
            line.busy_since = now
        line.waiting += 1
        ticket.timer = loop.call_later(ticket.deadline - now, self._expire, ticket)
        self._dispatch(svc)
        if ticket.state == _WAITING and ticket.on_queued is not None:
            ticket.on_queued()
        try:
            return await future
        except BaseException:
            self._leave(ticket, compact=True)
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(ticket)  # granted just as the request was cancelled: give it back
            raise
        finally:
            ticket.timer.cancel()
            ticket.queued_s += self.clock() - ticket.entered

    def hold(self, ticket: Ticket, key: Key) -> None:
        """Take `key` again at once, without waiting (a revised request retried on the same key)."""
        if ticket.key is None:
            self._take(ticket, key)

    def answered(self, ticket: Ticket, headers: Mapping[str, str]) -> None:
        """The upstream replied on the ticket's key: note the headroom its headers report."""
        key = ticket.key
        if key is None:
            return
        remaining, reset = headroom_of(headers)
        svc = self._services[ticket.service]
        svc.pool.headroom(key, remaining, reset, ticket.key_seq)
        if svc.waiting and key.budget:
            self._wake_soon()

    def release(self, ticket: Ticket) -> None:
        """The request is done with its key (its upstream connection is released)."""
        key = ticket.key
        if key is None:
            return
        ticket.key = None
        self.in_flight -= 1
        self._services[ticket.service].pool.give_back(key)
        if any(s.waiting for s in self._services.values()):
            self._wake_soon()

    def done(self, ticket: Ticket) -> None:
        """The request is over, whatever happened: key given back, place in line left."""
        self.release(ticket)
        self._leave(ticket, compact=True)
        if ticket.future is not None and not ticket.future.done():
            ticket.future.cancel()
        if ticket.tag is not None:
            svc = self._services[ticket.service]
            user = svc.users.get(ticket.user)
            if user is not None:
                user[0] -= 1
                if user[0] <= 0:
                    del svc.users[ticket.user]
            ticket.tag = None

    def wake(self, service: str | None = None) -> None:
        """Something changed outside the queue (a key checked, restored, edited): look again."""
        if any(s.waiting for s in self._services.values()):
            self._wake_soon()

    # Views ---------------------------------------------------------------------------------------
    def position(self, ticket: Ticket) -> int:
        """1 + the requests of the same line that go before this one."""
        if ticket.state != _WAITING:
            return 0
        mine = (ticket.tag, ticket.seq)
        svc = self._services[ticket.service]
        line = ticket.line
        return 1 + sum(
            1 for tag, seq, other in svc.heap if other.state == _WAITING and other.line is line and (tag, seq) < mine
        )

    def estimate(self, service: str, line: Line, position: int) -> float:
        """Seconds until the request at `position` of this instance's `line` is served. With other
        instances, the keys serve every instance's line: the position counts the others' waiting
        requests in proportion, and the pace is the sum of every instance's."""
        pool = self._services[service].pool
        unlock = pool.next_unlock()
        unlock_in = max(0.0, unlock - pool.clock()) if unlock is not None else 0.0
        peer = self.peers.get((service, line.family))
        if peer is None:
            if position <= 1 and not line.waiting and pool.has_free():
                return 0.0
            return line.estimate(position, unlock_in)
        others, others_rate = peer
        if position <= 1 and not line.waiting and not others and pool.has_free():
            return 0.0
        rate = (1.0 / line.interval if line.interval else 0.0) + others_rate
        overall = self.overall_position(service, line, position)
        return max(unlock_in, overall / rate if rate > 0 else 0.0)

    def overall_position(self, service: str, line: Line, position: int) -> float:
        """`position` in this instance's line as a place among every instance's waiting requests
        (the others' counted in proportion: they are served alongside, not after)."""
        others = self.peers.get((service, line.family), (0, 0.0))[0]
        return position + others * position / max(line.waiting, position, 1)

    def lines(self) -> dict[tuple[str, str], tuple[int, float]]:
        """This instance's lines for the others: (service, family) -> (waiting, grants per second)."""
        out = {}
        for name, svc in list(self._services.items()):
            for family, line in list(svc.lines.items()):
                recent = line.interval and self.clock() - line.last_grant < PACE_FRESH_S
                if line.waiting or recent:
                    out[(name, family)] = (line.waiting, 1.0 / line.interval if recent else 0.0)
        return out

    def wait_of(self, ticket: Ticket) -> tuple[int, int]:
        """The ticket's position and expected wait in whole seconds, for the client."""
        position = self.position(ticket)
        wait = math.ceil(self.estimate(ticket.service, ticket.line, max(position, 1)))
        if position and self.peers:
            position = round(self.overall_position(ticket.service, ticket.line, position))
        return position, wait

    def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{service: {family: {"waiting": n, "estimated_wait_s": s}}} for /status and the page."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for name, svc in list(self._services.items()):
            lines = {}
            families = sorted({*svc.lines, *(family for (service, family) in self.peers if service == name)})
            for family in families:
                line = svc.lines.get(family) or Line(family)
                others = self.peers.get((name, family), (0, 0.0))[0]
                waiting = line.waiting + others
                if family not in svc.lines and not waiting:
                    continue
                wait = self.estimate(name, line, line.waiting + 1)
                lines[family] = {"waiting": waiting, "estimated_wait_s": round(wait, 1)}
            out[name] = lines
        return out

    # Inside ----------------------------------------------------------------------------------------
    def _tag(self, svc: _Service, ticket: Ticket) -> None:
        user = svc.users.get(ticket.user)
        if user is None:
            ticket.tag = svc.round
            svc.users[ticket.user] = [1, svc.round]
        else:
            ticket.tag = max(svc.round, user[1] + 1)
            user[0] += 1
            user[1] = ticket.tag

    def _take(self, ticket: Ticket, key: Key) -> None:
        ticket.key = key
        ticket.key_seq = self._services[ticket.service].pool.take(key)
        self.in_flight += 1

    def _leave(self, ticket: Ticket, compact: bool = False) -> None:
        if ticket.state != _WAITING:
            return
        ticket.state = _OUT
        svc = self._services[ticket.service]
        svc.waiting -= 1
        ticket.line.waiting -= 1
        if compact and len(svc.heap) > 64 and len(svc.heap) > 2 * svc.waiting:  # drop entries of those gone
            svc.heap = [entry for entry in svc.heap if entry[2].state == _WAITING]
            heapq.heapify(svc.heap)

    def _expire(self, ticket: Ticket) -> None:
        if ticket.state == _WAITING and ticket.future is not None and not ticket.future.done():
            waited = ticket.queued_s + self.clock() - ticket.entered
            self._leave(ticket, compact=True)
            ticket.future.set_exception(QueueTimeout(waited, self.timeout))

    def _wake_soon(self) -> None:
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called off the event loop: the next event on it will look
            return
        self._scheduled = True
        loop.call_soon(self._dispatch_all)

    def _dispatch_all(self) -> None:
        self._scheduled = False
        for svc in self._services.values():
            if svc.waiting:
                self._dispatch(svc)

    def _dispatch(self, svc: _Service) -> None:
        """Grant keys to waiting requests in fair order, while keys and connections are free."""
        pool, heap = svc.pool, svc.heap
        aside: list[tuple[int, int, Ticket]] = []
        blocked: set[str | None] = set()
        now = self.clock()
        while heap and self.in_flight < self.max_connections:
            entry = heapq.heappop(heap)
            ticket = entry[2]
            if ticket.state != _WAITING:
                continue
            if ticket.model in blocked and not ticket.exclude:
                aside.append(entry)
                continue
            key = pool.select(ticket.model, ticket.exclude)
            if key is None:
                if not pool.could_serve(ticket.model, ticket.exclude):
                    self._leave(ticket)  # every key that could serve it is gone: the pipeline says why
                    if ticket.future is not None and not ticket.future.done():
                        ticket.future.set_result(None)
                    continue
                aside.append(entry)
                if not ticket.exclude:
                    blocked.add(ticket.model)
                if not pool.has_free():
                    break
                continue
            self._leave(ticket)
            ticket.state = _GRANTED
            self._take(ticket, key)
            svc.round = max(svc.round, entry[0])
            ticket.line.granted(now, ticket.queued_s + now - ticket.entered)
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_result(key)
        for entry in aside:
            heapq.heappush(heap, entry)
        if svc.waiting:
            self._arm_timer(svc)

    def _arm_timer(self, svc: _Service) -> None:
        """Wake when the earliest lockout ends (nothing else would: no request is running on it)."""
        unlock = svc.pool.next_unlock()
        if unlock is None or (svc.timer is not None and svc.timer_at <= unlock):
            return
        if svc.timer is not None:
            svc.timer.cancel()
        delay = max(0.0, unlock - svc.pool.clock()) + 0.002
        svc.timer_at = unlock
        svc.timer = asyncio.get_running_loop().call_later(delay, self._on_timer, svc)

    def _on_timer(self, svc: _Service) -> None:
        svc.timer = None
        if svc.waiting:
            self._dispatch(svc)
