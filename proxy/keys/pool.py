"""The key pool of one service: key states, selection, lockouts, and what each outcome means.

Everything here runs on the event loop, but `snapshot()` may be read from another thread (the
UI), so model sets are immutable and replaced, never mutated in place.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

from proxy.families import NON_TEXT, families_of, family_of, is_allowed

log = logging.getLogger("proxy.keys")

DEFAULT_LOCKOUT = 10.0  # seconds a rate-limited key rests when the upstream names no wait
COOLDOWN_BASE = 2.0  # a key that failed transiently is tried last for this long, doubling
COOLDOWN_MAX = 120.0
MAX_LOST_MODELS = 256  # models an unlisted key is remembered to lack; client-chosen names, so bounded
MAX_MODEL_NAME = 256  # longer names are never remembered (the pipeline refuses them anyway)


class KeyState(StrEnum):
    UNCHECKED = "unchecked"
    ACTIVE = "active"
    REVOKED = "revoked"
    OVER_QUOTA = "over_quota"


class Verdict(StrEnum):
    """What an upstream reply says about the key that got it."""

    OK = "ok"
    REVOKED = "revoked"
    OVER_QUOTA = "over_quota"
    RATE_LIMITED = "rate_limited"
    MODEL_MISSING = "model_missing"
    RETRYABLE = "retryable"
    CLIENT_ERROR = "client_error"


@dataclass(slots=True)
class Outcome:
    verdict: Verdict
    retry_after: float | None = None


@dataclass(slots=True)
class CheckResult:
    """What one check of a key found. RETRYABLE means the check itself failed: try again soon."""

    verdict: Verdict
    models: frozenset[str] | None = None
    limits: dict[str, int] = field(default_factory=dict)
    tier: str | None = None
    retry_after: float | None = None
    detail: str = ""  # for the log; never holds a secret


def key_id(prefix: str, secret: str) -> str:
    """The public name of a key: prefix plus the first 8 hex digits of its SHA-256."""
    return prefix + hashlib.sha256(secret.encode()).hexdigest()[:8]


_STATES = frozenset(s.value for s in KeyState)
_DATED = re.compile(r"^(.*?)-(\d{8}|\d{4}-\d{2}-\d{2})$")


def undated(model: str) -> str:
    """A model id without its date or alias suffix: claude-haiku-4-5-20251001 -> claude-haiku-4-5,
    claude-3-5-haiku-latest -> claude-3-5-haiku, gpt-4o-2024-08-06 -> gpt-4o."""
    dated = _DATED.match(model)
    base = dated.group(1) if dated else model
    return base.removesuffix("-latest").removesuffix("-0")


def _alias_listed(model: str, models: frozenset[str]) -> bool:
    """Whether `model` names a listed id under its other spelling, both ways: an undated alias of a
    dated id (claude-3-5-haiku-latest, claude-sonnet-4-0, claude-haiku-4-5 for
    claude-haiku-4-5-20251001) or a dated id of an undated one (claude-haiku-4-5-20251001 for
    claude-haiku-4-5). Exactly one side is dated: two different dates are two different snapshots."""
    dated, plain = _bases(models)
    return undated(model) in (plain if _DATED.match(model) else dated)


@lru_cache(maxsize=64)
def _bases(models: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The undated names of the listed dated ids, and of the listed undated ones. Cached by model
    list (what the upstream lists, a handful of distinct lists), never by a name a client sent."""
    dated: set[str] = set()
    plain: set[str] = set()
    for listed in models:
        (dated if _DATED.match(listed) else plain).add(undated(listed))
    return frozenset(dated), frozenset(plain)


def closest_models(model: str | None, served: Iterable[str], service: str, limit: int = 3) -> list[str]:
    """Served models most like `model`: its own family first, then by similarity of the name."""
    wanted = (model or "").lower()
    family = family_of(wanted, service) if wanted else ""

    def rank(candidate: str) -> tuple[bool, float, str]:
        similar = difflib.SequenceMatcher(None, wanted, candidate.lower()).ratio()
        return (family_of(candidate, service) != family, -similar, candidate)

    return sorted(served, key=rank)[:limit]


@dataclass(eq=False)
class Key:
    """One upstream key. `secret` never leaves the server; everything else may be shown by id."""

    secret: str = field(repr=False)
    id: str
    service: str
    state: KeyState = KeyState.UNCHECKED
    tier: str = "unknown"
    models: frozenset[str] | None = None  # None until listed: assume it may serve anything
    lost_models: frozenset[str] = frozenset()
    limits: dict[str, int] = field(default_factory=dict)
    locked_until: float = 0.0
    last_used: float = 0.0
    last_checked: float | None = None
    failures: int = 0  # consecutive transient failures at request time
    cooldown_until: float = 0.0
    in_flight: int = 0  # requests holding this key now (taken by the queue, not yet given back)
    budget: int | None = None  # requests the upstream said are left before its reset; None: unknown
    taken: int = 0  # requests ever taken, to tell which replies are older than later sends

    @property
    def usable(self) -> bool:
        return self.state in (KeyState.ACTIVE, KeyState.UNCHECKED)

    def serves(self, model: str | None) -> bool:
        if model is None:
            return True
        if model in self.lost_models:
            return False
        models = self.models
        return models is None or model in models or _alias_listed(model, models)

    def available_models(self) -> frozenset[str]:
        return (self.models or frozenset()) - self.lost_models

    def status(self, now: float) -> str:
        if self.usable and self.locked_until > now:
            return "rate_limited"
        return self.state.value

    def public(self, now: float) -> dict:
        models = self.available_models() if self.models is not None else None
        return {
            "id": self.id,
            "status": self.status(now),
            "tier": self.tier,
            "limits": dict(self.limits),
            "families": families_of(models, self.service) if models is not None else [],
            "models": len(models) if models is not None else None,
            "last_checked": self.last_checked,
            "locked_until": self.locked_until if self.locked_until > now else None,
        }


@dataclass(slots=True)
class NoKey:
    """Why no key can serve a request; rendered to the client by the pipeline."""

    status: int
    message: str
    retry_after: float | None = None


class KeyPool:
    """Keys of one service. Chooses the least recently used key that can serve a model."""

    def __init__(
        self,
        service: str,
        secrets: Iterable[str],
        prefix: str,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[Key], None] | None = None,
        family_filter: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        self.service = service
        self.family_filter = family_filter  # ALLOWED_MODEL_FAMILIES: what the status says is served
        self.clock = clock
        self.on_change = on_change  # called when something worth persisting changed
        # Called with (key, model) for each model a key turns out to lack; when set, such a
        # change alone is not reported to on_change.
        self.on_lost: Callable[[Key, str], None] | None = None
        self.keys: list[Key] = [Key(secret=s, id=key_id(prefix, s), service=service) for s in secrets]
        self._by_id = {k.id: k for k in self.keys}
        # Least recently selected first: `select` usually takes the first key it looks at, so its
        # cost does not grow with the pool (it scanned every key before: 3x the CPU at 1,000 keys).
        self._lru: OrderedDict[str, Key] = OrderedDict((k.id, k) for k in self.keys)
        self.checking = False  # set by the checker while the first check of every key runs
        self.max_in_flight = 0  # KEY_MAX_CONCURRENCY: requests one key may carry at once (0: no limit)

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, key_id: str) -> Key | None:
        return self._by_id.get(key_id)

    # Selection -------------------------------------------------------------------------------
    def select(self, model: str | None, exclude: set[str] | frozenset[str] = frozenset()) -> Key | None:
        """The least recently used key that is alive, unlocked and can use `model`; marks it used.

        Keys cooling down after a transient failure come last, but are not excluded.
        """
        now = self.clock()
        best: Key | None = None
        cooling: Key | None = None
        dead: list[str] = []
        for key in self._lru.values():
            if not key.usable:
                dead.append(key.id)
                continue
            if key.id in exclude or key.locked_until > now or not key.serves(model):
                continue
            if key.budget == 0 or (self.max_in_flight and key.in_flight >= self.max_in_flight):
                continue  # busy: given back (and the queue woken) when a request on it ends
            if key.cooldown_until > now:
                cooling = cooling or key
                continue
            best = key
            break
        for key_id_ in dead:  # revoked keys sink to the end, so later requests do not look at them first
            self._lru.move_to_end(key_id_)
        best = best or cooling
        if best is not None:
            best.last_used = now
            self._lru.move_to_end(best.id)
        return best

    def why_none(self, model: str | None, exclude: set[str] | frozenset[str] = frozenset()) -> NoKey:
        """Explain why `select` found nothing, for the client."""
        now = self.clock()
        name = self.service
        wanted = f"'{model}'" if model else "this request"
        if not self.keys:
            return NoKey(503, f"No {name} key is configured on this proxy.")
        alive = [k for k in self.keys if k.usable]
        if not alive:
            return NoKey(503, f"No {name} key can serve {wanted}: every key is revoked or out of quota.")
        serving = [k for k in alive if k.serves(model)]
        if not serving:
            suggestions = closest_models(model, self.chat_models(), name)
            hint = f" Models it serves that come closest: {', '.join(suggestions)}." if suggestions else ""
            return NoKey(404, f"No {name} key on this proxy can use the model {wanted}.{hint}")
        locked = [k for k in serving if k.locked_until > now]
        busy = [k for k in serving if k.locked_until <= now and k.id not in exclude and not self._free(k, now)]
        if busy and len(locked) + len(busy) == len(serving):
            wait = min([1.0] + [max(1.0, k.locked_until - now) for k in locked])
            return NoKey(
                429, f"Every {name} key that can use {wanted} is busy with other requests; retry in {wait:.0f}s.",
                retry_after=wait,
            )  # fmt: skip
        if len(locked) == len(serving):
            wait = max(1.0, min(k.locked_until for k in locked) - now)
            return NoKey(
                429,
                f"Every {name} key that can use {wanted} is rate-limited; retry in {wait:.0f}s.",
                retry_after=wait,
            )
        return NoKey(502, f"Every {name} key that can use {wanted} failed for this request; try again.")

    # In-flight requests and the upstream's headroom (for the queue) ---------------------------
    def _free(self, key: Key, now: float) -> bool:
        return (
            key.usable
            and key.locked_until <= now
            and key.budget != 0
            and not (self.max_in_flight and key.in_flight >= self.max_in_flight)
        )

    def has_free(self) -> bool:
        """Whether some key could be taken now (for some model)."""
        now = self.clock()
        return any(self._free(k, now) for k in self.keys)

    def could_serve(self, model: str | None, exclude: set[str] | frozenset[str] = frozenset()) -> bool:
        """Whether a live key that can use `model` exists, free or not: worth waiting for."""
        return any(k.usable and k.id not in exclude and k.serves(model) for k in self.keys)

    def next_unlock(self) -> float | None:
        """When the earliest lockout of a live key ends (pool clock), if any key is locked."""
        now = self.clock()
        ends = [k.locked_until for k in self.keys if k.usable and k.locked_until > now]
        return min(ends) if ends else None

    def take(self, key: Key) -> int:
        """A request starts on `key`; returns its sequence number, for `headroom`."""
        key.in_flight += 1
        key.taken += 1
        if key.budget is not None:
            key.budget = max(0, key.budget - 1)
        return key.taken

    def give_back(self, key: Key) -> None:
        """A request on `key` ended (its upstream connection is released)."""
        key.in_flight = max(0, key.in_flight - 1)
        if key.budget == 0 and key.in_flight == 0 and key.locked_until <= self.clock():
            key.budget = 1  # no reply left to report the headroom: try one request

    def headroom(self, key: Key, remaining: int | None, reset_s: float | None, seq: int) -> None:
        """What a reply's rate-limit headers say: requests left before the reset, and when it is.

        Requests sent after the one that got this reply (sequence `seq`) are not counted in
        `remaining` yet. None leaves the key unmetered (an upstream without such headers)."""
        if remaining is None:
            key.budget = None
            return
        if remaining <= 0 and reset_s is not None and reset_s > 0:
            key.locked_until = max(key.locked_until, self.clock() + reset_s)
            key.budget = 1  # after the reset, one request first: its reply tells the new headroom
            return
        key.budget = max(0, remaining - (key.taken - seq))
        if key.budget == 0 and key.in_flight == 0:
            key.budget = 1

    # What replies and checks say ---------------------------------------------------------------
    def apply(self, key: Key, outcome: Outcome, model: str | None = None) -> None:
        """Update a key after an upstream reply to a client's request."""
        now = self.clock()
        before = key.status(now)
        saved = self._saved(key)
        verdict = outcome.verdict
        if verdict is Verdict.REVOKED:
            key.state = KeyState.REVOKED
        elif verdict is Verdict.OVER_QUOTA:
            key.state = KeyState.OVER_QUOTA
        elif verdict is Verdict.RATE_LIMITED:
            # A rate limit (not a quota error) also says the key is valid and within quota.
            key.locked_until = max(key.locked_until, now + (outcome.retry_after or DEFAULT_LOCKOUT))
            key.budget = 1  # after the reset, one request first: its reply tells the new headroom
            if key.state is KeyState.UNCHECKED:
                key.state = KeyState.ACTIVE
        elif verdict is Verdict.MODEL_MISSING and model and self._worth_losing(key, model):
            key.lost_models = key.lost_models | {model}
            log.info("key %s cannot use model %s", key.id, model[:100])
            if self.on_lost is not None:
                # Saved as one row: a key's whole state is not written again for each name.
                saved["lost_models"] = key.lost_models
                try:
                    self.on_lost(key, model)
                except Exception:
                    log.exception("could not save a lost model of key %s", key.id)
        elif verdict is Verdict.RETRYABLE:
            key.failures += 1
            key.cooldown_until = now + min(COOLDOWN_MAX, COOLDOWN_BASE * 2 ** (key.failures - 1))
        elif verdict is Verdict.OK:
            key.failures, key.cooldown_until = 0, 0.0
            if key.state is KeyState.UNCHECKED:
                key.state = KeyState.ACTIVE
        self._changed(key, before, saved)

    @staticmethod
    def _worth_losing(key: Key, model: str) -> bool:
        """Whether to remember that `key` lacks `model`. Model names come from clients, so: when
        the key's list is known, only a model it lists (any other it already does not serve);
        while unknown, at most MAX_LOST_MODELS of them (each one is saved to the store)."""
        if len(model) > MAX_MODEL_NAME or model in key.lost_models:
            return False
        if key.models is not None:
            return model in key.models or _alias_listed(model, key.models)
        return len(key.lost_models) < MAX_LOST_MODELS

    @staticmethod
    def _bounded_lost(key: Key, lost: Iterable[str]) -> frozenset[str]:
        """`lost` cut down to what is worth remembering for `key` (see `_worth_losing`)."""
        models = key.models
        lost = [m for m in lost if len(m) <= MAX_MODEL_NAME]
        if models is not None:
            return frozenset(m for m in lost if m in models or _alias_listed(m, models))
        return frozenset(sorted(lost)[:MAX_LOST_MODELS])

    def checked(self, key: Key, result: CheckResult) -> None:
        """Record what a check found: state, tier, models, limits, lockout."""
        now = self.clock()
        before = key.status(now)
        saved = self._saved(key)
        verdict = result.verdict
        if result.models is not None:
            key.models = frozenset(result.models)
            key.lost_models = self._bounded_lost(key, key.lost_models)  # drop names it never listed
        if result.limits:
            key.limits = dict(result.limits)
        if result.tier:
            key.tier = result.tier
        if verdict is Verdict.REVOKED:
            key.state = KeyState.REVOKED
        elif verdict is Verdict.OVER_QUOTA:
            key.state = KeyState.OVER_QUOTA
        elif verdict in (Verdict.OK, Verdict.RATE_LIMITED):
            key.state = KeyState.ACTIVE
            if verdict is Verdict.RATE_LIMITED:
                key.locked_until = max(key.locked_until, now + (result.retry_after or DEFAULT_LOCKOUT))
        if verdict is not Verdict.RETRYABLE:
            key.last_checked = now
        self._changed(key, before, saved)

    def _changed(self, key: Key, before: str, saved: dict) -> None:
        """The one place that logs a key's change of status, and asks for it to be saved."""
        after = key.status(self.clock())
        if after != before:
            log.info("key %s: %s -> %s", key.id, before, after)
        if self.on_change is not None and (after != before or self._saved(key) != saved):
            try:
                self.on_change(key)
            except Exception:  # a failing store must not fail the request or the check
                log.exception("could not save the state of key %s", key.id)

    @staticmethod
    def _saved(key: Key) -> dict:
        """The part of a key's state whose change is worth persisting at once."""
        return {
            "state": key.state,
            "tier": key.tier,
            "models": key.models,
            "lost_models": key.lost_models,
            "limits": key.limits,
        }

    # Persistence -------------------------------------------------------------------------------
    def export_state(self, key: Key) -> dict[str, Any]:
        """A key's state as JSON-ready data (no secret), for the store."""
        return {
            "state": key.state.value,
            "tier": key.tier,
            "models": sorted(key.models) if key.models is not None else None,
            "lost_models": sorted(key.lost_models),
            "limits": dict(key.limits),
            "locked_until": key.locked_until,
            "last_checked": key.last_checked,
        }

    def restore(self, states: Mapping[str, Mapping[str, Any]]) -> int:
        """Take back states saved by `export_state`, by key id; unknown ids and bad fields are ignored."""
        restored = 0
        for key_id_, data in states.items():
            key = self._by_id.get(key_id_)
            if key is None or not isinstance(data, Mapping):
                continue
            if data.get("state") in _STATES:
                key.state = KeyState(data["state"])
            if isinstance(data.get("tier"), str):
                key.tier = data["tier"]
            if isinstance(data.get("models"), list):
                key.models = frozenset(str(m) for m in data["models"])
            if isinstance(data.get("lost_models"), list):
                key.lost_models = self._bounded_lost(key, (str(m) for m in data["lost_models"]))
            if isinstance(data.get("limits"), dict):
                key.limits = {str(k): int(v) for k, v in data["limits"].items() if isinstance(v, int | float)}
            if isinstance(data.get("locked_until"), int | float):
                key.locked_until = float(data["locked_until"])
            if isinstance(data.get("last_checked"), int | float):
                key.last_checked = float(data["last_checked"])
            restored += 1
        return restored

    # Views -------------------------------------------------------------------------------------
    def models(self) -> set[str] | None:
        """The union of models the live keys can use; None while unknown (first check running,
        or no live key has listed its models yet), so the caller asks the upstream instead."""
        if self.checking:
            return None
        listed = [k for k in self.keys if k.usable and k.models is not None]
        if not listed:
            return None if any(k.usable for k in self.keys) else set()
        return set().union(*(k.available_models() for k in listed))

    def chat_models(self) -> set[str]:
        """Models the live, listed keys serve, in families this proxy serves, text generation only."""
        served = set().union(*(k.available_models() for k in self.keys if k.usable and k.models is not None))
        return {
            m
            for m in served
            if is_allowed(family_of(m, self.service), self.family_filter)
            and family_of(m, self.service) not in NON_TEXT | {"embeddings"}
        }

    def family_counts(self) -> dict[str, dict[str, int]]:
        """Per model family, its keys: active (free now), limited (resting after a rate limit) and
        revoked (revoked or out of quota). Only keys whose model list is known count."""
        now = self.clock()
        counts: dict[str, dict[str, int]] = {}
        for key in self.keys:
            if key.models is None:
                continue
            status = key.status(now)
            bucket = {"active": "active", "rate_limited": "limited"}.get(status, "revoked")
            if status == "unchecked":
                continue
            for family in families_of(key.available_models(), self.service):
                if is_allowed(family, self.family_filter):
                    entry = counts.setdefault(family, {"active": 0, "limited": 0, "revoked": 0})
                    entry[bucket] += 1
        return dict(sorted(counts.items()))

    def snapshot(self) -> dict:
        """Public counts and per-key rows (ids only).

        active + unchecked + revoked + over_quota == total; rate-limited keys are active keys
        resting until their lockout ends, so `rate_limited` counts a subset of `active`.
        """
        now = self.clock()
        statuses = [k.status(now) for k in self.keys]
        served = frozenset().union(*(k.available_models() for k in self.keys if k.usable and k.models is not None))
        checked = [k.last_checked for k in self.keys if k.last_checked is not None]
        return {
            "total": len(self.keys),
            "active": sum(k.state is KeyState.ACTIVE for k in self.keys),
            "revoked": statuses.count("revoked"),
            "over_quota": statuses.count("over_quota"),
            "rate_limited": statuses.count("rate_limited"),
            "unchecked": sum(k.state is KeyState.UNCHECKED for k in self.keys),
            "trial": sum(k.tier == "trial" for k in self.keys),
            "checking": self.checking,
            "last_check": max(checked) if checked else None,
            "families": [f for f in families_of(served, self.service) if is_allowed(f, self.family_filter)],
            "by_family": self.family_counts(),
            "keys": [k.public(now) for k in self.keys],
        }
