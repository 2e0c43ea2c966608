"""The one request path: route, identify, validate, limit, pick a key, forward, relay, account."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy import jsonx, upstream
from proxy.access.gatekeeper import Admission, Gatekeeper, GuessRefused, credential_from, hashed
from proxy.access.queue import QueueFull, QueueTimeout, RequestQueue, Ticket
from proxy.body import read_json
from proxy.client import ClientGone, unless_client_leaves
from proxy.errors import Kind, ProxyError, Redactor
from proxy.families import family_of, is_allowed
from proxy.keys.pool import Key, KeyPool, Outcome, Verdict
from proxy.limits import RequestLimits, check_model
from proxy.logs import log_safe
from proxy.metrics import Metrics
from proxy.model_routes import ModelRoutes
from proxy.outcomes import STREAM_HEADERS, Outcomes, _dependency_down
from proxy.providers.anthropic.door import Door
from proxy.providers.base import Call, Dialect, Endpoint
from proxy.relay import ClientStream, DirectRelay, RelayResponse, Unacknowledged
from proxy.routing import Router
from proxy.upstream import UpstreamReply
from proxy.usage import Usage, UsageLedger, estimate_tokens
from proxy.waiting import WaitingStreams

log = logging.getLogger("proxy.access")

# The upstream itself unreachable this many times: every key would fail the same way.
MAX_UNREACHABLE = 3
# A request the upstream refused for a parameter it names is fixed and retried, once per parameter.
MAX_REVISIONS = 3
# Bodies this large are walked, translated and encoded in a worker thread, off the event loop.
OFFLOAD_BYTES = 256 * 1024
# Browser clients (RisuAI, web front-ends) call the proxy directly. Credentials travel in
# headers, never cookies, so any origin may call.
CORS_PREFLIGHT = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, OPTIONS",
    "access-control-allow-headers": "authorization, content-type, x-api-key, anthropic-version, anthropic-beta, "
    "anthropic-dangerous-direct-browser-access, x-stainless-os, x-stainless-lang, x-stainless-package-version, "
    "x-stainless-runtime, x-stainless-runtime-version, x-stainless-arch, x-stainless-retry-count, "
    "x-stainless-timeout, x-stainless-helper-method, openai-beta, x-goog-api-key, x-goog-api-client",
    "access-control-max-age": "86400",
}


@dataclass
class Service:
    """One configured upstream: its dialect, base URL (from configuration only) and key pool."""

    dialect: Dialect
    base_url: str
    pool: KeyPool
    key_env: str
    cached_models: set[str] | None = None
    family_filter: set[str] = field(default_factory=set)
    models_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    check: Any = None  # the key check (proxy.keys.checker.CheckFn) of services in provider folders


@dataclass
class Upstream:
    """A successful upstream reply and the key that got it."""

    response: aiohttp.ClientResponse
    key: Key
    waited_s: float = 0.0  # for the response headers


class Pipeline(WaitingStreams, ModelRoutes, Outcomes):
    """The request path. Its parts by job: here, routing to forwarding and relaying; the wait of a
    streamed request (proxy/waiting.py), the model lists (proxy/model_routes.py), and how each
    request ends: accounted, counted, answered and logged (proxy/outcomes.py)."""

    def __init__(
        self,
        services: dict[str, Service],
        gatekeeper: Gatekeeper,
        ledger: UsageLedger,
        redactor: Redactor,
        session_factory: Any,
        *,
        max_body_bytes: int,
        retry_budget: float,
        client_ip: Callable[[Request], str],
        default_max_tokens: int = 4096,
        limits: RequestLimits | None = None,
        max_reply_bytes: int = 64_000_000,
        errors_as_chat: bool = False,
        queue: RequestQueue | None = None,
        heartbeat: float = 0.0,
        owner: Any = None,
        durable: Callable[[], Awaitable[None]] | None = None,
        unavailable: Callable[[], str | None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.services = services
        self.router = Router({name: s.dialect for name, s in services.items()})
        self.gatekeeper = gatekeeper
        self.ledger = ledger
        self.redact = redactor
        self._session = session_factory
        self.max_body_bytes = max_body_bytes
        self.retry_budget = retry_budget
        self.client_ip = client_ip
        self.door = Door(default_max_tokens)
        self.queue = queue or RequestQueue({name: s.pool for name, s in services.items()})
        self.heartbeat = heartbeat  # HEARTBEAT_INTERVAL: SSE comments while a stream waits or is silent
        self.limits = limits or RequestLimits()
        self.max_reply_bytes = max_reply_bytes
        self.errors_as_chat = errors_as_chat  # ERRORS_AS_CHAT: refusals answered as a chat reply
        self.owner = owner  # the owner's controls (proxy/owner.py), or None
        # Shared state (proxy/state): `durable` resolves once this request's usage is committed;
        # `unavailable` names a dependency that is down, so requests fail closed.
        self.durable = durable
        self.unavailable = unavailable
        self.metrics = metrics

    def serves(self, method: str, raw_path: bytes) -> bool:
        """Whether (method, raw path) is on the allow-list, so that `handle` answers it."""
        try:
            self.router.match(method, raw_path)
        except ProxyError:
            return False
        return True

    # The entry point -----------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
        shape = self.router.shape_for(raw_path)
        ctx = _Ctx(started=started, method=request.method, path=request.scope["path"])
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=CORS_PREFLIGHT)
        dialect: Dialect | None = None
        try:
            match = self.router.match(request.method, raw_path)
            service = self.services[match.service]
            dialect = service.dialect
            endpoint = ctx.endpoint = match.endpoint
            shape = endpoint.shape
            ctx.service, ctx.params = match.service, match.params
            if self.owner is not None:
                self.owner.check_origin(request.headers)
            if self.unavailable is not None and self.unavailable():
                raise _dependency_down()
            credential = credential_from(request.headers) or dialect.client_credential(
                request.headers, request.scope.get("query_string", b"")
            )
            ctx.ip = self.client_ip(request)
            caller = ctx.caller = self.gatekeeper.identify(credential, ctx.ip)
            ctx.user, ctx.user_token = caller.label, caller.user_token
            self.ledger.saw(hashed(caller.user_token) if caller.user_token else caller.ip)
            if not service.pool:
                raise ProxyError(
                    503,
                    f"This proxy has no {service.dialect.name} key configured: set {service.key_env} "
                    "(a Space secret, or in .env) and restart.",
                    Kind.UNAVAILABLE,
                )
            if endpoint.kind == "models":
                self.gatekeeper.admit(caller, None)
                response = await self._models(service, ctx)
            elif endpoint.kind == "model":
                self.gatekeeper.admit(caller, None)
                response = await self._model(service, match.arg or "")
            else:
                response = await self._generate(request, service, endpoint, caller, ctx)
        except ProxyError as exc:
            if isinstance(exc, GuessRefused) and exc.delay:
                await asyncio.sleep(exc.delay)  # slows guessing from a locked-out address
            self._count_refusal(ctx, exc)
            response = await self._refusal_response(request, ctx, shape, exc)
        except UpstreamReply as exc:
            self._count_refusal(ctx, None, exc.status)
            if dialect is not None:
                exc.body = dialect.client_error(shape, exc.status, exc.body)
            response = self._pass_error(shape, exc)
        except ClientGone:
            if ctx.usage is None:  # not yet accounted (as a wait in the queue is): left before the reply
                self._count_refusal(ctx, None, 499, outcome="cancelled")
            response = Response(status_code=499)  # nobody is listening; for the log line only
        except Exception:
            log.exception("unexpected error on %s %s", ctx.method, log_safe(ctx.path))
            error = ProxyError(500, "The proxy failed to handle this request; it has been logged.", Kind.UPSTREAM)
            response = self.error_response(shape, error)
        response.headers["access-control-allow-origin"] = "*"
        if not isinstance(response, StreamingResponse):
            self._log(ctx, response.status_code)
        return response

    async def _generate(self, request: Request, service: Service, endpoint: Endpoint, caller, ctx: _Ctx) -> Response:
        # Cheap checks first (sizes and counts, model, family, rate limit, quota); the work that
        # grows with the body (the depth walk, translation, encoding) only for an admitted request.
        limits = self.limits
        payload, ctx.body_len = await read_json(
            request, self.max_body_bytes, lambda raw: limits.precheck(raw, endpoint.kind)
        )
        ctx.payload = payload
        model = check_model(ctx.params.get("model") or payload.get("model"))  # Gemini names it in the path
        ctx.model = model
        ctx.family = family = family_of(model, service.dialect.name)
        if not is_allowed(family, service.family_filter):
            raise ProxyError(
                403, f"The model '{model}' (family {family}) is not served by this proxy.", Kind.PERMISSION
            )
        stream = payload.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise ProxyError(400, "'stream' must be true or false.", Kind.INVALID_REQUEST)
        ctx.streamed = stream is True and endpoint.kind != "embeddings"
        limits.check_counts(payload, endpoint.kind)
        if self.owner is not None:
            await self.owner.before_upstream(ctx, payload)
        path = service.dialect.upstream_path(endpoint, model, stream is True, ctx.params)
        # Limits before any expensive work; under a quota, the reply is capped in `payload` to fit.
        admission = await self.gatekeeper.admit_request(caller, family, endpoint.kind, payload)
        try:
            if ctx.body_len < OFFLOAD_BYTES:
                upstream_payload, state, body = self._upstream_body(service, endpoint, payload)
            else:  # Python code in a thread yields the GIL every few ms: /health stays fast meanwhile
                upstream_payload, state, body = await asyncio.to_thread(self._upstream_body, service, endpoint, payload)
        except BaseException:
            self.gatekeeper.release(admission)
            raise
        reviser = self.door if endpoint.translated else service.dialect
        ticket = ctx.ticket = self.queue.ticket(ctx.service, family, caller.user_token or f"ip:{caller.ip}", model)

        def revise(status: int, parsed: Any) -> bytes | None:
            """The request fixed after an upstream 400 that names what to change (learned per model)."""
            changed = reviser.revise(endpoint, upstream_payload, status, parsed)
            return jsonx.dumps(upstream_payload) if changed else None

        async def deliver() -> tuple[Upstream, Response | None]:
            """Forward, then read a non-streamed reply: one watch on the client covers both."""
            forwarded = time.perf_counter()
            reply = await self._forward(service, endpoint, request.headers, body, model, revise, path, ticket)
            ctx.key_id, ctx.upstream_s = reply.key.id, reply.waited_s
            ctx.proxy_s = forwarded - ctx.started  # before forwarding; retries count as upstream time
            if service.dialect.streams(reply.response.headers.get("content-type", "")):
                return reply, None
            try:
                return reply, await self._complete(service, endpoint, reply, admission, ctx)
            except BaseException:
                reply.response.close()
                raise

        try:
            if ctx.streamed and self.heartbeat > 0:
                work = deliver()
                response = await self._stream_or_wait(request, work, service, endpoint, state, admission, ctx, payload)
            else:
                reply, response = await unless_client_leaves(request, deliver())
                if response is None:
                    ctx.streamed = True  # metered whatever the client asked: usage must be counted
                    response = self._stream(service, endpoint, reply, state, admission, ctx, payload)
        except BaseException as exc:
            self.gatekeeper.release(admission)  # a no-op once settled
            self.queue.done(ticket)
            if isinstance(exc, ClientGone) and ticket.queued_s and not ctx.accounted:  # left the line: counted
                self._account(ctx, admission, Usage(), 499)
            raise
        response.headers.update(admission.headers)
        return response

    def _upstream_body(self, service: Service, endpoint: Endpoint, payload: dict) -> tuple[dict, dict, bytes]:
        """The upstream's request (translated for the door), the dialect's stream state, and the
        request encoded."""
        self.limits.check_depth(payload)
        upstream_payload = self.door.request(payload) if endpoint.translated else payload
        state = service.dialect.prepare(endpoint, upstream_payload)
        try:
            return upstream_payload, state, jsonx.dumps(upstream_payload)
        except (TypeError, ValueError, RecursionError):
            raise ProxyError(400, "The request body could not be encoded as JSON.", Kind.INVALID_REQUEST) from None

    # Forwarding with retries ------------------------------------------------------------------
    async def _forward(
        self,
        service: Service,
        endpoint: Endpoint,
        headers: Any,
        body: bytes | None,
        model: str | None,
        revise: Callable[[int, Any], bytes | None] | None = None,
        path: str | None = None,
        ticket: Ticket | None = None,
    ) -> Upstream:
        """Send to the best key; on a key problem or a transient failure, try another key.

        With a `ticket`, keys come from the queue: the request waits its turn when none is free,
        and a key that answers 429 is locked until its reset while the request goes back to its
        place in line. Other failing keys are tried at most once per request, within the retry
        time budget (time in line not counted). Nothing has reached the client yet, so a retry
        that succeeds hides the failure entirely.
        """
        pool, dialect = service.pool, service.dialect
        path = path or endpoint.upstream_path or dialect.models_path
        started = time.monotonic()
        tried: set[str] = set()
        failed: set[str] = set()  # keys that failed this request other than by a rate limit
        queue = self.queue
        exclude = failed if queue.enabled else tried
        unreachable = 0
        last: Exception | None = None  # the failure to report if no key is left to try
        again: Key | None = None  # the key to retry a revised request on
        revisions = 0
        while unreachable < MAX_UNREACHABLE:
            if time.monotonic() - started - (ticket.queued_s if ticket else 0.0) >= self.retry_budget:
                break
            key, again = again, None
            if key is not None:
                if ticket is not None:
                    queue.hold(ticket, key)  # the revised request goes on the same key, at once
            elif ticket is None:
                key = pool.select(model, tried)
            else:
                try:
                    key = await queue.acquire(ticket, exclude)
                except QueueTimeout as exc:
                    raise _queue_timeout(dialect.name, model, ticket.family, exc) from None
                except QueueFull as exc:
                    raise _queue_full(ticket.family, exc) from None
                if ticket.queued_s and self.unavailable is not None and self.unavailable():
                    queue.release(ticket)  # the database went down while it waited: not sent upstream
                    raise _dependency_down()
            if key is None:
                break
            tried.add(key.id)
            sent = time.perf_counter()
            try:
                call = Call(endpoint.method, path, key.secret, service.base_url, body, headers, model)
                out = await dialect.target(call)
                response = await upstream.send(self._session(), endpoint.method, out.url, out.headers, out.body)
            except TimeoutError:
                if ticket is not None:
                    queue.release(ticket)
                failed.add(key.id)
                unreachable += 1
                pool.apply(key, _RETRYABLE)
                last = ProxyError(504, f"The {dialect.name} upstream did not answer in time.", Kind.TIMEOUT)
                continue
            except upstream.RedirectNotFollowed:
                if ticket is not None:
                    queue.release(ticket)
                raise ProxyError(
                    502,
                    f"The {dialect.name} upstream answered with a redirect, which this proxy never follows.",
                    Kind.UPSTREAM,
                ) from None
            except upstream.NETWORK_ERRORS as exc:
                if ticket is not None:
                    queue.release(ticket)
                failed.add(key.id)
                unreachable += 1
                pool.apply(key, _RETRYABLE)
                last = ProxyError(
                    502, f"Could not reach the {dialect.name} upstream ({type(exc).__name__}).", Kind.UPSTREAM
                )
                continue
            if response.status < 400:
                pool.apply(key, _OK)
                if ticket is not None:
                    queue.answered(ticket, response.headers)
                return Upstream(response, key, time.perf_counter() - sent)
            raw, parsed = await upstream.read_error_body(response)
            outcome = dialect.classify(response.status, response.headers, parsed)
            pool.apply(key, outcome, model)
            if ticket is not None:
                queue.release(ticket)
            if outcome.verdict is not Verdict.RATE_LIMITED:
                failed.add(key.id)  # a rate-limited key rests until its reset, then may serve again
            if outcome.verdict is Verdict.CLIENT_ERROR:
                fixable = revise is not None and revisions < MAX_REVISIONS
                revised = revise(response.status, parsed) if fixable else None
                if revised is None:
                    raise UpstreamReply(response.status, parsed, raw)
                # Retried on the same key: once per thing the upstream refused (each learned for good).
                body, again, revisions = revised, key, revisions + 1
                continue
            if outcome.verdict is Verdict.RETRYABLE:
                if response.status < 500 and isinstance(last, UpstreamReply) and last.status == response.status:
                    # Two keys refused alike (a 403 the request itself provokes): the rest would too.
                    raise UpstreamReply(response.status, parsed, raw)
                last = UpstreamReply(response.status, parsed, raw)
            # Key problems (revoked, over quota, rate-limited, model missing) are the pool's to explain.
        no_key = pool.why_none(model, tried)
        if last is not None and (no_key.status == 502 or unreachable >= MAX_UNREACHABLE):
            raise last
        headers_out = {"retry-after": str(int(no_key.retry_after + 0.999))} if no_key.retry_after else None
        kind = {429: Kind.RATE_LIMIT, 404: Kind.NOT_FOUND}.get(no_key.status, Kind.UNAVAILABLE)
        code = "model_not_found" if no_key.status == 404 else None
        raise ProxyError(no_key.status, no_key.message, kind, headers=headers_out, code=code)

    # Replies ----------------------------------------------------------------------------------
    async def _complete(
        self, service: Service, endpoint: Endpoint, reply: Upstream, admission: Admission, ctx: _Ctx
    ) -> Response:
        response = reply.response
        read_from = time.perf_counter()
        try:
            raw = await upstream.read_body(response, self.max_reply_bytes)
        except upstream.ReplyTooLarge:
            response.close()
            raise ProxyError(
                502,
                f"The {service.dialect.name} upstream's reply is larger than this proxy relays "
                f"({self.max_reply_bytes} bytes, MAX_REPLY_BYTES); ask for a stream or a smaller reply.",
                Kind.UPSTREAM,
            ) from None
        except (TimeoutError, *upstream.NETWORK_ERRORS) as exc:
            status, kind = (504, Kind.TIMEOUT) if isinstance(exc, asyncio.TimeoutError) else (502, Kind.UPSTREAM)
            raise ProxyError(status, f"The {service.dialect.name} upstream broke off its reply.", kind) from None
        finally:
            response.release()
        try:
            body = jsonx.loads(raw)
        except (ValueError, RecursionError):
            body = None
        try:
            usage = service.dialect.usage_of(body) or Usage()
        except (TypeError, ValueError, AttributeError, OverflowError):
            log.warning("the %s upstream sent a malformed usage object", service.dialect.name)
            usage = Usage(estimate_tokens(ctx.body_len), estimate_tokens(len(raw)), estimated=True)
        read_s = time.perf_counter() - read_from
        self._account(ctx, admission, usage, response.status)
        if self.owner is not None:
            self.owner.replied(ctx, body)
        await self._committed()
        if endpoint.translated and isinstance(body, dict):
            raw = jsonx.dumps(self.door.response(body))
        headers = self.redact.headers(upstream.pick_headers(response.headers, service.dialect.response_headers))
        reply_ = Response(self.redact.body(raw), response.status, headers=headers, media_type="application/json")
        ctx.proxy_s += time.perf_counter() - read_from - read_s  # after the upstream's last byte
        return reply_

    def _stream(
        self,
        service: Service,
        endpoint: Endpoint,
        reply: Upstream,
        state: dict,
        admission: Admission,
        ctx: _Ctx,
        payload: dict,
    ) -> StreamingResponse:
        ctx.streamed = True
        run = (service, endpoint, reply, state, admission, ctx, payload)
        direct = partial(self._relay_direct, *run) if DirectRelay.supports(reply.response) else None
        headers = self.redact.headers(upstream.pick_headers(reply.response.headers, service.dialect.response_headers))
        headers.update(STREAM_HEADERS)
        return RelayResponse(self._relay(*run), direct, headers)

    def _relay_open(self, service: Service, endpoint: Endpoint, state: dict, ctx: _Ctx, payload: dict):
        """A stream's relay (meter, renderer, redaction) and prompt logging's copy of it."""
        dialect = service.dialect
        meter = dialect.meter(endpoint, state)
        render = None
        stream_error = getattr(meter, "stream_error", None) or dialect.stream_error
        if endpoint.translated:
            render, stream_error = self.door.stream(payload)
        relay = upstream.EventRelay(meter, render, stream_error, redact=self.redact, decode=dialect.stream_decoder())
        if self.metrics is not None:
            self.metrics.stream_started(ctx.service)
        return relay, (self.owner.tap(ctx) if self.owner is not None else None)

    async def _relay(
        self, service: Service, endpoint: Endpoint, reply: Upstream, state: dict, admission: Admission,
        ctx: _Ctx, payload: dict,
    ):  # fmt: skip
        """The upstream's events, relayed as an async iteration (any ASGI server); heartbeats
        while it is silent; accounted at the end."""
        relay, tap = self._relay_open(service, endpoint, state, ctx, payload)
        status = 200
        delivered = False
        events = None
        try:
            events = upstream.relay_events(reply.response, relay, self.heartbeat)
            async for chunk in events:
                if ctx.first_byte_s is None:
                    ctx.first_byte_s = time.perf_counter() - ctx.started
                yield chunk
                delivered = True
                if tap is not None:
                    tap.feed(chunk)
            if not relay.meter.finished:
                status = 502
        except BaseException as exc:
            # The client went away; if the whole answer had reached it, it was served all the same.
            # Anything else is a failure of the proxy's own (its traceback is uvicorn's to log).
            status = _relay_failed(exc, relay.meter.finished)
            if events is not None:
                await events.aclose()  # closes the upstream connection now, not when collected
            raise
        finally:
            await self._relay_close(ctx, admission, relay.meter, status, delivered)

    async def _relay_direct(
        self, service: Service, endpoint: Endpoint, reply: Upstream, state: dict, admission: Admission,
        ctx: _Ctx, payload: dict, client: ClientStream, receive,
    ) -> None:  # fmt: skip
        """The same relay by callbacks, straight to uvicorn's transport (proxy/relay.py)."""
        relay, tap = self._relay_open(service, endpoint, state, ctx, payload)
        status = 200
        direct = DirectRelay(reply.response, relay, client, self.heartbeat, tap.feed if tap is not None else None)
        try:
            await direct.run(receive)
            if not relay.meter.finished:
                status = 502
        except BaseException as exc:
            status = _relay_failed(exc, relay.meter.finished)
            raise
        finally:
            if direct.first_write is not None:
                ctx.first_byte_s = direct.first_write - ctx.started
            await self._relay_close(ctx, admission, relay.meter, status, direct.delivered)

    async def _relay_close(self, ctx: _Ctx, admission: Admission, meter, status: int, delivered: bool) -> None:
        """A relayed stream's end: its usage charged (estimated when the upstream gave none),
        committed, counted and logged."""
        usage = meter.usage
        if not meter.seen_usage:
            usage = Usage(
                max(usage.tokens_in, admission.prompt_tokens or estimate_tokens(ctx.body_len)),
                max(usage.tokens_out, estimate_tokens(meter.text_chars)),
                estimated=True,
            )
        # A stream cut short still charges what reached the client before the break.
        self._account(ctx, admission, usage, status, charge=delivered and status == 502)
        try:
            if status != 499:
                await self._committed()
        except ProxyError:  # the database is down: delivered, but not to be taken as complete
            log.warning("a stream's usage could not be committed (the database is down): its end is withheld")
            if status != 500:  # else a failure of the proxy's own is on its way up, and ends it
                raise Unacknowledged() from None
        finally:
            if self.metrics is not None:
                self.metrics.stream_ended(ctx.service)
            self._log(ctx, status)


def _relay_failed(exc: BaseException, finished: bool) -> int:
    """The status a relayed stream ends with when `exc` ended it: the client leaving (cancelled,
    closed, ClientGone) is 499, or 200 if the whole answer had reached it; an error of the proxy's
    own is 500."""
    if isinstance(exc, Exception) and not isinstance(exc, ClientGone):
        return 500
    return 200 if finished else 499


@dataclass
class _Ctx:
    """What one request has learned so far, for accounting and the log line."""

    started: float
    method: str
    path: str
    service: str = ""
    endpoint: Endpoint | None = None
    params: Any = field(default_factory=dict)  # values the route took from the path (the model)
    model: str | None = None
    family: str | None = None
    streamed: bool = False
    key_id: str | None = None
    user: str | None = None
    usage: Usage | None = None
    accounted: bool = False  # its outcome and usage are in the ledger (`_account`)
    body_len: int = 0
    ip: str = ""
    caller: Any = field(default=None, repr=False)
    reply: Any = field(default=None, repr=False)  # the reply's text, kept only for prompt logging
    payload: dict | None = None
    ticket: Ticket | None = None
    user_token: str | None = field(default=None, repr=False)
    upstream_s: float = 0.0  # the successful try's wait for response headers
    proxy_s: float = 0.0  # the proxy's own time before forwarding and after the upstream's reply
    first_byte_s: float | None = None

    @property
    def queue_ms(self) -> float:
        return round(self.ticket.waited_s * 1000, 1) if self.ticket is not None else 0.0


def _queue_timeout(service: str, model: str | None, family: str, exc: QueueTimeout) -> ProxyError:
    return ProxyError(
        429,
        f"Waited {exc.waited_s:.0f} s in the queue for a free {service} key for '{model}' ({family}), the most "
        f"this proxy waits (QUEUE_TIMEOUT={exc.timeout_s:g} s): every key that can serve it stayed rate-limited "
        "or busy. Try again later.",
        Kind.RATE_LIMIT,
        headers={"retry-after": "30", "x-should-retry": "false"},
        code="queue_timeout",
    )


def _queue_full(family: str, exc: QueueFull) -> ProxyError:
    wait = max(1, int(exc.estimate_s + 0.999))
    return ProxyError(
        429,
        f"The queue for {family} on this proxy is full ({exc.waiting} requests waiting); the expected wait is "
        f"about {wait} s. Try again later.",
        Kind.RATE_LIMIT,
        headers={"retry-after": str(wait)},
        code="queue_full",
    )


_OK = Outcome(Verdict.OK)
_RETRYABLE = Outcome(Verdict.RETRYABLE)
