"""Checking user fields sent by an administrator or found in an import, with clear messages."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from proxy.families import FAMILIES


class UserError(ValueError):
    """A user field is invalid; the message names the field and says what is expected."""


CREATE_FIELDS = frozenset({"nickname", "type", "token_limits", "max_ips", "expires_at"})
PATCH_FIELDS = CREATE_FIELDS | {"disabled", "disabled_reason", "token_counts"}
USER_TYPES = ("normal", "special", "temporary")
KNOWN_FAMILIES = frozenset({name for name, _, _ in FAMILIES} | {"other"})

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"^[A-Za-z0-9._~+=:-]{16,256}$")  # safe in a URL path segment


def _text(limit: int) -> Callable[[str, Any], str | None]:
    def check(name: str, value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise UserError(f"{name} must be a string.")
        value = value.strip()
        if len(value) > limit:
            raise UserError(f"{name} must be at most {limit} characters.")
        if _CONTROL.search(value):
            raise UserError(f"{name} must not contain control characters.")
        return value or None

    return check


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{name} must be a whole number, 0 or more.")
    return value


def _optional_count(name: str, value: Any) -> int | None:
    return None if value is None else _count(name, value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false.")
    return value


def _time(name: str, value: Any) -> float:
    """Seconds since the epoch, given as a number or an ISO 8601 date (UTC when no zone)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{name} must be a time: seconds since 1970 or an ISO 8601 date.")
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise UserError(f"{name} must be a time: seconds since 1970 or an ISO 8601 date.") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    raise UserError(f"{name} must be a time: seconds since 1970 or an ISO 8601 date.")


def _optional_time(name: str, value: Any) -> float | None:
    return None if value is None else _time(name, value)


def _type(name: str, value: Any) -> str:
    if value not in USER_TYPES:
        raise UserError(f"{name} must be one of: {', '.join(USER_TYPES)}.")
    return value


def _counts(name: str, value: Any, *, families: bool = False) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{name} must be an object mapping model families to token counts.")
    out = {}
    for family, amount in value.items():
        if families and family not in KNOWN_FAMILIES and not str(family).endswith("-other"):
            known = ", ".join(sorted(KNOWN_FAMILIES))
            raise UserError(f"{name}: unknown model family {family!r}. Known families: {known}.")
        out[str(family)] = _count(f"{name}.{family}", amount)
    return out


def _limits(name: str, value: Any) -> dict[str, int]:
    """Limits by family; a 0 is kept (no limit, on purpose: it overrides a TOKEN_QUOTA default)."""
    return _counts(name, value, families=True)


def _ips(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(ip, str) and 0 < len(ip) <= 64 for ip in value):
        raise UserError(f"{name} must be a list of IP addresses.")
    return list(dict.fromkeys(value))


def _seen(name: str, value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > 10_000:
        raise UserError(f"{name} must be an object mapping networks to the time each was last seen.")
    return {str(net)[:64]: _time(f"{name}.{net}", seen) for net, seen in value.items()}


def _token(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise UserError(f"{name} must be 16 to 256 letters, digits or ._~+=:- characters.")
    return value


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "token": _token,
    "nickname": _text(80),
    "type": _type,
    "created_at": _time,
    "last_used_at": _optional_time,
    "disabled": _bool,
    "disabled_reason": _text(500),
    "expires_at": _optional_time,
    "token_limits": _limits,
    "token_counts": _counts,
    "lifetime_token_counts": _counts,
    "counts_since": _time,
    "prompt_count": _count,
    "ips": _ips,
    "ip_seen": _seen,
    "max_ips": _optional_count,
}


def parse_record(data: Any, *, allowed: frozenset[str] | None, full: bool = False) -> dict[str, Any]:
    """Validate user fields and return them normalised.

    `allowed`: the fields a request may set (others are refused by name); None accepts every
    known field and ignores unknown ones (imports from other versions). `full`: a complete
    record, as in an import, which must carry its token."""
    if not isinstance(data, dict):
        raise UserError("Expected a JSON object.")
    if allowed is not None:
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise UserError(f"Unknown field {unknown[0]!r}; allowed fields: {', '.join(sorted(allowed))}.")
    if full and "token" not in data:
        raise UserError("token is required.")
    out = {}
    for name, value in data.items():
        check = _CHECKS.get(name)
        if check is not None and (full or name != "token"):
            out[name] = check(name, value)
    if full and "lifetime_token_counts" not in out:
        out["lifetime_token_counts"] = dict(out.get("token_counts", {}))
    return out
