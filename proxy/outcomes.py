"""How each request ends, for the client and the owner: the usage accounted and committed, refusals
counted (and why), errors in the client's shape (upstream ones redacted), metrics and the log line.
A part of the `Pipeline` (a mixin: it uses the pipeline's gatekeeper, ledger, queue and redactor)."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from proxy import error_chat
from proxy.access.gatekeeper import Admission
from proxy.body import read_json
from proxy.client import ClientGone
from proxy.errors import DEPENDENCY_DOWN, SHAPES, Kind, ProxyError
from proxy.logs import log_safe
from proxy.store import StoreError
from proxy.upstream import UpstreamReply
from proxy.usage import Usage, UsageEvent

if TYPE_CHECKING:
    from proxy.pipeline import _Ctx

log = logging.getLogger("proxy.access")


STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Outcomes:
    """How the `Pipeline`'s requests end."""

    # Helpers -----------------------------------------------------------------------------------
    async def _committed(self) -> None:
        """Wait until the usage just accounted is durable (a no-op where writes commit at once)."""
        if self.durable is None:
            return
        try:
            await self.durable()
        except StoreError:
            raise _dependency_down() from None

    def _account(self, ctx: _Ctx, admission: Admission, usage: Usage, status: int, *, charge: bool = False) -> None:
        ctx.usage, ctx.accounted = usage, True
        queue_ms = ctx.queue_ms
        if ctx.ticket is not None:
            self.queue.done(ctx.ticket)  # the key is free for the next in line
        if 200 <= status < 300 or status == 499 or charge:
            self.gatekeeper.settle(admission, usage)
        else:
            self.gatekeeper.release(admission)
        self.ledger.record(_event(ctx, status, usage, key_id=ctx.key_id, queue_ms=queue_ms))

    def _count_refusal(
        self, ctx: _Ctx, error: ProxyError | None, status: int = 0, *, outcome: str | None = None
    ) -> None:
        """Every request that ends here is counted: refused by the proxy (and why), failed
        upstream, or cancelled (the client left first). Model lists and paths off the allow-list
        are not requests for work."""
        if ctx.endpoint is None or ctx.endpoint.kind in ("models", "model"):
            return
        if ctx.accounted:  # counted when it was served, before its commit failed: once
            return
        if outcome is None:
            outcome = refusal_reason(error, identified=ctx.user is not None) if error is not None else "failed"
        status = error.status if error is not None else status
        self.ledger.record(_event(ctx, status, Usage(), outcome=outcome, queue_ms=ctx.queue_ms))

    async def _refusal_response(self, request: Request, ctx: _Ctx, shape: str, error: ProxyError) -> Response:
        """The error in the client's shape; with ERRORS_AS_CHAT, a refusal of a chat request is a
        normal 200 reply (streamed if asked) whose text is the error, marked by a header."""
        kind = ctx.endpoint.kind if ctx.endpoint is not None else None
        if not (self.errors_as_chat and error_chat.applies(error, kind)):
            return self.error_response(shape, error)
        payload = ctx.payload
        if payload is None:  # refused before the body was read (a wrong key): read it, bounded
            try:
                payload, _ = await read_json(request, self.max_body_bytes)
            except (ProxyError, ClientGone):
                payload = {}
        model = payload.get("model") if isinstance(payload.get("model"), str) else ""
        text = self.redact(error_chat.error_text(error))
        headers = error_chat.headers_for(error)
        if payload.get("stream") is True:
            events = error_chat.stream_events(kind or "chat", model[:200], text)
            return Response(events, 200, headers={**headers, **STREAM_HEADERS}, media_type="text/event-stream")
        body = json.dumps(error_chat.completion(kind or "chat", model[:200], text))
        return Response(body, 200, headers=headers, media_type="application/json")

    def _observe(self, ctx: _Ctx, status: int) -> None:
        usage = ctx.usage
        if ctx.user_token is not None:
            user = self.gatekeeper.users.current(ctx.user_token) if self.gatekeeper.users is not None else None
            user_type = user.type if user is not None else "unknown"
        else:
            user_type = {"anon": "anonymous", "proxy-key": "proxy_key"}.get(ctx.user or "", "none")
        served = ctx.key_id is not None
        assert self.metrics is not None
        self.metrics.observe(
            service=ctx.service,
            family=ctx.family or "",
            status=status,
            user_type=user_type,
            streamed=ctx.streamed,
            tokens_in=usage.tokens_in if usage and 200 <= status < 300 else 0,
            tokens_out=usage.tokens_out if usage and 200 <= status < 300 else 0,
            total_s=time.perf_counter() - ctx.started,
            upstream_s=ctx.upstream_s if served else None,
            added_s=ctx.proxy_s if served else None,
            first_byte_s=ctx.first_byte_s,
            queued_s=ctx.ticket.waited_s if ctx.ticket is not None and served else None,
        )

    def error_response(self, shape: str, error: ProxyError) -> Response:
        body = SHAPES[shape](self.redact(error.message), error.kind, error.code)
        return Response(json.dumps(body), error.status, headers=error.headers, media_type="application/json")

    def _pass_error(self, shape: str, reply: UpstreamReply) -> Response:
        """An upstream error, redacted, in the client's shape (translated if the shapes differ)."""
        body = reply.body
        if isinstance(body, dict):
            is_anthropic = body.get("type") == "error"
            if shape == "openai" and is_anthropic:
                body = self.door.error(reply.status, body)
            body = self.redact.scrub(body)
            return Response(json.dumps(body), reply.status, media_type="application/json")
        # Redacted before it is cut: a secret across the cut must not leave its first part behind.
        text = self.redact(reply.raw.decode("utf-8", errors="replace"))[:500].strip()
        message = f"The upstream answered {reply.status}" + (f": {text}" if text else ".")
        status = reply.status if reply.status >= 400 else 502
        return self.error_response(shape, ProxyError(status, message, Kind.UPSTREAM))

    def _log(self, ctx: _Ctx, status: int) -> None:
        if self.owner is not None:
            self.owner.finished(ctx, status)
        usage = ctx.usage
        if self.metrics is not None and ctx.service:
            self._observe(ctx, status)
        log.info(
            "%s %s model=%s status=%d %.0fms key=%s user=%s stream=%s tokens=%s/%s queue=%.0fms",
            ctx.method,
            log_safe(ctx.path),
            log_safe(ctx.model) if ctx.model else "-",
            status,
            (time.perf_counter() - ctx.started) * 1000,
            ctx.key_id or "-",
            ctx.user or "-",
            "yes" if ctx.streamed else "no",
            usage.tokens_in if usage else "-",
            usage.tokens_out if usage else "-",
            ctx.queue_ms,
        )


def _event(
    ctx: _Ctx, status: int, usage: Usage, *, key_id: str | None = None, outcome: str = "", queue_ms: float = 0.0
) -> UsageEvent:
    """The ledger's record of `ctx`'s request: never its prompt, never a credential."""
    return UsageEvent(
        time=time.time(),
        service=ctx.service,
        model=ctx.model or "",
        family=ctx.family or "",
        streamed=ctx.streamed,
        tokens_in=usage.tokens_in,
        tokens_out=usage.tokens_out,
        latency_ms=round((time.perf_counter() - ctx.started) * 1000, 1),
        status=status,
        key_id=key_id,
        user=ctx.user if ctx.user not in (None, "anon", "proxy-key") else None,
        cached_in=usage.cached,
        reasoning_out=usage.reasoning,
        outcome=outcome,
        queue_ms=queue_ms,
    )


def refusal_reason(error: ProxyError, *, identified: bool) -> str:
    """The ledger's outcome for a request the proxy answered with an error."""
    if error.code == DEPENDENCY_DOWN:  # whether the caller was identified yet or not
        return "refused: dependency down"
    if not identified or error.kind is Kind.AUTHENTICATION or error.code in _ACCESS_CODES:
        return "refused: wrong key"
    if error.kind in (Kind.UPSTREAM, Kind.TIMEOUT):
        return "failed"
    if error.code in _OWNER_CODES:
        return _OWNER_CODES[error.code]
    return _REASONS.get(error.kind, "refused: other")


_ACCESS_CODES = frozenset({"user_disabled", "user_expired", "too_many_ips"})
# The owner's controls (proxy/owner.py) refuse by rule, not by model: "other" here; each rule's
# own count is at /admin/api/controls.
_OWNER_CODES = dict.fromkeys(
    ("blocked_origin", "images_not_allowed", "rejected_phrase", "content_check_timeout", "context_length_exceeded"),
    "refused: other",
)
_REASONS = {
    Kind.NOT_FOUND: "refused: model",
    Kind.PERMISSION: "refused: model",  # a family this proxy does not serve
    Kind.QUOTA: "refused: quota",
    Kind.RATE_LIMIT: "refused: rate limit",
    Kind.UNAVAILABLE: "refused: no key free",
    Kind.INVALID_REQUEST: "refused: bad request",
    Kind.TOO_LARGE: "refused: bad request",
}


def _dependency_down() -> ProxyError:
    """Fail closed: nothing is served that could not be limited and accounted."""
    return ProxyError(
        503, "This proxy cannot check limits or record usage right now (its database or shared state is "
        "unavailable); try again shortly.", Kind.UNAVAILABLE, headers={"Retry-After": "5"}, code=DEPENDENCY_DOWN,
    )  # fmt: skip
