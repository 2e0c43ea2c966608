"""The owner's admin routes, added to /admin/api behind the same admin-key check.

GET/PUT /ip-rules: the IP blacklist and admin whitelist, edited at run time and persisted.
GET /events?user=<token>&limit=N: a user's recent events, newest first (EVENT_LOGGING).
GET /stats?format=json|csv|md&anonymise=true&days=N: usage statistics from the event log."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from proxy.access.cidr import CidrSet, split_list
from proxy.admin import AdminError, _json_body
from proxy.eventlog import MAX_EVENTS_PAGE, label_users, to_csv, to_markdown
from proxy.owner import Owner

log = logging.getLogger("proxy.admin")

MAX_RULES = 10_000


def _entries(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = split_list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdminError(400, f"{name} must be a list of CIDR ranges or a comma-separated string.", "invalid_request")
    if len(value) > MAX_RULES:
        raise AdminError(400, f"{name} may hold at most {MAX_RULES} entries.", "invalid_request")
    return value


def owner_routes(owner: Owner, client_ip: Callable[[Request], str]) -> Callable[[APIRouter], None]:
    def extend(router: APIRouter) -> None:
        @router.get("/controls")
        async def controls() -> JSONResponse:
            return JSONResponse(owner.summary())

        @router.get("/ip-rules")
        async def get_rules() -> JSONResponse:
            return JSONResponse(owner.rules.snapshot())

        @router.put("/ip-rules")
        async def put_rules(request: Request) -> JSONResponse:
            body = await _json_body(request)
            if not isinstance(body, dict):
                raise AdminError(400, 'Expected {"ip_blacklist": [...], "admin_whitelist": [...]}.', "invalid_request")
            black = _entries(body.get("ip_blacklist"), "ip_blacklist")
            white = _entries(body.get("admin_whitelist"), "admin_whitelist")
            try:
                new_black = CidrSet(black) if black is not None else owner.rules.blacklist
                new_white = CidrSet(white) if white is not None else owner.rules.whitelist
            except ValueError as exc:
                raise AdminError(400, str(exc), "invalid_request") from None
            me = client_ip(request)
            if me in new_black or (new_white and me not in new_white):
                raise AdminError(
                    400, f"These rules would lock you ({me}) out of the admin API; nothing was changed.",
                    "invalid_request",
                )
            owner.rules.replace(blacklist=black, whitelist=white)
            log.info("admin: IP rules now %d blocked, %d admin ranges", len(new_black), len(new_white))
            return JSONResponse(owner.rules.snapshot())

        def quotas() -> Any:
            if owner.quotas is None:
                raise AdminError(404, "Quotas need GATEKEEPER=user_token.", "not_found")
            return owner.quotas

        @router.post("/quotas/reset-all")
        async def reset_all() -> JSONResponse:
            count = quotas().reset_all()
            log.info("admin: reset the token counts of %d users", count)
            return JSONResponse({"reset": count})

        @router.post("/users/{token}/refresh-quota")
        async def refresh_one(token: str) -> JSONResponse:
            refresher = quotas()
            user = owner.users.get(token) if owner.users is not None else None
            if user is None:
                raise AdminError(404, "No user has this token.", "not_found")
            await asyncio.to_thread(refresher.refresh_one, user)  # with Postgres, a round trip
            log.info("admin: refreshed the quota of %s", user.label)
            return JSONResponse(user.record())

        def event_log() -> Any:
            if owner.events is None:
                raise AdminError(404, "The event log is off: set EVENT_LOGGING=true and restart.", "not_found")
            return owner.events

        @router.get("/events")
        async def events(user: str = "", limit: int = 50) -> JSONResponse:
            log_ = event_log()
            if not 1 <= limit <= MAX_EVENTS_PAGE:
                raise AdminError(400, f"limit must be between 1 and {MAX_EVENTS_PAGE}.", "invalid_request")
            subject = log_.subject(user.strip(), "") if user.strip() else None
            return JSONResponse({"events": log_.recent(subject, limit)})

        @router.get("/stats")
        async def stats(format: str = "json", anonymise: bool = False, days: float = 0) -> Any:
            log_ = event_log()
            if format not in ("json", "csv", "md"):
                raise AdminError(400, "format must be json, csv or md.", "invalid_request")
            since = time.time() - days * 86400 if days > 0 else None
            rows = label_users(log_.stats(since), owner.user_names(), anonymise)
            if format == "csv":
                return PlainTextResponse(to_csv(rows), media_type="text/csv")
            if format == "md":
                return PlainTextResponse(to_markdown(rows), media_type="text/markdown")
            return JSONResponse({"stats": rows})

    return extend
