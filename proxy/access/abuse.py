"""Abuse controls checked before any upstream call: IP blacklist and admin whitelist, blocked
origins, rejected phrases and image inputs. Each is off unless its setting is set.

Cheap by construction: CIDR lookups cost one set lookup per prefix length; origin checks a few
substring tests; phrase checks run in a small worker pool with a hard time budget, so a
pathological pattern can neither stall the event loop nor hold a thread for long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import regex

from proxy.access.cidr import CidrSet, split_list
from proxy.config import Settings
from proxy.errors import Kind, ProxyError

log = logging.getLogger("proxy.access")

# Phrase checks: first on the event loop for at most INLINE_S (the common case: microseconds, no
# thread hop, which under load waits for the GIL); a check that needs longer moves to one of
# PHRASE_WORKERS threads, and the request is answered within PHRASE_BUDGET_S in all.
PHRASE_BUDGET_S = 0.25
PHRASE_INLINE_S = 0.002
PHRASE_WORKERS = 2
VERDICT_CACHE = 65_536  # addresses whose blacklist verdict is remembered (until the list changes)
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
GEMINI_DATA_KEYS = ("inlineData", "inline_data", "fileData", "file_data")
_RULES_TABLE = "CREATE TABLE IF NOT EXISTS owner_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);"


class IpRules:
    """IP_BLACKLIST (refused everywhere) and ADMIN_WHITELIST (alone may reach the admin API).

    Both start from the settings and can be replaced at run time; a replacement is saved in the
    store and wins over the settings from then on, across restarts."""

    def __init__(self, blacklist: Iterable[str] = (), whitelist: Iterable[str] = (), store: Any = None) -> None:
        self._store = store
        if store is not None:
            store.execute(_RULES_TABLE, None)
        self.blacklist = CidrSet(self._saved("ip_blacklist", blacklist))
        self.whitelist = CidrSet(self._saved("admin_whitelist", whitelist))
        self._blocked: dict[str, bool] = {}  # address -> verdict; parsing an address costs more than the lookup

    @classmethod
    def from_settings(cls, settings: Settings, store: Any = None) -> IpRules:
        return cls(split_list(settings.ip_blacklist), split_list(settings.admin_whitelist), store)

    def _saved(self, name: str, default: Iterable[str]) -> list[str]:
        if self._store is not None:
            rows = self._store.query("SELECT value FROM owner_settings WHERE name = ?", (name,))
            if rows:
                return split_list(rows[0][0])
        return list(default)

    def blocked(self, ip: str) -> bool:
        if not self.blacklist:
            return False
        verdict = self._blocked.get(ip)
        if verdict is None:
            if len(self._blocked) >= VERDICT_CACHE:
                self._blocked.clear()
            verdict = self._blocked[ip] = ip in self.blacklist
        return verdict

    def admin_allowed(self, ip: str) -> bool:
        """An empty whitelist lets every address through; the blacklist is checked separately."""
        return not self.whitelist or ip in self.whitelist

    def replace(self, *, blacklist: Iterable[str] | None = None, whitelist: Iterable[str] | None = None) -> None:
        """Replace one or both lists (raises ValueError naming a bad entry; nothing changes then)."""
        new_black = CidrSet(blacklist) if blacklist is not None else self.blacklist
        new_white = CidrSet(whitelist) if whitelist is not None else self.whitelist
        for name, cidrs in (("ip_blacklist", new_black), ("admin_whitelist", new_white)):
            if self._store is not None:
                self._store.execute(
                    "INSERT OR REPLACE INTO owner_settings (name, value) VALUES (?, ?)", (name, ",".join(cidrs.entries))
                )
        self.blacklist, self.whitelist = new_black, new_white
        self._blocked = {}

    def snapshot(self) -> dict:
        return {"ip_blacklist": self.blacklist.entries, "admin_whitelist": self.whitelist.entries}


class PhraseFilter:
    """REJECT_PHRASES: regular expressions (case-insensitive) no prompt may match."""

    def __init__(self, phrases: Iterable[str], budget_s: float | None = None) -> None:
        self.patterns = [regex.compile(p, regex.IGNORECASE) for p in phrases]
        self.budget_s = PHRASE_BUDGET_S if budget_s is None else budget_s
        self._pool = ThreadPoolExecutor(PHRASE_WORKERS, thread_name_prefix="reject-phrases") if self.patterns else None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    async def match(self, text: str) -> bool | None:
        """True if a pattern matches, False if none does, None if the budget ran out first."""
        if not self.patterns or not text:
            return False
        inline = self._inline(text)
        if inline is not None:
            return inline
        deadline = time.monotonic() + self.budget_s
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._pool, self._search, text, deadline)
        try:
            # The regex module's own timeout overshoots under CPU contention (measured up to 3x):
            # the answer waits no longer than the budget; the worker stops at its own timeout.
            return await asyncio.wait_for(work, self.budget_s)
        except TimeoutError:
            return None

    def _inline(self, text: str) -> bool | None:
        """Every pattern on the loop, each for at most PHRASE_INLINE_S; None if one ran out."""
        for pattern in self.patterns:
            try:
                if pattern.search(text, timeout=PHRASE_INLINE_S) is not None:
                    return True
            except TimeoutError:
                return None
        return False

    def _search(self, text: str, deadline: float) -> bool | None:
        for pattern in self.patterns:
            left = deadline - time.monotonic()  # time queued for a worker counts too
            if left <= 0:
                return None
            try:
                # concurrent=True releases the GIL while matching: the event loop keeps running.
                if pattern.search(text, timeout=left, concurrent=True) is not None:
                    return True
            except TimeoutError:
                return None
        return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class AbuseControls:
    """The checks the pipeline calls: `check_origin` before identifying the caller, `check_payload`
    once the body is read. Both raise ProxyError in the client's shape."""

    def __init__(self, settings: Settings, rules: IpRules) -> None:
        self.rules = rules
        self.origins = settings.origin_blocks
        self.block_message = settings.block_message
        self.phrases = PhraseFilter(settings.reject_patterns)
        self.reject_message = settings.reject_message
        self.vision = settings.vision_services
        self.refused: dict[str, int] = {}  # why -> count, shown to the owner

    def _refuse(self, why: str, status: int, message: str, kind: Kind, code: str) -> ProxyError:
        self.refused[why] = self.refused.get(why, 0) + 1
        return ProxyError(status, message, kind, code=code)

    def check_origin(self, headers: Any) -> None:
        """BLOCKED_ORIGINS: a browser page on a listed site (Origin or Referer) is refused."""
        if not self.origins:
            return
        origin = (headers.get("origin") or "")[:512].lower()
        referer = (headers.get("referer") or "")[:512].lower()
        if not origin and not referer:
            return
        for block in self.origins:
            if block in origin or block in referer:
                log.warning("access: refused a request from a blocked origin (%s)", block)
                raise self._refuse("blocked_origin", 403, self.block_message, Kind.PERMISSION, "blocked_origin")

    async def check_payload(self, service: str, payload: dict, exempt: bool) -> None:
        """Image inputs where ALLOWED_VISION_SERVICES does not list `service`, then REJECT_PHRASES."""
        vision = self.vision
        if vision is not None and not exempt and service not in vision and has_image(payload):
            raise self._refuse(
                "image_input",
                403,
                "Prompts containing images are not allowed on this proxy for this service. "
                "Turn off sending images in your client and try again.",
                Kind.PERMISSION,
                "images_not_allowed",
            )
        if self.phrases:
            found = await self.phrases.match(prompt_text(payload))
            if found is None:
                log.warning("access: the reject-phrase check ran out of time; the request is refused")
                raise self._refuse(
                    "phrase_timeout",
                    400,
                    "This prompt could not be checked against this proxy's content rules in time; shorten it.",
                    Kind.INVALID_REQUEST,
                    "content_check_timeout",
                )
            if found:
                log.warning("access: refused a prompt that matches a reject phrase")
                raise self._refuse("rejected_phrase", 400, self.reject_message, Kind.INVALID_REQUEST, "rejected_phrase")

    def close(self) -> None:
        self.phrases.close()


def _texts(value: Any, out: list[str], depth: int = 0) -> None:
    """Collect the text of a message content, system prompt or prompt (string or list of parts)."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list) and depth < 3:
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict):
                text = item.get("text")
                if isinstance(text, str):
                    out.append(text)
                elif "content" in item:
                    _texts(item["content"], out, depth + 1)


def prompt_text(payload: dict) -> str:
    """Every piece of prompt text in a chat, messages, completions or embeddings request."""
    out: list[str] = []
    for name in ("system", "prompt", "input", "instructions"):
        _texts(payload.get(name), out)
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                _texts(message.get("content"), out)
    for turn in _gemini_turns(payload):  # Gemini: contents[].parts[].text, systemInstruction.parts
        _texts(turn.get("parts"), out)
    return "\n".join(out)


def _gemini_turns(payload: dict) -> list[dict]:
    turns = payload.get("contents")
    found = [t for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
    for name in ("systemInstruction", "system_instruction"):
        if isinstance(payload.get(name), dict):
            found.append(payload[name])
    return found


def _has_image_part(content: Any, depth: int = 0) -> bool:
    if not isinstance(content, list) or depth > 2:
        return False
    for part in content:
        if isinstance(part, dict):
            if part.get("type") in IMAGE_PART_TYPES:
                return True
            if _has_image_part(part.get("content"), depth + 1):  # Anthropic tool results hold images too
                return True
    return False


def has_image(payload: dict) -> bool:
    """Whether a chat or messages request carries an image (OpenAI image_url, Anthropic image)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and _has_image_part(message.get("content")):
                return True
    if _has_image_part(payload.get("input")):
        return True
    for turn in _gemini_turns(payload):  # Gemini: inline or file data with an image MIME type
        for part in turn.get("parts") or () if isinstance(turn.get("parts"), list) else ():
            if not isinstance(part, dict):
                continue
            for key in GEMINI_DATA_KEYS:
                data = part.get(key)
                mime = data.get("mimeType") or data.get("mime_type") if isinstance(data, dict) else None
                if isinstance(mime, str) and mime.lower().startswith("image/"):
                    return True
    return False


def ip_gate(rules: IpRules, client_ip: Any, shape_for: Any, refused: dict[str, int] | None = None) -> Any:
    """An ASGI pre-check for the whole app (proxy, page, admin API): a blacklisted address gets a
    403 everywhere; only whitelisted addresses reach /admin/. Returns the refusal, or None."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse

    from proxy.errors import SHAPES

    counts = refused if refused is not None else {}

    def gate(scope: dict) -> Any:
        if not rules.blacklist and not rules.whitelist:
            return None
        ip = client_ip(Request(scope))
        path: str = scope.get("path", "")
        if rules.blocked(ip):
            counts["ip_blacklist"] = counts.get("ip_blacklist", 0) + 1
            message = "This address is blocked from this proxy."
            if path.startswith("/proxy/"):
                shape = shape_for(scope.get("raw_path") or path.encode())
                return JSONResponse(SHAPES[shape](message, Kind.PERMISSION, "ip_blocked"), 403)
            if path.startswith("/admin/"):
                return JSONResponse({"error": {"message": message, "type": "permission"}}, 403)
            return PlainTextResponse(message, 403)
        if path.startswith("/admin/") and not rules.admin_allowed(ip):
            counts["admin_whitelist"] = counts.get("admin_whitelist", 0) + 1
            message = "The admin API is not open to this address (ADMIN_WHITELIST)."
            return JSONResponse({"error": {"message": message, "type": "permission"}}, 403)
        return None

    return gate
