"""Who may use the proxy: no gate, one shared proxy key, or per-user tokens; and how much."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

from proxy.access.quota import (
    NO_REPLY,
    Holds,
    InFlight,
    OutputAsk,
    apply_cap,
    output_ask,
    quota_refusal,
    reply_allowance,
)
from proxy.access.ratelimit import FailureGuard, SlidingWindow, Tarpit, network_of
from proxy.access.tokens import count_prompt_async
from proxy.access.users import MAX_REMEMBERED_IPS, User, UserService, next_refill
from proxy.config import Settings
from proxy.errors import Kind, ProxyError
from proxy.usage import Usage

log = logging.getLogger("proxy.access")

# Guessing the proxy key (a password a human chose) or a user token: this many wrong ones from one
# address (an IPv4 address or an IPv6 /64) within the window lock that address out for the
# lockout: its wrong credentials get 429 (slowly, see TARPIT_DELAY_S), its valid ones still work.
# Successes reset nothing: a valid token must not launder guesses.
GUESS_LIMIT = 20
GUESS_WINDOW_S = 300.0
GUESS_LOCKOUT_S = 300.0
# Requests that use no tokens (counting tokens): rate-limited, never held against a quota.
FREE_KINDS = frozenset({"count_tokens"})
# A network's last-seen time is refreshed in memory at most this often per user.
IP_SEEN_RESOLUTION_S = 60.0


# A wrong credential from a locked-out address is answered after a delay, for at most this many
# answers per address at a time: a guesser waiting for answers one by one is slowed to about one
# guess a second; one opening many connections at once is not held further (its connections
# would otherwise pile up here) and is refused at once.
TARPIT_DELAY_S = 1.0
TARPIT_HELD = 4


class GuessRefused(ProxyError):
    """A wrong credential from an address locked out for guessing; answer it after `delay` s."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay


@dataclass(slots=True)
class Caller:
    """The identified client. `label` is safe to log: a nickname or a hash, never a secret."""

    label: str
    ip: str
    user_token: str | None = field(default=None, repr=False)


@dataclass(slots=True)
class Reservation:
    """Tokens held against a user's quota while a request runs."""

    user: User = field(repr=False)
    family: str
    amount: int


@dataclass(slots=True)
class Admission:
    """What `admit` granted; handed back to `settle` or `release` exactly once.

    `headers` are the caller's rate-limit headers, worth adding to the response."""

    caller: Caller
    family: str | None
    reservation: Reservation | None = None
    headers: dict[str, str] = field(default_factory=dict)
    done: bool = False
    user: User | None = field(default=None, repr=False)
    quota_left: int | None = None  # tokens left of the quota at entry; None: no quota applies
    output_cap: int | None = None  # the reply cap per choice written into the request, if any
    prompt_tokens: int = 0  # the prompt as counted for the quota (0: not counted): the estimate
    # charged when an upstream reports no usage, so that it stays within what was held
    slot: str | None = None  # the concurrency slot held, if any
    ticket: Any = field(default=None, repr=False)  # its claims in the shared state (proxy/state/gate.py)
    rate_key: str | None = None  # the rate-limit key still to count (under a quota: once it fits)


def credential_from(headers: Any) -> str | None:
    """The client's credential: `Authorization: Bearer X` or `x-api-key: X`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def hashed(secret: str) -> str:
    return "h:" + hashlib.sha256(secret.encode()).hexdigest()[:10]


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


class Gatekeeper:
    """Identifies callers and applies limits before anything reaches an upstream.

    Every method is synchronous and fast (dictionary lookups; a database write only when a user
    changes), meant to be called on the event loop: `identify` -> `admit` -> `settle`/`release`.
    """

    def __init__(
        self,
        settings: Settings,
        users: UserService | None = None,
        clock: Callable[[], float] = time.time,
        guesses: FailureGuard | None = None,
    ) -> None:
        self.mode = settings.auth_mode
        self._proxy_key = settings.proxy_key.encode()
        if self.mode == "user_token" and users is None:
            raise ValueError("GATEKEEPER=user_token needs a UserService")
        self.users = users if self.mode == "user_token" else None
        self.max_ips = settings.max_ips_per_user
        self.auto_ban = settings.max_ips_auto_ban
        self.ip_window_s = settings.max_ips_window_hours * 3600
        self._clock = clock
        self._rate = (
            SlidingWindow(settings.text_model_rate_limit, 60.0, clock) if settings.text_model_rate_limit else None
        )
        self._holds = Holds()
        self._in_flight = InFlight()
        self.concurrency = settings.user_concurrency_limit
        self.default_max_tokens = settings.anthropic_default_max_tokens
        self._lock = threading.Lock()
        self._guesses = guesses or FailureGuard(GUESS_LIMIT, GUESS_WINDOW_S, GUESS_LOCKOUT_S, clock)
        self._guess_lock = threading.Lock()
        self._tarpit = Tarpit(TARPIT_DELAY_S, TARPIT_HELD, clock)
        # Several instances: the limits are checked in the shared state (proxy/state/gate.py).
        self.shared: Any = None

    # Identity
    def identify(self, credential: str | None, ip: str) -> Caller:
        """Raise a 401 ProxyError unless the credential is accepted, 403 when it is refused.

        A valid credential is accepted even while `ip` is locked out for guessing (see
        GUESS_LIMIT): behind a NAT or a front proxy, many people share one address, and one of
        them guessing must not lock the others out. A wrong one is answered 429 while locked out."""
        if self.mode == "none":
            return Caller(label="anon", ip=ip)
        if self.mode == "proxy_key":
            if credential is None:
                raise ProxyError(
                    401, "This proxy needs a proxy key: send it as 'Authorization: Bearer <key>'.", Kind.AUTHENTICATION
                )
            if not hmac.compare_digest(credential.encode(), self._proxy_key):
                self._guessed(network_of(ip), "The proxy key is not valid.")
            return Caller(label="proxy-key", ip=ip)
        return self._identify_user(credential, ip)

    def user_for(self, credential: str | None, ip: str) -> User | None:
        """The user a token names, for routes off the proxy path (such as /proxy/me), under the
        same guessing rules as `identify`: None for a missing token, a 401 ProxyError for an
        unknown one (a guess), 429 for an unknown one while `ip` is locked out. A known token
        is always answered. Nothing else is checked."""
        if self.users is None or credential is None:
            return None
        user = self.users.find(credential)
        if user is None:
            self._guessed(network_of(ip), "This user token is not valid.")
        return user

    def _guessed(self, client: str, message: str) -> NoReturn:
        """Count a wrong credential from `client` (never the credential itself: not even in logs),
        and refuse it: 401, or 429 with Retry-After once `client` is locked out for guessing."""
        wait = self._guesses.retry_after(client)  # the guess that starts a lockout still gets its 401
        with self._guess_lock:
            locked = self._guesses.failed(client)
        if locked:
            log.warning(
                "access: %s locked out for %.0f s after %d wrong credentials",
                client,
                self._guesses.lockout_s,
                self._guesses.limit,
            )
        if wait is None:
            raise ProxyError(401, message, Kind.AUTHENTICATION)
        wait = self._guesses.retry_after(client) or wait  # extended by this guess
        what = "proxy keys" if self.mode == "proxy_key" else "user tokens"
        raise GuessRefused(
            429,
            f"Too many wrong {what} from this address; a valid one still works, others are refused for {wait} s.",
            Kind.RATE_LIMIT,
            headers={"Retry-After": str(wait)},
            delay=self._tarpit.delay(client),
        )

    def _identify_user(self, credential: str | None, ip: str) -> Caller:
        assert self.users is not None
        if credential is None:
            raise ProxyError(
                401,
                "This proxy needs your user token: send it as 'Authorization: Bearer <token>'.",
                Kind.AUTHENTICATION,
            )
        user = self.users.find(credential)
        if user is None:
            self._guessed(network_of(ip), "This user token is not valid.")
        if user.disabled:
            reason = user.disabled_reason or "no reason given"
            raise ProxyError(403, f"This user token is disabled: {reason}", Kind.PERMISSION, code="user_disabled")
        now = self._clock()
        if user.expires_at is not None and now >= user.expires_at:
            raise ProxyError(
                403, f"This user token expired on {_when(user.expires_at)}.", Kind.PERMISSION, code="user_expired"
            )
        network = network_of(ip)
        seen = user.ip_seen.get(network)
        if seen is None or seen < now - self.ip_window_s:
            self._admit_ip(user, ip, network)
        elif now - seen > IP_SEEN_RESOLUTION_S:
            user.ip_seen[network] = now  # in memory; written with the user's next change
        self.users.touch(user)
        return Caller(label=user.label, ip=ip, user_token=user.token)

    def ip_limit(self, user: User) -> int:
        """How many IPs `user` may use; 0 means no limit."""
        if user.exempt:
            return 0
        return self.max_ips if user.max_ips is None else user.max_ips

    def _admit_ip(self, user: User, ip: str, network: str) -> None:
        """A network not seen from `user` within the window: count it against the IP limit."""
        assert self.users is not None
        limit = self.ip_limit(user)
        if limit and user.networks_since(self._clock() - self.ip_window_s) >= limit:
            hours = self.ip_window_s / 3600
            message = (
                f"This user token has been used from more than {limit} networks (IP addresses; IPv6 by /64) "
                f"in the last {hours:g} hours."
            )
            if self.auto_ban:
                self.users.disable(user, message)
                message += " It is now disabled; ask the administrator."
            raise ProxyError(403, message, Kind.PERMISSION, code="too_many_ips")
        self.users.add_ip(user, ip, keep=max(limit, MAX_REMEMBERED_IPS), network=network)

    def networks_in_window(self, user: User) -> int:
        """How many networks count against `user`'s IP limit now."""
        return user.networks_since(self._clock() - self.ip_window_s)

    # Limits
    def admit(self, caller: Caller, family: str | None, estimate: int = 0) -> Admission:
        """Apply the rate and concurrency limits for one request to `family` (None: not a model
        request) and, under a quota, hold `estimate` tokens (the whole cost: no reply is capped).
        The pipeline uses `admit_request`, which counts the prompt and caps the reply."""
        admission = self.enter(caller, family)
        try:
            self.hold(admission, estimate, NO_REPLY)
        except BaseException:
            self.release(admission)
            raise
        return admission

    async def admit_request(self, caller: Caller, family: str, kind: str, payload: dict) -> Admission:
        """`enter`, then under a quota: count the prompt (bounded by what is left; in a thread
        when big), hold prompt + reply allowance, and cap the reply in `payload` to that."""
        if self.shared is not None:
            return await self.shared.admit_request(self, caller, family, kind, payload)
        admission = self.enter(caller, family, quota=kind not in FREE_KINDS)
        try:
            if admission.quota_left is not None:
                ask = output_ask(kind, family, payload, translated_default=self.default_max_tokens)
                claude = family.startswith("claude") or family.startswith("anthropic")
                prompt = await count_prompt_async(payload, bound=admission.quota_left, claude=claude)
                self.hold(admission, prompt, ask)
                apply_cap(kind, payload, admission.output_cap, family)
        except BaseException:
            self.release(admission)
            raise
        return admission

    def enter(self, caller: Caller, family: str | None, *, quota: bool = True) -> Admission:
        """The cheap checks, in order: the rate limit (429), whether anything is left of the quota
        for `family` (402; skipped with `quota=False`), and the caller's requests in progress
        (429). Counts the request against the rate and concurrency limits only once all pass;
        `settle` or `release` gives the concurrency slot back."""
        if family is None:
            return Admission(caller=caller, family=None)
        user = self._user_of(caller)
        exempt = user is not None and user.exempt
        rate_key = caller.user_token or f"ip:{caller.ip}"
        rate = self._rate if not exempt else None
        slot = None if exempt or not self.concurrency else (caller.user_token or f"ip:{network_of(caller.ip)}")
        with self._lock:  # check everything, then count: a refused request uses up nothing
            if rate is not None:
                decision = rate.check(rate_key)
                if not decision.allowed:
                    raise ProxyError(
                        429,
                        f"Too many requests: at most {decision.limit} a minute. Try again in {decision.reset_s} s.",
                        Kind.RATE_LIMIT,
                        headers=decision.headers(),
                    )
            left = None
            if quota and user is not None and not exempt and user.limit_for(family):
                left = self._left(user, family)
                if left <= 0:
                    raise self._spent(user, family, 0)
            if slot is not None and not self._in_flight.enter(slot, self.concurrency):
                raise ProxyError(
                    429,
                    f"Too many requests at once: at most {self.concurrency} in progress. Try again when one ends.",
                    Kind.RATE_LIMIT,
                    headers={"Retry-After": "1"},
                    code="too_many_concurrent_requests",
                )
            headers: dict[str, str] = {}
            deferred = None
            if rate is not None and left is not None:
                deferred = rate_key  # counted by `hold`, once the request is known to fit the quota
            elif rate is not None:
                rate.hit(rate_key)
                headers = rate.check(rate_key).headers()
        return Admission(
            caller=caller, family=family, headers=headers, user=user, quota_left=left, slot=slot, rate_key=deferred
        )

    def hold(self, admission: Admission, prompt: int, ask: OutputAsk) -> None:
        """Hold `prompt` tokens and the reply's allowance against the quota (when one applies),
        and set `admission.output_cap` when the reply must be capped to fit."""
        user, family = admission.user, admission.family
        if user is None or family is None or admission.quota_left is None:
            return
        with self._lock:
            left = self._left(user, family)
            try:
                reply, admission.output_cap = reply_allowance(ask, left - prompt)
            except ValueError:
                raise self._spent(user, family, prompt) from None
            if admission.rate_key is not None and self._rate is not None:
                decision = self._rate.check(admission.rate_key)  # again: others may have come meanwhile
                if not decision.allowed:
                    raise ProxyError(
                        429,
                        f"Too many requests: at most {decision.limit} a minute. Try again in {decision.reset_s} s.",
                        Kind.RATE_LIMIT,
                        headers=decision.headers(),
                    )
                self._rate.hit(admission.rate_key)
                admission.headers = self._rate.check(admission.rate_key).headers()
            amount = prompt + reply
            self._holds.hold(user.token, family, amount)
            admission.prompt_tokens = prompt
        admission.reservation = Reservation(user=user, family=family, amount=amount)

    def _left(self, user: User, family: str) -> int:
        """Tokens left of `user`'s quota for `family`, counting requests in progress. The caller
        holds `_lock`."""
        assert self.users is not None
        self.users.refresh(user)
        return user.limit_for(family) - user.token_counts.get(family, 0) - self._holds.held(user.token, family)

    def _spent(self, user: User, family: str, prompt: int) -> ProxyError:
        """The refusal of a request that does not fit in what is left of the quota."""
        refill = next_refill(self.users.refresh_period if self.users else "", self._clock())
        return quota_refusal(
            family,
            limit=user.limit_for(family),
            used=user.token_counts.get(family, 0),
            held=self._holds.held(user.token, family),
            prompt=prompt,
            refills_at=_when(refill) if refill is not None else None,
        )

    def settle(self, admission: Admission, usage: Usage) -> None:
        """Charge what the request used (the upstream's own numbers): tokens against the quota,
        one request to the count. Gives back what was held and the concurrency slot."""
        if admission.done:
            return
        admission.done = True
        self._free(admission)
        if admission.ticket is not None:
            self.shared.finish(admission.ticket, usage.total)
        user = self._user_of(admission.caller)
        if user is not None and admission.family is not None:
            self.users.charge(user, admission.family, usage.total)  # type: ignore[union-attr]

    def release(self, admission: Admission) -> None:
        """The request failed before using anything: give back what was held and its slot."""
        if admission.done:
            return
        admission.done = True
        self._free(admission)
        if admission.ticket is not None:
            self.shared.finish(admission.ticket)

    def _free(self, admission: Admission) -> None:
        if admission.slot is not None:
            self._in_flight.leave(admission.slot)
        reservation = admission.reservation
        if reservation is not None:
            with self._lock:
                self._holds.give_back(reservation.user.token, reservation.family, reservation.amount)

    def reserved(self, user: User, family: str) -> int:
        """Tokens held for `user` by requests in progress."""
        return self._holds.held(user.token, family)

    def in_flight(self, user: User) -> int:
        """`user`'s requests in progress."""
        return self._in_flight.count(user.token)

    def _user_of(self, caller: Caller) -> User | None:
        if self.users is None or caller.user_token is None:
            return None
        return self.users.current(caller.user_token)  # accepted by `identify`: no hash again
