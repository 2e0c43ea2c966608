"""Users: one token per friend, with limits and counters, kept in memory and written through."""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Literal, Protocol

from proxy.access.validation import UserError, parse_record
from proxy.store import Store

log = logging.getLogger(__name__)

UserType = Literal["normal", "special", "temporary"]
RefreshPeriod = Literal["hourly", "daily", ""]

MAX_REMEMBERED_IPS = 100  # when a user has no IP limit, only the most recent are kept


@dataclass(slots=True)
class User:
    """One friend's access. `token_counts` is what counts against `token_limits` (it refills
    every quota period); `lifetime_token_counts` never resets."""

    token: str
    nickname: str | None = None
    type: UserType = "normal"
    created_at: float = 0.0
    last_used_at: float | None = None
    disabled: bool = False
    disabled_reason: str | None = None
    expires_at: float | None = None
    token_limits: dict[str, int] = field(default_factory=dict)
    token_counts: dict[str, int] = field(default_factory=dict)
    lifetime_token_counts: dict[str, int] = field(default_factory=dict)
    counts_since: float = 0.0
    prompt_count: int = 0
    ips: list[str] = field(default_factory=list)
    max_ips: int | None = None
    # When each network (an IPv4 address, an IPv6 /64) was last seen: what MAX_IPS_PER_USER counts.
    ip_seen: dict[str, float] = field(default_factory=dict)

    def networks_since(self, since: float) -> int:
        """How many networks this user was seen from at or after `since`."""
        return sum(1 for seen in self.ip_seen.values() if seen >= since)

    @property
    def label(self) -> str:
        """Safe to log: the nickname, or a short hash of the token."""
        return self.nickname or token_hash(self.token)

    @property
    def exempt(self) -> bool:
        """Special users are exempt from quotas, rate limits and IP limits."""
        return self.type == "special"

    def limit_for(self, family: str) -> int:
        """The token limit for `family`; 0 means unlimited."""
        return self.token_limits.get(family, 0)

    def record(self) -> dict:
        """Everything, token included: for the store, the admin API and exports."""
        data = {name: getattr(self, name) for name in _FIELDS}  # not asdict(): 10x slower
        for name in ("token_limits", "token_counts", "lifetime_token_counts"):
            data[name] = dict(data[name])
        data["ips"] = list(self.ips)
        data["ip_seen"] = dict(self.ip_seen)
        return data

    @classmethod
    def from_record(cls, record: dict) -> User:
        return cls(**{k: v for k, v in record.items() if k in _FIELDS})


_FIELDS = tuple(f.name for f in fields(User))


def token_hash(token: str) -> str:
    return "u:" + hashlib.sha256(token.encode()).hexdigest()[:10]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def next_refill(period: RefreshPeriod | str, now: float) -> float | None:
    """When quotas are next refreshed (QUOTA_REFRESH_PERIOD, see refresh.py), or None without refills."""
    from proxy.access.refresh import next_fire

    return next_fire(period, now)


class UserService:
    """Users by token, in memory, written through to a `Store` on every change.

    Reads never touch the store; writes commit before returning. Thread-safe."""

    def __init__(
        self,
        store: Store | None = None,
        *,
        clock: Callable[[], float] = time.time,
        refresh_period: RefreshPeriod | str = "",
        default_limits: dict[str, int] | None = None,
    ) -> None:
        self._store = store
        # TOKEN_QUOTA_<FAMILY>: what a new user gets for each family the administrator leaves empty.
        self.default_limits = dict(default_limits or {})
        self._clock = clock
        self.refresh_period = refresh_period
        self._lock = threading.RLock()
        self._users: dict[str, User] = {}
        self._by_digest: dict[bytes, User] = {}
        if store is not None:
            for record in store.load_users():
                self._index(User.from_record(record))

    # Lookups
    def find(self, credential: str) -> User | None:
        """The user owning `credential`. Looked up by its SHA-256, so the time taken says nothing
        about how close a guess was."""
        user = self._by_digest.get(_digest(credential))
        if user is None and self.shared is not None:
            user = self._fetch(credential)
        if user is not None:
            self.refresh(user)
        return user

    def get(self, token: str) -> User | None:
        return self.find(token)

    def current(self, token: str) -> User | None:
        """The user of a token `find` already accepted for this request (a `Caller`'s), or None if
        deleted since: a plain lookup, with no hash to compute (it is not a guess)."""
        return self._users.get(token)

    def all(self) -> list[User]:
        with self._lock:
            users = list(self._users.values())
        for user in users:
            self.refresh(user)
        return users

    def __len__(self) -> int:
        return len(self._users)

    # Changes
    def create(
        self,
        *,
        nickname: str | None = None,
        type: UserType = "normal",
        token_limits: dict[str, int] | None = None,
        max_ips: int | None = None,
        expires_at: float | None = None,
    ) -> User:
        """A new user with a fresh random token (192 bits). Families missing from `token_limits`
        get the default limits (TOKEN_QUOTA_<FAMILY>); a 0 given for a family means no limit."""
        now = self._clock()
        checked = parse_record(
            {
                "nickname": nickname,
                "type": type,
                "token_limits": self.default_limits | (token_limits or {}),
                "max_ips": max_ips,
                "expires_at": expires_at,
            },
            allowed=None,
        )
        if checked.get("type") == "temporary" and checked.get("expires_at") is None:
            raise UserError("A temporary user needs expires_at.")
        checked["token_limits"] = {family: n for family, n in checked["token_limits"].items() if n > 0}
        user = User(token=secrets.token_urlsafe(24), created_at=now, counts_since=now, **checked)
        with self._lock:
            self._index(user)
            self._save(user)
        return user

    def update(self, token: str, changes: dict) -> User:
        """Apply already-validated `changes` (see `validation.parse_record`); KeyError if no user."""
        with self._lock:
            user = self._users.get(token)
            if user is None:
                raise KeyError(token)
            merged_type = changes.get("type", user.type)
            merged_expiry = changes.get("expires_at", user.expires_at)
            if merged_type == "temporary" and merged_expiry is None:
                raise UserError("A temporary user needs expires_at.")
            for name, value in changes.items():
                setattr(user, name, value)
            if changes.get("disabled") is False:
                user.disabled_reason = None
            elif changes.get("disabled") and not user.disabled_reason:
                user.disabled_reason = "Disabled by the administrator."
            self._save(user, counters="token_counts" in changes)
            return user

    def disable(self, user: User, reason: str) -> None:
        with self._lock:
            user.disabled = True
            user.disabled_reason = reason
            self._save(user)

    def delete(self, token: str) -> bool:
        with self._lock:
            user = self._users.pop(token, None)
            if user is None:
                return False
            self._by_digest.pop(_digest(token), None)
            if self._store is not None:
                self._store.delete_user(token)
            if self.shared is not None:
                self.shared.deleted(token)
            return True

    def add_ip(self, user: User, ip: str, keep: int = MAX_REMEMBERED_IPS, network: str | None = None) -> None:
        """Remember a new IP (and its network, seen now) for `user`; the oldest are forgotten
        beyond `keep`."""
        with self._lock:
            if network is not None:
                user.ip_seen[network] = self._clock()
                if len(user.ip_seen) > keep:
                    for old, _ in sorted(user.ip_seen.items(), key=lambda item: item[1])[: len(user.ip_seen) - keep]:
                        del user.ip_seen[old]
            if ip not in user.ips:
                user.ips.append(ip)
                del user.ips[: max(len(user.ips) - keep, 0)]
            self._save(user, strict=False)

    def charge(self, user: User, family: str | None, tokens: int) -> None:
        """Count one finished request and the tokens it used."""
        with self._lock:
            self.refresh(user)
            user.prompt_count += 1
            user.last_used_at = self._clock()
            if family is not None:
                user.token_counts[family] = user.token_counts.get(family, 0) + tokens
                user.lifetime_token_counts[family] = user.lifetime_token_counts.get(family, 0) + tokens
            if self._users.get(user.token) is not user:  # deleted while the request ran
                return
            if self.shared is not None and family is not None:
                try:  # added where it is: other instances charge the same user
                    self.shared.charge(user.token, family, tokens, since=user.counts_since, now=user.last_used_at)
                except Exception as exc:
                    log.error("users: could not charge %s: %s", user.label, exc)
                return
            self._save(user, strict=False)

    def touch(self, user: User) -> None:
        """Note a use in memory only; the next write persists it."""
        user.last_used_at = self._clock()

    def refresh(self, user: User) -> None:
        """Nothing: quotas are topped up on QUOTA_REFRESH_PERIOD's schedule (refresh.py), never by
        zeroing counts when a request arrives."""

    # Export and import
    def export_records(self) -> list[dict]:
        return [user.record() for user in self.all()]

    def import_records(self, records: Iterable[dict]) -> int:
        """Add or replace users by token, in one transaction. Records are validated first, so a
        bad one imports nothing."""
        now = self._clock()
        users = []
        for i, raw in enumerate(records):
            try:
                users.append(User(**_import_defaults(now) | parse_record(raw, allowed=None, full=True)))
            except UserError as exc:
                raise UserError(f"users[{i}]: {exc}") from None
        with self._lock:
            if self._store is not None:
                self._store.save_users(user.record() for user in users)
            if self.shared is not None:
                for user in users:
                    self.shared.changed(user.token, counters=True)
            for user in users:
                old = self._users.get(user.token)
                if old is not None:
                    self._by_digest.pop(_digest(old.token), None)
                self._index(user)
        return len(users)

    # Several instances (proxy/state/sync.py): each keeps its own copy of the users.
    shared: SharedUsers | None = None
    # Writes on the request path (`strict=False`) handed to a group commit instead of written at
    # once (proxy/groupcommit.py): it calls `write_through` with them by the end of the loop's turn.
    # It answers False for a write it cannot defer (off the event loop): written at once then.
    deferred: Callable[[User], bool] | None = None

    def write_through(self, users: Iterable[User], write: Callable[[list[dict]], None]) -> None:
        """`write` the records of those of `users` that still exist, under the lock: a user
        deleted (or replaced by an import) meanwhile is not written back."""
        with self._lock:
            write([user.record() for user in users if self._users.get(user.token) is user])

    def _fetch(self, token: str) -> User | None:
        """A user another instance created: read from the shared database on a miss."""
        assert self.shared is not None
        record = self.shared.fetch(token)
        if record is None or record.get("token") != token:
            return None
        with self._lock:
            user = self._users.get(token)
            if user is None:
                user = User.from_record(record)
                self._index(user)
        return user

    def absorb(self, record: dict | None, token: str) -> None:
        """Another instance changed (or, with None, deleted) a user: take its copy."""
        with self._lock:
            user = self._users.get(token)
            if record is None:
                if user is not None:
                    del self._users[token]
                    self._by_digest.pop(_digest(token), None)
                return
            fresh = User.from_record(record)
            if user is None:
                self._index(fresh)
                return
            for name in _FIELDS:  # in place: requests in progress hold this object
                setattr(user, name, getattr(fresh, name))

    # Internals
    def _index(self, user: User) -> None:
        self._users[user.token] = user
        self._by_digest[_digest(user.token)] = user

    def _save(self, user: User, *, strict: bool = True, counters: bool = False) -> None:
        """Write `user` through. On the request path (`strict=False`) with a group commit (SQLite on
        the event loop), the record goes with the turn's batch, whose failure fails the request
        (proxy/groupcommit.py); otherwise a failed write is logged and the request goes on: the
        counts in memory stay right and are written with the next change."""
        if self._store is None:
            return
        if not strict and self.deferred is not None and self.shared is None and self.deferred(user):
            return
        try:
            if self.shared is not None:
                self.shared.save(user.record(), counters=counters)
            else:
                self._store.save_user(user.record())
        except Exception as exc:
            if strict:
                raise
            log.error("users: could not save %s: %s", user.label, exc)


class SharedUsers(Protocol):
    """What a UserService needs when several instances share users (proxy/state/sync.py)."""

    def fetch(self, token: str) -> dict | None: ...
    def save(self, record: dict, *, counters: bool) -> None: ...
    def charge(self, token: str, family: str, tokens: int, *, since: float, now: float) -> None: ...
    def changed(self, token: str, *, counters: bool) -> None: ...
    def deleted(self, token: str) -> None: ...


def _import_defaults(now: float) -> dict:
    return {"created_at": now, "counts_since": now}
