"""create_app(settings): the proxy's FastAPI app — routes, lifespan, and the public status."""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy import upstream
from proxy.access import Access, build_access
from proxy.access.abuse import ip_gate
from proxy.access.client_ip import TrustedProxies
from proxy.access.gatekeeper import Gatekeeper, credential_from
from proxy.access.queue import RequestQueue
from proxy.access.ratelimit import FailureGuard, network_of
from proxy.admin import admin_router, me_router
from proxy.config import Settings
from proxy.errors import Redactor
from proxy.keys.checker import KeyChecker
from proxy.keys.pool import KeyPool
from proxy.limits import RequestLimits
from proxy.metrics import Metrics
from proxy.owner import Owner
from proxy.owner_admin import owner_routes
from proxy.page_limits import limit_body
from proxy.pipeline import Pipeline, Service
from proxy.pow_routes import pow_router
from proxy.prices import cost, price_table
from proxy.providers.registry import services_from
from proxy.state import Shared, share
from proxy.state.health import Dependencies
from proxy.store import SQLiteStore
from proxy.usage import UsageEvent, UsageLedger

log = logging.getLogger("proxy")

LOOPBACK = frozenset({"127.0.0.1", "::1"})
INTERNAL_HEADER = "x-proxy-internal"  # never forwarded upstream: not on any header allow-list
CLIENT_IP_HEADER = "x-proxy-client-ip"

INFO_PASSWORD_HEADER = "x-service-info-password"  # or Authorization: Bearer, for GET /status

PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@dataclass
class Runtime:
    """Everything the running proxy holds; built once from the settings."""

    settings: Settings
    services: dict[str, Service]
    gatekeeper: Gatekeeper
    ledger: UsageLedger
    redactor: Redactor
    access: Access
    owner: Owner
    started_at: float = field(default_factory=time.time)
    session: aiohttp.ClientSession | None = None
    checker: KeyChecker | None = None
    queue: RequestQueue | None = None
    dependencies: Dependencies = field(default_factory=Dependencies)
    metrics: Metrics | None = None
    shared: Shared | None = None
    # Lets the page's own calls (from this machine) say which visitor they act for.
    internal_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    info_guard: FailureGuard = field(default_factory=lambda: FailureGuard(limit=10, window_s=300, lockout_s=300))
    admin_guard: FailureGuard | None = None  # None: the admin API's own (proxy/admin.py)
    _status_cache: dict[str, tuple[float, dict]] = field(default_factory=dict, repr=False)
    trusted_proxies: TrustedProxies | None = None

    def __post_init__(self) -> None:
        if self.trusted_proxies is None:
            self.trusted_proxies = TrustedProxies.parse(self.settings.trusted_proxies, on_space=self.settings.on_space)

    def connection_refused(self, why: str) -> None:
        """The connection guard refused a client (proxy/guard.py: too slow, headers too large, too
        many connections): counted with every other outcome, and in Prometheus."""
        self.ledger.count("refused: " + why.replace("_", " "))
        if self.metrics is not None:
            self.metrics.connection_refused(why)

    def client_ip(self, request: Any) -> str:
        """The caller's IP, for per-IP limits and lockouts.

        Believed, in order: the page's own calls, which prove themselves with a per-process secret
        and arrive from this machine; else the X-Forwarded-For entry the trusted front proxies
        vouch for (TRUSTED_PROXIES; on a Space by default the Space's own front proxy, which
        connects from a private network); else the socket peer.
        """
        peer = request.client.host if request.client else "unknown"
        headers = request.headers
        if peer in LOOPBACK:
            vouched = headers.get(CLIENT_IP_HEADER)
            proof = headers.get(INTERNAL_HEADER)
            if vouched and proof and hmac.compare_digest(proof.encode(), self.internal_secret.encode()):
                return vouched[:64]
        assert self.trusted_proxies is not None
        return self.trusted_proxies.client_of(peer, headers.get("x-forwarded-for"))

    def page_headers(self, request: Any) -> dict[str, str]:
        """Headers the page adds to the calls it makes for a visitor: who the visitor is, vouched."""
        return {CLIENT_IP_HEADER: self.client_ip(request), INTERNAL_HEADER: self.internal_secret}

    def get_session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = upstream.create_session(self.settings)
        return self.session

    def endpoints(self, base_url: str) -> dict[str, str]:
        """The public base URL of each service: the Space's own host, else the given base URL."""
        host = self.settings.public_host
        root = f"https://{host}" if host else base_url.rstrip("/")
        return {name: f"{root}/proxy/{name}{_prefix(s.dialect.route_prefix)}/v1" for name, s in self.services.items()}

    def status(self, base_url: str = "", *, full: bool = True) -> dict:
        """The public snapshot served at /status and read by the UI. It holds no secret.
        `full=False`: only what anyone may see when SERVICE_INFO_PASSWORD hides the rest.

        The full one is built at most once per STATUS_CACHE_SECONDS, however many visitors poll
        it and whatever Host they name (only the endpoints follow the base URL): it walks every
        key and the usage series, work the proxy's requests must not wait behind. The caller must
        not change the dict it gets (a shallow copy; the nested values are shared)."""
        if not full:
            return {**self._public_status(base_url), "locked": True}
        now = time.monotonic()
        cached = self._status_cache.get("")
        if cached is None or now - cached[0] >= self.settings.status_cache_seconds:
            cached = self._status_cache[""] = (now, self._build_status(""))
        return {**cached[1], "endpoints": self.endpoints(base_url)}

    def _public_status(self, base_url: str) -> dict:
        return {
            "uptime_s": round(time.time() - self.started_at, 1),
            "title": self.settings.title,
            "gatekeeper": self.settings.auth_mode,
            "endpoints": self.endpoints(base_url),
            "greeting": self.settings.greeting,
            **self.owner.public_status(),
        }

    def _build_status(self, base_url: str) -> dict:
        usage = self.ledger.snapshot()
        if self.settings.show_token_costs:
            add_costs(usage, price_table(self.settings.token_prices))
        return {
            **self._public_status(base_url),
            "keys": {name: service.pool.snapshot() for name, service in self.services.items()},
            "usage": {**usage, **self.ledger.activity()},
            "queue": self.queue.snapshot() if self.queue is not None else {},
        }

    def info_password_ok(self, given: str | None, ip: str) -> bool:
        """Whether `given` opens the status and usage (always, without SERVICE_INFO_PASSWORD).
        Wrong guesses lock the address out for a while, as for every other credential: while it
        is locked, wrong passwords are refused unchecked, the right one still works (many
        visitors may share one address) and resets nothing (it must not launder guesses)."""
        wanted = self.settings.service_info_password
        if not wanted:
            return True
        if given and hmac.compare_digest(given.strip().encode(), wanted.encode()):
            return True
        client = network_of(ip)
        if given and self.info_guard.retry_after(client) is None:
            self.info_guard.failed(client)
        return False


class ProxyApp(FastAPI):
    """FastAPI, except that allow-listed proxy requests go straight to the pipeline.

    The pipeline renders its own errors, so FastAPI's middleware stack and router (a dozen ASGI
    layers, telemetry checks and route matching per request) only add cost there: about a
    quarter of the proxy's CPU per request. Anything else, including other routes under /proxy
    (GET /proxy/me) and paths off the allow-list, takes the usual way.
    """

    proxy_handler: Callable[[Request], Awaitable[Response]] | None = None
    proxy_serves: Callable[[str, bytes], bool] | None = None
    page_max_body_bytes: int | None = None  # every other route's body limit (proxy/page_limits.py)
    gate: Callable[[Scope], Response | None] | None = None  # IP blacklist / admin whitelist

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.gate is not None and scope["type"] in ("http", "websocket"):
            refusal = self.gate(scope)
            if refusal is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await refusal(scope, receive, send)
                return
        handler, serves = self.proxy_handler, self.proxy_serves
        if (
            handler is not None
            and serves is not None
            and scope["type"] == "http"
            and scope["path"].startswith("/proxy/")
            and serves(scope["method"], scope.get("raw_path") or scope["path"].encode())
        ):
            scope["app"] = self
            response = await handler(Request(scope, receive, send))
            await response(scope, receive, send)
            return
        if scope["type"] == "http" and self.page_max_body_bytes is not None:
            await limit_body(super().__call__, scope, receive, send, self.page_max_body_bytes)
            return
        await super().__call__(scope, receive, send)


def build_runtime(settings: Settings, redactor: Redactor | None = None) -> Runtime:
    """Open the store (restoring it from the Hub if configured), build the pools and the gate.
    `redactor`: the one logging already uses (building one for 1,000 keys takes ~0.2 s)."""
    redactor = redactor or Redactor(settings.secrets)
    access = build_access(settings)
    services: dict[str, Service] = {}
    for spec in services_from(settings):
        name, dialect = spec.name, spec.dialect
        pool = KeyPool(name, spec.keys, dialect.key_prefix, family_filter=settings.model_family_filter)
        pool.restore(access.store.load_key_states(name))  # what earlier runs learned
        pool.on_change = _saving(access, pool)
        pool.on_lost = _losing(access, pool)
        pool.max_in_flight = settings.key_max_concurrency
        services[name] = Service(
            dialect, spec.base_url, pool, spec.key_env, family_filter=settings.model_family_filter, check=spec.check
        )
    ledger = UsageLedger(sink=_persisting(access))
    ledger.restore(*access.store.usage_totals())
    runtime = Runtime(
        settings=settings,
        services=services,
        gatekeeper=access.gatekeeper,
        ledger=ledger,
        redactor=redactor,
        access=access,
        owner=Owner(settings, access.store, access.users),
    )
    runtime.checker = KeyChecker(runtime.services, runtime.get_session, settings)
    runtime.queue = queue = RequestQueue(
        {name: service.pool for name, service in services.items()},
        timeout=settings.queue_timeout,
        max_length=settings.max_queue_length,
        max_connections=settings.upstream_max_connections,
    )
    for service in services.values():
        service.pool.on_change = _waking(service.pool.on_change, queue)
    runtime.metrics = Metrics(
        multiprocess=settings.workers > 1,
        key_states=lambda: {name: service.pool.snapshot() for name, service in runtime.services.items()},
        queue=queue.snapshot,
    )
    store = access.store
    if not isinstance(store, SQLiteStore):
        runtime.dependencies.add("database", lambda: None if store.healthy else (store.last_error or "unavailable"))
    elif access.commits is not None:  # SQLite: down while the disk refuses the usage (proxy/groupcommit.py)
        runtime.dependencies.add("database", access.commits.problem)
    pools = {name: service.pool for name, service in services.items()}
    runtime.shared = share(settings, store, access.users, pools, runtime.dependencies, access.gatekeeper)
    if runtime.shared.sync is not None:
        runtime.shared.sync.attach_ledger(ledger)
    runtime.shared.share_queue(queue)
    # Guessing the admin key or the service info password: counted and locked out on every instance.
    runtime.info_guard = runtime.shared.guard("info", limit=10, window_s=300, lockout_s=300)
    runtime.admin_guard = runtime.shared.guard("admin", limit=10, window_s=300, lockout_s=300)
    if runtime.shared.page_secret:  # the page's calls may land on any instance behind the balancer
        runtime.internal_secret = runtime.shared.page_secret
    return runtime


def _waking(on_change, queue: RequestQueue):
    """A key changed (checked, restored): requests waiting in line may take it now."""

    def changed(key) -> None:
        if on_change is not None:
            on_change(key)
        queue.wake()

    return changed


def _saving(access: Access, pool: KeyPool):
    """The pool's on_change: key states go to the store, so a restart knows them at once."""

    def save(key) -> None:
        access.store.save_key_state(pool.service, key.id, pool.export_state(key))

    return save


def _losing(access: Access, pool: KeyPool):
    """The pool's on_lost: one row per model a key lacks."""

    def lost(key, model: str) -> None:
        access.store.add_lost_model(pool.service, key.id, model)

    return lost


def _durable(access: Access) -> Callable[[], Awaitable[None]] | None:
    """What the pipeline awaits before answering: the request's writes committed."""
    if access.commits is not None:  # SQLite: this turn's batch (proxy/groupcommit.py)
        return access.commits.committed
    return None if isinstance(access.store, SQLiteStore) else access.store.committed


def _persisting(access: Access):
    """The ledger's sink: usage goes to the store before the reply is finished."""

    add = access.commits.add_usage if access.commits is not None else access.store.add_usage

    def sink(event: UsageEvent) -> None:
        try:
            add(event)
        except Exception:  # logged; whether the request is acknowledged is its commit's to say (`durable`)
            log.exception("could not save usage to the store")

    return sink


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The proxy app without the UI: /health, /status and everything under /proxy."""
    runtime = runtime or build_runtime(settings)

    client_ip = runtime.client_ip

    pipeline = Pipeline(
        runtime.services,
        runtime.gatekeeper,
        runtime.ledger,
        runtime.redactor,
        runtime.get_session,
        max_body_bytes=settings.max_body_bytes,
        retry_budget=settings.retry_time_budget,
        client_ip=client_ip,
        default_max_tokens=settings.anthropic_default_max_tokens,
        limits=RequestLimits(
            max_messages=settings.max_messages,
            max_content_parts=settings.max_content_parts,
            max_tools=settings.max_tools,
            max_json_depth=settings.max_json_depth,
        ),
        max_reply_bytes=settings.max_reply_bytes,
        errors_as_chat=settings.errors_as_chat,
        queue=runtime.queue,
        heartbeat=settings.heartbeat_interval,
        owner=runtime.owner,
        durable=_durable(runtime.access),
        unavailable=runtime.dependencies.problem if runtime.dependencies else None,
        metrics=runtime.metrics,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.get_session()
        runtime.access.start()
        runtime.owner.start()
        if runtime.shared is not None:
            await runtime.shared.start()
        if settings.check_keys and runtime.checker is not None:
            await runtime.checker.start()
        log.info(
            "proxy ready: %s",
            ", ".join(f"{n} ({len(s.pool)} keys)" for n, s in runtime.services.items()) or "no service",
        )
        try:
            yield
        finally:
            if runtime.checker is not None:
                await runtime.checker.stop()
            if runtime.session is not None:
                await runtime.session.close()
            await runtime.owner.aclose()
            if runtime.shared is not None:
                await runtime.shared.aclose()
            await runtime.access.aclose()

    app = ProxyApp(title=settings.title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.proxy_handler, app.proxy_serves = pipeline.handle, pipeline.serves
    app.page_max_body_bytes = settings.page_max_body_bytes
    app.gate = ip_gate(runtime.owner.rules, client_ip, pipeline.router.shape_for, runtime.owner.abuse.refused)

    async def health(request: Request) -> Response:
        if not runtime.dependencies:
            return JSONResponse({"status": "ok"})
        report = runtime.dependencies.report()
        down = any(state != "ok" for state in report.values())
        return JSONResponse({"status": "unavailable" if down else "ok", **report}, status_code=503 if down else 200)

    async def status(request: Request) -> Response:
        given = request.headers.get(INFO_PASSWORD_HEADER) or credential_from(request.headers)
        full = runtime.info_password_ok(given, client_ip(request))
        return JSONResponse(runtime.status(_base_url(request), full=full))

    app.router.routes.append(Route("/health", health, methods=["GET"]))
    app.router.routes.append(Route("/status", status, methods=["GET"]))
    if runtime.metrics is not None:
        app.router.routes.append(Route("/metrics", runtime.metrics.route(settings.metrics_key), methods=["GET"]))
    app.include_router(
        admin_router(
            runtime.access.users,
            admin_key=settings.admin_key,
            store=runtime.access.store,
            ledger=runtime.ledger,
            recheck=runtime.checker.recheck if runtime.checker else None,
            guard=runtime.admin_guard,
            client_ip=client_ip,
            extend=owner_routes(runtime.owner, client_ip),
        ),
        prefix="/admin/api",
    )
    if runtime.owner.pow is not None:
        app.include_router(pow_router(runtime.owner.pow, client_ip))
    app.include_router(me_router(runtime.gatekeeper, client_ip=client_ip))  # before the /proxy catch-all
    app.router.routes.append(Route("/proxy/{path:path}", pipeline.handle, methods=PROXY_METHODS))
    app.router.routes.append(Route("/proxy", pipeline.handle, methods=PROXY_METHODS))
    return app


def add_costs(usage: dict, prices: dict[str, tuple[float, float]]) -> None:
    """Estimated dollars per family (`cost_usd`, None without a price) and in total."""
    total = 0.0
    for family, counts in usage.get("by_family", {}).items():
        value = cost(prices, family, counts.get("tokens_in", 0), counts.get("tokens_out", 0))
        counts["cost_usd"] = None if value is None else round(value, 4)
        total += value or 0.0
    usage["cost_usd"] = round(total, 4)


def _prefix(route_prefix: str) -> str:
    return f"/{route_prefix}" if route_prefix else ""


def _base_url(request: Request) -> str:
    """The address the client used, honouring the scheme a front proxy reports."""
    scheme = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("host") or request.url.netloc
    return f"{scheme}://{host}"
