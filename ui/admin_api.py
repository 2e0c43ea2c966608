"""Client for the admin HTTP API (`/admin/api`) and the pure helpers the Admin tab uses.

Every call carries the ADMIN_KEY the admin typed; the server checks it. The UI never holds
the real key, so a crafted call to a Gradio endpoint gets nothing without it."""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import quote

from ui.common import ApiResult, UIContext, call_json, describe_error, error_message, esc, fmt_ago, fmt_date

ADMIN_PREFIX = "/admin/api"
USER_TYPES = ("normal", "special", "temporary")
USER_HEADERS = [
    "Token",
    "Nickname",
    "Type",
    "State",
    "Prompts",
    "Tokens used / limit",
    "IPs",
    "Created",
    "Last used",
    "Expires",
]
_LIMIT_ITEM = re.compile(r"^\s*([^=:\s]+)\s*[=:]\s*([0-9][0-9_]*)\s*$")


def mask_token(token: Any) -> str:
    """First 6 characters and an ellipsis: enough to recognise a user, useless to anyone else."""
    token = str(token or "")
    return token[:6] + "…" if token else "—"


def users_from(data: Any) -> list[dict]:
    users = data.get("users") if isinstance(data, dict) else data
    return [u for u in users or [] if isinstance(u, dict)]


def user_state(user: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    if user.get("disabled"):
        reason = str(user.get("disabled_reason") or "").strip()
        return "disabled" + (f": {reason}" if reason else "")
    expires = user.get("expires_at")
    if isinstance(expires, (int, float)) and expires <= now:
        return "expired"
    return "active"


def usage_text(user: dict) -> str:
    """`family: used / limit` for every family the user has used or is limited on."""
    counts = user.get("token_counts") or {}
    limits = user.get("token_limits") or {}
    parts = []
    for family in sorted(set(counts) | set(limits)):
        used = counts.get(family, 0)
        if isinstance(used, dict):
            used = used.get("total", sum(v for v in used.values() if isinstance(v, (int, float))))
        limit = limits.get(family)
        limit_text = f"{int(limit):,}" if isinstance(limit, (int, float)) and limit > 0 else "∞"  # 0 = unlimited
        parts.append(f"{family}: {int(used or 0):,} / {limit_text}")
    return "; ".join(parts) or "—"


def user_rows(users: list[dict], now: float | None = None) -> list[list]:
    """Table rows with masked tokens; nicknames and reasons stay plain text (rendered as text)."""
    now = time.time() if now is None else now
    rows = []
    for user in users:
        expires = user.get("expires_at")
        rows.append(
            [
                mask_token(user.get("token")),
                str(user.get("nickname") or ""),
                str(user.get("type") or "normal"),
                user_state(user, now),
                int(user.get("prompt_count") or 0),
                usage_text(user),
                len(user.get("ips") or []),
                fmt_date(user.get("created_at")),
                fmt_ago(user.get("last_used_at"), now),
                fmt_date(expires) if expires else "never",
            ]
        )
    return rows


def parse_limits(text: str | None) -> dict[str, int]:
    """Token limits per family, from JSON (`{"gpt-4o": 100000}`) or from `family=number` pairs
    separated by commas or new lines (`gpt-4o=100000, claude=50000`). ValueError if unreadable."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError("token limits: invalid JSON") from exc
        if not isinstance(data, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data.values()
        ):
            raise ValueError("token limits: expected {family: non-negative integer}")
        return {str(k): int(v) for k, v in data.items()}
    limits = {}
    for item in re.split(r"[,\n;]+", text):
        if not item.strip():
            continue
        match = _LIMIT_ITEM.match(item)
        if not match:
            raise ValueError(f"token limits: cannot read {item.strip()[:40]!r}; use family=number")
        limits[match.group(1)] = int(match.group(2).replace("_", ""))
    return limits


def add_limit(text: str | None, family: str | None, amount: Any) -> str:
    """The limits text with `family=amount` set (replacing that family's earlier value)."""
    if not family:
        raise ValueError("pick a model family first")
    tokens = _positive_int(amount, "tokens")
    if not tokens:
        raise ValueError("enter a number of tokens above 0")
    limits = parse_limits(text)
    limits[family] = tokens
    return limits_to_text(limits)


def mode_note(auth_mode: str) -> str:
    """What the Admin tab can do in this access mode (user tokens exist only in user_token mode)."""
    if auth_mode == "user_token":
        return "Each friend uses a personal **user token** that you create here, with its own limits."
    shared = "one shared **proxy key** (`PROXY_KEY`)" if auth_mode == "proxy_key" else "no password at all"
    return (
        f"This proxy runs with {shared}, so personal user tokens are not used: tokens made here would "
        "be refused. To hand out personal tokens with their own limits, set `GATEKEEPER=user_token` "
        "(with `ADMIN_KEY`) and restart. Here you can re-check the provider keys and back up the usage."
    )


def _positive_int(value: Any, name: str) -> int | None:
    if value in (None, ""):
        return None
    number = float(value)
    if number < 0 or number != int(number):
        raise ValueError(f"{name}: expected a whole number ≥ 0")
    return int(number)


def user_body(
    *,
    nickname: str | None = None,
    user_type: str | None = None,
    limits_text: str | None = None,
    max_ips: Any = None,
    expires_hours: Any = None,
    now: float | None = None,
) -> dict[str, Any]:
    """A create/patch body holding only the fields the admin filled in."""
    body: dict[str, Any] = {}
    if nickname and nickname.strip():
        body["nickname"] = nickname.strip()[:80]
    if user_type:
        if user_type not in USER_TYPES:
            raise ValueError(f"type must be one of {', '.join(USER_TYPES)}")
        body["type"] = user_type
    if limits_text and limits_text.strip():
        body["token_limits"] = parse_limits(limits_text)
    ips = _positive_int(max_ips, "max IPs")
    if ips:  # empty or 0 leaves the server's default
        body["max_ips"] = ips
    hours = 0.0 if expires_hours in (None, "") else float(expires_hours)
    if hours < 0:
        raise ValueError("expires in: expected a positive number of hours")
    if hours:  # empty or 0 means no expiry (or unchanged)
        body["expires_at"] = (time.time() if now is None else now) + hours * 3600
    return body


def limits_to_text(limits: Any) -> str:
    if not isinstance(limits, dict):
        return ""
    return ", ".join(f"{family}={value}" for family, value in limits.items())


def failure(result: ApiResult, action: str) -> str:
    """An escaped message for a failed admin call; the server's own words when it has some."""
    if result.status == 401:
        return "Wrong admin key."
    if result.status == 404 and action == "unlock":
        return "The admin API is not available on this server."
    if result.status == 0:
        return f"Could not {action}: {describe_error(0, result.data)}"
    return f"Could not {action} ({result.status}): {esc(error_message(result.data))}"


def pick_token(tokens: list[str], row_index: int | None, masked: str | None) -> str | None:
    """The full token behind a selected (masked) row; None when it is ambiguous."""
    if masked:
        matches = [t for t in tokens if mask_token(t) == masked]
        if len(matches) == 1:
            return matches[0]
    if row_index is not None and 0 <= row_index < len(tokens):
        token = tokens[row_index]
        if masked is None or mask_token(token) == masked:
            return token
    return None


def user_path(token: str) -> str:
    return f"{ADMIN_PREFIX}/users/{quote(token.strip(), safe='')}"


class AdminAPI:
    """Thin async wrapper over the admin HTTP API; each method takes the typed admin key."""

    def __init__(self, ctx: UIContext, request: Any = None) -> None:
        self.ctx = ctx
        self.request = request  # the visitor's gr.Request: their IP is forwarded

    async def _call(self, key: str, method: str, path: str, body: Any = None) -> ApiResult:
        if not (key or "").strip():
            return ApiResult(401, {"error": {"message": "enter the admin key first"}})
        return await call_json(self.ctx, method, path, credential=key, json_body=body, request=self.request)

    async def list_users(self, key: str) -> ApiResult:
        return await self._call(key, "GET", f"{ADMIN_PREFIX}/users")

    async def create_user(self, key: str, body: dict) -> ApiResult:
        return await self._call(key, "POST", f"{ADMIN_PREFIX}/users", body)

    async def get_user(self, key: str, token: str) -> ApiResult:
        return await self._call(key, "GET", user_path(token))

    async def update_user(self, key: str, token: str, body: dict) -> ApiResult:
        return await self._call(key, "PATCH", user_path(token), body)

    async def delete_user(self, key: str, token: str) -> ApiResult:
        return await self._call(key, "DELETE", user_path(token))

    async def export(self, key: str) -> ApiResult:
        return await self._call(key, "GET", f"{ADMIN_PREFIX}/export")

    async def import_(self, key: str, data: Any) -> ApiResult:
        return await self._call(key, "POST", f"{ADMIN_PREFIX}/import", data)

    async def recheck_keys(self, key: str) -> ApiResult:
        return await self._call(key, "POST", f"{ADMIN_PREFIX}/keys/recheck")
