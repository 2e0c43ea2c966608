"""The admin API (users, export/import, key recheck) and each friend's own `/proxy/me`.

Every admin call needs `Authorization: Bearer <ADMIN_KEY>`. An address that keeps guessing is
locked out for a while: its wrong keys get 429, slowly; the right key still works.
Errors are `{"error": {"message", "type"}}`.
Routes are `async def`: they run on the event loop, like the request pipeline, so user
objects are never changed from two threads at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from proxy.access.gatekeeper import TARPIT_DELAY_S, TARPIT_HELD, Gatekeeper, GuessRefused, credential_from
from proxy.access.ratelimit import FailureGuard, Tarpit, network_of
from proxy.access.users import User, UserService, next_refill
from proxy.access.validation import CREATE_FIELDS, PATCH_FIELDS, UserError, parse_record
from proxy.errors import ProxyError
from proxy.store import Store, StoreError
from proxy.usage import UsageLedger

log = logging.getLogger(__name__)

EXPORT_VERSION = 1
Recheck = Callable[[], Awaitable[None] | None]


class AdminError(Exception):
    """An admin API error, rendered as JSON with `status`."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _JSONErrorRoute(APIRoute):
    """Renders AdminError (raised by a route or its dependencies) as our JSON error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except AdminError as exc:
                return exc.response()

        return handle


class MaskUserTokens(logging.Filter):
    """Masks user tokens in logged paths (`.../users/<token>`), e.g. in uvicorn's access log."""

    _PATH = re.compile(r"(/users/)([^/\s?\"']{6})[^/\s?\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self._PATH.sub(r"\1\2…", message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def _mask_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, MaskUserTokens) for f in access.filters):
        access.addFilter(MaskUserTokens())


def _peer(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def _json_body(request: Request, *, default: Any = None) -> Any:
    raw = await request.body()
    if not raw.strip():
        if default is not None:
            return default
        raise AdminError(400, "The request needs a JSON body.", "invalid_request")
    try:
        return json.loads(raw)
    except ValueError:
        raise AdminError(400, "The request body is not valid JSON.", "invalid_request") from None


def _invalid(exc: UserError) -> AdminError:
    return AdminError(400, str(exc), "invalid_request")


def admin_router(
    users: UserService,
    *,
    admin_key: str,
    store: Store | None = None,
    ledger: UsageLedger | None = None,
    recheck: Recheck | None = None,
    guard: FailureGuard | None = None,
    client_ip: Callable[[Request], str] = _peer,
    clock: Callable[[], float] = time.time,
    extend: Callable[[APIRouter], None] | None = None,
) -> APIRouter:
    """Routes to mount at `/admin/api`; `extend` adds more routes behind the same admin check.

    `store` and `ledger` let export/import carry the usage totals; `recheck` starts a check of
    every upstream key; `client_ip` names the client for the guessing lockout (behind a proxy,
    pass the pipeline's X-Forwarded-For aware function)."""
    _mask_access_log()
    guard = guard or FailureGuard(limit=10, window_s=300, lockout_s=300, clock=clock)
    tarpit = Tarpit(TARPIT_DELAY_S, TARPIT_HELD, clock)
    key_digest = _digest(admin_key) if admin_key else None
    pending: set[asyncio.Future] = set()

    async def authorize(request: Request) -> None:
        if key_digest is None:
            raise AdminError(503, "The admin API is off: set ADMIN_KEY and restart.", "unavailable")
        supplied = credential_from(request.headers)
        if supplied is not None and hmac.compare_digest(_digest(supplied), key_digest):
            return  # the right key works even from an address locked out for guessing
        client = network_of(client_ip(request))
        locked = guard.retry_after(client) is not None  # the guess that starts a lockout gets its 401
        guard.failed(client)
        log.warning("admin: rejected a wrong or missing key from %s", client)
        wait = guard.retry_after(client)
        if locked and wait is not None:
            await asyncio.sleep(tarpit.delay(client))
            raise AdminError(
                429,
                f"Too many wrong admin keys from this address; wrong keys are refused for {wait} s.",
                "rate_limit",
                {"Retry-After": str(wait)},
            )
        raise AdminError(
            401,
            "This needs the admin key: send 'Authorization: Bearer <ADMIN_KEY>'.",
            "authentication",
            {"WWW-Authenticate": "Bearer"},
        )

    router = APIRouter(route_class=_JSONErrorRoute, dependencies=[Depends(authorize)])

    async def committed() -> None:
        """A change is answered once durable (Postgres commits in the background), so every
        instance sees it as soon as the admin does."""
        if store is None:
            return
        try:
            await store.committed()
        except StoreError as exc:
            raise AdminError(503, f"{exc} The change is applied when the database is back.", "unavailable") from None

    def user_or_404(token: str) -> User:
        user = users.get(token)
        if user is None:
            raise AdminError(404, "No user has this token.", "not_found")
        return user

    @router.post("/users", status_code=201)
    async def create_user(request: Request) -> JSONResponse:
        body = await _json_body(request, default={})
        try:
            user = users.create(**parse_record(body, allowed=CREATE_FIELDS))
        except UserError as exc:
            raise _invalid(exc) from None
        await committed()
        log.info("admin: created user %s (%s)", user.label, user.type)
        return JSONResponse(user.record(), status_code=201)

    @router.get("/users")
    async def list_users() -> JSONResponse:
        return JSONResponse({"users": [u.record() for u in users.all()]})

    @router.get("/users/{token}")
    async def get_user(token: str) -> JSONResponse:
        return JSONResponse(user_or_404(token).record())

    @router.patch("/users/{token}")
    async def patch_user(token: str, request: Request) -> JSONResponse:
        user_or_404(token)
        body = await _json_body(request)
        try:
            user = users.update(token, parse_record(body, allowed=PATCH_FIELDS))
        except UserError as exc:
            raise _invalid(exc) from None
        await committed()
        log.info("admin: updated user %s (%s)", user.label, ", ".join(sorted(body)))
        return JSONResponse(user.record())

    @router.delete("/users/{token}", status_code=204)
    async def delete_user(token: str) -> Response:
        user = user_or_404(token)
        users.delete(token)
        await committed()
        log.info("admin: deleted user %s", user.label)
        return Response(status_code=204)

    @router.get("/export")
    async def export() -> JSONResponse:
        by_family, by_key = store.usage_totals() if store is not None else ({}, {})
        return JSONResponse(
            {
                "version": EXPORT_VERSION,
                "exported_at": clock(),
                "users": users.export_records(),
                "usage": {"by_family": by_family, "by_key": by_key},
            }
        )

    @router.post("/import")
    async def import_(request: Request) -> JSONResponse:
        body = await _json_body(request)
        records, usage = _import_parts(body)
        try:
            count = users.import_records(records)
        except UserError as exc:
            raise _invalid(exc) from None
        if usage and store is not None:
            store.set_usage_totals(usage.get("by_family") or {}, usage.get("by_key") or {})
            if ledger is not None:
                ledger.restore(*store.usage_totals())
        await committed()
        log.info("admin: imported %d users", count)
        return JSONResponse({"imported": count})

    @router.post("/keys/recheck", status_code=202)
    async def recheck_keys() -> JSONResponse:
        if recheck is None:
            raise AdminError(503, "Key checking is not available on this proxy.", "unavailable")
        result = recheck()
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            pending.add(task)
            task.add_done_callback(_finished(pending))
        log.info("admin: key recheck started")
        return JSONResponse({"status": "recheck started"}, status_code=202)

    if extend is not None:
        extend(router)
    return router


def _finished(pending: set[asyncio.Future]) -> Callable[[asyncio.Future], None]:
    def done(task: asyncio.Future) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("admin: key recheck failed: %s", type(task.exception()).__name__)

    return done


def _import_parts(body: Any) -> tuple[list, dict]:
    """The users and usage of an export; a bare list is taken as users."""
    if isinstance(body, list):
        return body, {}
    if not isinstance(body, dict) or not isinstance(body.get("users", []), list):
        raise AdminError(400, 'Expected an export: {"users": [...], "usage": {...}}.', "invalid_request")
    usage = body.get("usage") or {}
    if not isinstance(usage, dict) or not all(
        isinstance(usage.get(k, {}), dict) and _valid_totals(usage.get(k, {})) for k in ("by_family", "by_key")
    ):
        raise AdminError(
            400, 'usage must be {"by_family": {...}, "by_key": {...}} of whole-number counters.', "invalid_request"
        )
    return body.get("users", []), usage


def _valid_totals(totals: dict) -> bool:
    return all(
        isinstance(counts, dict)
        and all(
            isinstance(counts.get(k, 0), int) and counts.get(k, 0) >= 0 for k in ("requests", "tokens_in", "tokens_out")
        )
        for counts in totals.values()
    )


def me_router(
    gatekeeper: Gatekeeper,
    *,
    client_ip: Callable[[Request], str] = _peer,
    clock: Callable[[], float] = time.time,
) -> APIRouter:
    """`GET /proxy/me`: a friend's own user, token masked, with quota left per family.

    Under the same guessing lockout as the proxy routes. Include it before the pipeline's
    catch-all `/proxy/{path}` route."""
    router = APIRouter(route_class=_JSONErrorRoute)

    @router.get("/proxy/me")
    async def me(request: Request) -> JSONResponse:
        if gatekeeper.users is None:
            raise AdminError(404, "This proxy does not use per-user tokens.", "not_found")
        try:
            user = gatekeeper.user_for(credential_from(request.headers), client_ip(request))
        except ProxyError as exc:
            if isinstance(exc, GuessRefused):
                await asyncio.sleep(exc.delay)
            kind = "rate_limit" if exc.status == 429 else "authentication"
            raise AdminError(exc.status, exc.message, kind, exc.headers) from None
        if user is None:
            raise AdminError(401, "Send your user token as 'Authorization: Bearer <token>'.", "authentication")
        return JSONResponse(_own_view(gatekeeper, user, clock()))

    return router


def _own_view(gatekeeper: Gatekeeper, user: User, now: float) -> dict:
    period = gatekeeper.users.refresh_period if gatekeeper.users else ""
    quota = {}
    for family, limit in sorted(user.token_limits.items()):
        used = user.token_counts.get(family, 0)
        held = gatekeeper.reserved(user, family)
        quota[family] = {"limit": limit, "used": used, "in_progress": held, "remaining": max(limit - used - held, 0)}
    return {
        "token": user.token[:6] + "…",
        "nickname": user.nickname,
        "type": user.type,
        "created_at": user.created_at,
        "last_used_at": user.last_used_at,
        "disabled": user.disabled,
        "disabled_reason": user.disabled_reason,
        "expires_at": user.expires_at,
        "token_limits": dict(user.token_limits),
        "token_counts": dict(user.token_counts),
        "prompt_count": user.prompt_count,
        "ip_count": gatekeeper.networks_in_window(user),
        "max_ips": gatekeeper.ip_limit(user),
        "quota": quota,
        "requests_in_progress": gatekeeper.in_flight(user),
        "concurrency_limit": 0 if user.exempt else gatekeeper.concurrency,
        "quota_exempt": user.exempt,
        "quota_refresh": period or None,
        "quota_refills_at": next_refill(period, now),
    }
