"""Who may use the proxy: no gate, one shared proxy key, or per-user tokens."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Settings
from proxy.errors import Kind, ProxyError
from proxy.usage import Usage


@dataclass(slots=True)
class Caller:
    """The identified client. `label` is safe to log: a nickname or a hash, never a secret."""

    label: str
    ip: str
    user_token: str | None = field(default=None, repr=False)


@dataclass(slots=True)
class Admission:
    """What `admit` granted; handed back to `settle` or `release` exactly once."""

    caller: Caller
    family: str | None
    reservation: Any = None


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


class Gatekeeper:
    """Identifies callers and applies limits before anything reaches an upstream."""

    def __init__(self, settings: Settings) -> None:
        self.mode = settings.auth_mode
        self._proxy_key = settings.proxy_key.encode()

    def identify(self, credential: str | None, ip: str) -> Caller:
        """Raise a 401 ProxyError unless the credential is accepted."""
        if self.mode == "none":
            return Caller(label="anon", ip=ip)
        if self.mode == "proxy_key":
            if credential is None:
                raise ProxyError(
                    401, "This proxy needs a proxy key: send it as 'Authorization: Bearer <key>'.", Kind.AUTHENTICATION
                )
            if not hmac.compare_digest(credential.encode(), self._proxy_key):
                raise ProxyError(401, "The proxy key is not valid.", Kind.AUTHENTICATION)
            return Caller(label="proxy-key", ip=ip)
        raise ProxyError(401, "Per-user tokens are not available.", Kind.AUTHENTICATION)

    def admit(self, caller: Caller, family: str | None, estimate: int = 0) -> Admission:
        """Apply rate limits and quotas for one request to `family` (None: not a model request).

        `estimate` is the request's likely token cost, reserved against the caller's quota until
        `settle` replaces it with the real count or `release` drops it."""
        return Admission(caller=caller, family=family)

    def settle(self, admission: Admission, usage: Usage) -> None:
        """Charge what the request used."""

    def release(self, admission: Admission) -> None:
        """The request failed before using anything: give back any reservation."""
