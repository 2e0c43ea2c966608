"""The key pool of one service: key states, selection, lockouts, and what each outcome means."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from proxy.families import family_of

log = logging.getLogger("proxy.keys")


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


def key_id(prefix: str, secret: str) -> str:
    """The public name of a key: prefix plus the first 8 hex digits of its SHA-256."""
    return prefix + hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(eq=False)
class Key:
    """One upstream key. `secret` never leaves the server; everything else may be shown by id."""

    secret: str = field(repr=False)
    id: str
    service: str
    state: KeyState = KeyState.UNCHECKED
    tier: str = "unknown"
    models: set[str] | None = None  # None until checked: assume it may serve anything
    lost_models: set[str] = field(default_factory=set)
    limits: dict[str, int] = field(default_factory=dict)
    locked_until: float = 0.0
    last_used: float = 0.0
    last_checked: float | None = None

    @property
    def usable(self) -> bool:
        return self.state in (KeyState.ACTIVE, KeyState.UNCHECKED)

    def serves(self, model: str | None) -> bool:
        if model is None:
            return True
        if model in self.lost_models:
            return False
        return self.models is None or model in self.models

    def status(self, now: float) -> str:
        if self.usable and self.locked_until > now:
            return "rate_limited"
        return self.state.value

    def public(self, now: float) -> dict:
        models = sorted(self.models - self.lost_models) if self.models is not None else None
        families = sorted({family_of(m, self.service) for m in models}) if models is not None else []
        return {
            "id": self.id,
            "status": self.status(now),
            "tier": self.tier,
            "limits": dict(self.limits),
            "families": families,
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
    ) -> None:
        self.service = service
        self.clock = clock
        self.on_change = on_change
        self.keys: list[Key] = [Key(secret=s, id=key_id(prefix, s), service=service) for s in secrets]
        self.checking = False  # set by the checker while the first check of every key runs

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, model: str | None, exclude: set[str] | frozenset[str] = frozenset()) -> Key | None:
        """The least recently used key that is alive, unlocked and can use `model`; marks it used."""
        now = self.clock()
        best: Key | None = None
        for key in self.keys:
            if key.id in exclude or not key.usable or key.locked_until > now or not key.serves(model):
                continue
            if best is None or key.last_used < best.last_used:
                best = key
        if best is not None:
            best.last_used = now
        return best

    def why_none(self, model: str | None, exclude: set[str] | frozenset[str] = frozenset()) -> NoKey:
        """Explain why `select` found nothing, for the client."""
        now = self.clock()
        name = self.service
        if not self.keys:
            return NoKey(503, f"No {name} key is configured on this proxy.")
        alive = [k for k in self.keys if k.usable]
        if not alive:
            return NoKey(503, f"Every {name} key on this proxy is revoked or out of quota.")
        serving = [k for k in alive if k.serves(model)]
        if not serving:
            return NoKey(404, f"No {name} key on this proxy can use the model '{model}'.")
        locked = [k for k in serving if k.locked_until > now]
        if len(locked) == len(serving):
            wait = max(1.0, min(k.locked_until for k in locked) - now)
            return NoKey(
                429,
                f"Every {name} key that can use '{model}' is rate-limited; retry in {wait:.0f}s.",
                retry_after=wait,
            )
        return NoKey(502, f"Every {name} key that can use '{model}' failed for this request; try again.")

    def apply(self, key: Key, outcome: Outcome, model: str | None = None) -> None:
        """Update a key after an upstream reply; log each change of state once."""
        verdict = outcome.verdict
        before = key.status(self.clock())
        if verdict is Verdict.REVOKED:
            key.state = KeyState.REVOKED
        elif verdict is Verdict.OVER_QUOTA:
            key.state = KeyState.OVER_QUOTA
        elif verdict is Verdict.RATE_LIMITED:
            key.locked_until = max(key.locked_until, self.clock() + (outcome.retry_after or 10.0))
        elif verdict is Verdict.MODEL_MISSING and model:
            key.lost_models.add(model)
            log.info("key %s cannot use model %s", key.id, model)
        elif verdict is Verdict.OK and key.state is KeyState.UNCHECKED:
            key.state = KeyState.ACTIVE
        after = key.status(self.clock())
        if after != before:
            log.info("key %s: %s -> %s", key.id, before, after)
            if self.on_change is not None:
                self.on_change(key)

    def models(self) -> set[str] | None:
        """The union of models the live keys can use, or None while any live key is unchecked."""
        live = [k for k in self.keys if k.usable]
        if any(k.models is None for k in live):
            return None
        return set().union(*((k.models - k.lost_models) for k in live if k.models is not None))

    def snapshot(self) -> dict:
        now = self.clock()
        statuses = [k.status(now) for k in self.keys]
        live = [k for k in self.keys if k.usable]
        families = sorted(
            {family_of(m, self.service) for k in live if k.models is not None for m in k.models - k.lost_models}
        )
        checked = [k.last_checked for k in self.keys if k.last_checked is not None]
        return {
            "total": len(self.keys),
            "active": sum(s in ("active", "rate_limited", "unchecked") for s in statuses),
            "revoked": statuses.count("revoked"),
            "over_quota": statuses.count("over_quota"),
            "rate_limited": statuses.count("rate_limited"),
            "unchecked": statuses.count("unchecked"),
            "trial": sum(k.tier == "trial" for k in self.keys),
            "checking": self.checking,
            "last_check": max(checked) if checked else None,
            "families": families,
            "keys": [k.public(now) for k in self.keys],
        }
