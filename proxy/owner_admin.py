"""The owner's admin routes, added to /admin/api behind the same admin-key check.

GET/PUT /ip-rules: the IP blacklist and admin whitelist, edited at run time and persisted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from proxy.access.cidr import CidrSet, split_list
from proxy.admin import AdminError, _json_body
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

    return extend
