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

from proxy.access.ratelimit import FailureGuard, SlidingWindow, Tarpit, network_of
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
        self._reserved: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._guesses = guesses or FailureGuard(GUESS_LIMIT, GUESS_WINDOW_S, GUESS_LOCKOUT_S, clock)
        self._guess_lock = threading.Lock()
        self._tarpit = Tarpit(TARPIT_DELAY_S, TARPIT_HELD, clock)

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
        """Apply rate limits and quotas for one request to `family` (None: not a model request).

        `estimate` is the most the request is expected to cost in tokens. It must fit in what is
        left of the caller's quota for `family` (counting other requests still running), and it
        stays reserved until `settle` replaces it with the real count or `release` drops it."""
        if family is None:
            return Admission(caller=caller, family=None)
        user = self._user_of(caller)
        exempt = user is not None and user.exempt
        rate_key = caller.user_token or f"ip:{caller.ip}"
        rate = self._rate if not exempt else None
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
            reservation = None
            if user is not None and not exempt:
                reservation = self._reserve(user, family, max(int(estimate), 1))
            headers: dict[str, str] = {}
            if rate is not None:
                rate.hit(rate_key)
                headers = rate.check(rate_key).headers()
        return Admission(caller=caller, family=family, reservation=reservation, headers=headers)

    def _reserve(self, user: User, family: str, amount: int) -> Reservation | None:
        """Hold `amount` tokens of `user`'s quota for `family`; the caller holds `_lock`."""
        limit = user.limit_for(family)
        if not limit:
            return None
        assert self.users is not None
        self.users.refresh(user)
        key = (user.token, family)
        used = user.token_counts.get(family, 0)
        held = self._reserved.get(key, 0)
        if amount > limit - used - held:
            raise ProxyError(429, self._quota_message(family, limit, used, held, amount), Kind.QUOTA)
        self._reserved[key] = held + amount
        return Reservation(user=user, family=family, amount=amount)

    def _quota_message(self, family: str, limit: int, used: int, held: int, amount: int) -> str:
        left = max(limit - used - held, 0)
        message = f"Token quota exceeded for {family}: {used} of {limit} tokens used"
        if held:
            message += f", {held} held by requests in progress"
        message += f"; this request may need {amount}, {left} left."
        refill = next_refill(self.users.refresh_period if self.users else "", self._clock())
        if refill is not None:
            message += f" The quota refills at {_when(refill)}."
        return message

    def settle(self, admission: Admission, usage: Usage) -> None:
        """Charge what the request used: tokens against the quota, one request to the count."""
        if admission.done:
            return
        admission.done = True
        self._unreserve(admission.reservation)
        user = self._user_of(admission.caller)
        if user is not None and admission.family is not None:
            self.users.charge(user, admission.family, usage.total)  # type: ignore[union-attr]

    def release(self, admission: Admission) -> None:
        """The request failed before using anything: give back any reservation."""
        if admission.done:
            return
        admission.done = True
        self._unreserve(admission.reservation)

    def _unreserve(self, reservation: Reservation | None) -> None:
        if reservation is None:
            return
        key = (reservation.user.token, reservation.family)
        with self._lock:
            held = self._reserved.get(key, 0) - reservation.amount
            if held > 0:
                self._reserved[key] = held
            else:
                self._reserved.pop(key, None)

    def reserved(self, user: User, family: str) -> int:
        """Tokens held for `user` by requests in progress."""
        return self._reserved.get((user.token, family), 0)

    def _user_of(self, caller: Caller) -> User | None:
        if self.users is None or caller.user_token is None:
            return None
        return self.users.find(caller.user_token)
