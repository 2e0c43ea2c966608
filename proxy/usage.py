"""The usage ledger: totals by family and key, and the ring of recent events the UI reads."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class Usage:
    """Tokens of one request, from the upstream's own numbers when it gave them."""

    tokens_in: int = 0
    tokens_out: int = 0
    estimated: bool = False
    cached: int = 0  # of tokens_in, read from the provider's cache
    reasoning: int = 0  # of tokens_out, spent thinking

    @property
    def total(self) -> int:
        return self.tokens_in + self.tokens_out


@dataclass(slots=True)
class UsageEvent:
    """One finished request, as the UI shows it. Never a prompt, never a credential."""

    time: float
    service: str
    model: str
    family: str
    streamed: bool
    tokens_in: int
    tokens_out: int
    latency_ms: float
    status: int
    key_id: str | None = None
    user: str | None = None
    cached_in: int = 0
    reasoning_out: int = 0
    # "served", "failed", "cancelled" (the client left), or "refused: <why>" (by the proxy itself).
    # Empty: derived from the status.
    outcome: str = ""

    def __post_init__(self) -> None:
        if not self.outcome:
            self.outcome = outcome_of(self.status)
    queue_ms: float = 0.0  # time spent waiting in line for a key

    def public(self) -> dict:
        """Every field but the key's id (what the page and /status may show)."""
        return {name: getattr(self, name) for name in _PUBLIC_FIELDS}


_PUBLIC_FIELDS = tuple(f.name for f in fields(UsageEvent) if f.name != "key_id")


def outcome_of(status: int) -> str:
    if 200 <= status < 300:
        return "served"
    return "cancelled" if status == 499 else "failed"


@dataclass(slots=True)
class Totals:
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, tokens_in: int, tokens_out: int) -> None:
        self.requests += 1
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out}


@dataclass
class UsageLedger:
    """In-memory totals plus a bounded ring of recent events; `sink` persists each event."""

    recent_size: int = 500
    bucket_s: int = 60
    series_len: int = 24 * 60
    sink: Callable[[UsageEvent], None] | None = None
    # With several instances, the recent requests of all of them (proxy/state/sync.py).
    recent_source: Callable[[int], list[dict]] | None = None
    clock: Callable[[], float] = time.time
    total: Totals = field(default_factory=Totals)
    by_family: dict[str, Totals] = field(default_factory=dict)
    by_key: dict[str, Totals] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)  # since this process started
    max_visitors: int = 10_000  # distinct callers remembered for "active in the last minute"

    def __post_init__(self) -> None:
        self._recent: deque[UsageEvent] = deque(maxlen=self.recent_size)
        self._series: deque[list] = deque(maxlen=self.series_len)
        self._visitors: dict[str, float] = {}

    def saw(self, visitor: str) -> None:
        """Note a caller (a user's label, or an IP without users) for `active_visitors`."""
        now = self.clock()
        self._visitors.pop(visitor, None)
        self._visitors[visitor] = now  # insertion order == time order
        while len(self._visitors) > self.max_visitors or next(iter(self._visitors.values())) < now - 60:
            self._visitors.pop(next(iter(self._visitors)))

    def active_visitors(self, window_s: float = 60.0) -> int:
        cutoff = self.clock() - window_s
        return sum(1 for seen in list(self._visitors.values()) if seen >= cutoff)

    def record(self, event: UsageEvent) -> None:
        self._recent.append(event)
        self.outcomes[event.outcome] = self.outcomes.get(event.outcome, 0) + 1
        if 200 <= event.status < 300:
            self.total.add(event.tokens_in, event.tokens_out)
            self.by_family.setdefault(event.family, Totals()).add(event.tokens_in, event.tokens_out)
            if event.key_id:
                self.by_key.setdefault(event.key_id, Totals()).add(event.tokens_in, event.tokens_out)
        self._plot(event.time, event.outcome, event.tokens_in, event.tokens_out)
        if self.sink is not None:
            self.sink(event)

    def count(self, outcome: str) -> None:
        """An outcome with no request behind it to record (the connection guard's refusals, before
        any request was read): in the counts since this start and in the series."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self._plot(self.clock(), outcome, 0, 0)

    def _plot(self, when: float, outcome: str, tokens_in: int, tokens_out: int) -> None:
        """One request (of any outcome) in the series' bucket of `when`."""
        bucket = when - when % self.bucket_s
        if not self._series or self._series[-1][0] != bucket:
            self._series.append([bucket, 0, 0, 0, {}])
        point = self._series[-1]
        point[1] += 1
        point[2] += tokens_in
        point[3] += tokens_out
        point[4][outcome] = point[4].get(outcome, 0) + 1

    def restore(self, by_family: dict[str, dict[str, int]], by_key: dict[str, dict[str, int]]) -> None:
        """Load persisted totals at start."""
        for name, target in ((by_family, self.by_family), (by_key, self.by_key)):
            for label, counts in name.items():
                target[label] = Totals(
                    counts.get("requests", 0), counts.get("tokens_in", 0), counts.get("tokens_out", 0)
                )
        self.total = Totals()
        for totals in self.by_family.values():
            self.total.requests += totals.requests
            self.total.tokens_in += totals.tokens_in
            self.total.tokens_out += totals.tokens_out

    def recent(self, limit: int = 100) -> list[dict]:
        """The newest events first, without key ids."""
        if self.recent_source is not None:
            try:
                return self.recent_source(limit)
            except Exception:  # the shared list unreachable: this instance's own
                pass
        events = list(self._recent)[-limit:] if limit > 0 else []
        return [e.public() for e in reversed(events)]

    def series(self) -> list[dict]:
        """Requests (every outcome) and tokens per bucket, oldest first; idle buckets are absent."""
        return [
            {"time": b, "requests": int(r), "tokens_in": int(i), "tokens_out": int(o), "outcomes": dict(c)}
            for b, r, i, o, c in list(self._series)
        ]

    def snapshot(self) -> dict:
        """Served totals (persisted) by family."""
        return {
            **self.total.as_dict(),
            "by_family": {name: t.as_dict() for name, t in sorted(self.by_family.items())},
        }

    def activity(self) -> dict:
        """Every outcome counted since this process started, and callers seen in the last minute."""
        return {"outcomes": dict(sorted(self.outcomes.items())), "active_users_1m": self.active_visitors()}


def estimate_tokens(text_chars: int) -> int:
    """A rough count for when the upstream gave none (an aborted stream): ~4 characters a token."""
    return (text_chars + 3) // 4
