"""create_app(settings): the proxy's FastAPI app — routes, lifespan, and the public status."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import upstream
from proxy.access.gatekeeper import Gatekeeper
from proxy.config import Settings
from proxy.errors import Redactor
from proxy.keys.pool import KeyPool
from proxy.pipeline import Pipeline, Service
from proxy.providers.anthropic import Anthropic
from proxy.providers.openai import OpenAI
from proxy.usage import UsageLedger

log = logging.getLogger("proxy")

PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@dataclass
class Runtime:
    """Everything the running proxy holds; built once from the settings."""

    settings: Settings
    services: dict[str, Service]
    gatekeeper: Gatekeeper
    ledger: UsageLedger
    redactor: Redactor
    started_at: float = field(default_factory=time.time)
    session: aiohttp.ClientSession | None = None

    def get_session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = upstream.create_session(self.settings)
        return self.session

    def endpoints(self, base_url: str) -> dict[str, str]:
        """The public base URL of each service: the Space's own host, else the given base URL."""
        host = self.settings.public_host
        root = f"https://{host}" if host else base_url.rstrip("/")
        return {name: f"{root}/proxy/{name}/v1" for name in self.services}

    def status(self, base_url: str = "") -> dict:
        """The public snapshot served at /status and read by the UI. It holds no secret."""
        return {
            "uptime_s": round(time.time() - self.started_at, 1),
            "title": self.settings.title,
            "gatekeeper": self.settings.auth_mode,
            "endpoints": self.endpoints(base_url),
            "keys": {name: service.pool.snapshot() for name, service in self.services.items()},
            "usage": self.ledger.snapshot(),
        }


def build_runtime(settings: Settings) -> Runtime:
    redactor = Redactor(settings.secrets)
    services: dict[str, Service] = {}
    for dialect, base_url, secrets, env in (
        (OpenAI(), settings.openai_base_url, settings.openai_keys, "OPENAI_KEY"),
        (Anthropic(), settings.anthropic_base_url, settings.anthropic_keys, "ANTHROPIC_KEY"),
    ):
        if dialect.name == "anthropic" and not secrets:
            continue  # Claude routes exist only when a Claude key is configured
        pool = KeyPool(dialect.name, secrets, dialect.key_prefix)
        services[dialect.name] = Service(dialect, base_url, pool, env, family_filter=settings.model_family_filter)
    return Runtime(
        settings=settings,
        services=services,
        gatekeeper=Gatekeeper(settings),
        ledger=UsageLedger(),
        redactor=redactor,
    )


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The proxy app without the UI: /health, /status and everything under /proxy."""
    runtime = runtime or build_runtime(settings)
    pipeline = Pipeline(
        runtime.services,
        runtime.gatekeeper,
        runtime.ledger,
        runtime.redactor,
        runtime.get_session,
        max_body_bytes=settings.max_body_bytes,
        retry_budget=settings.retry_time_budget,
        trust_forwarded=settings.on_space,
        default_max_tokens=settings.anthropic_default_max_tokens,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.get_session()
        log.info(
            "proxy ready: %s",
            ", ".join(f"{n} ({len(s.pool)} keys)" for n, s in runtime.services.items()) or "no service",
        )
        try:
            yield
        finally:
            if runtime.session is not None:
                await runtime.session.close()

    app = FastAPI(title=settings.title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def status(request: Request) -> Response:
        return JSONResponse(runtime.status(_base_url(request)))

    app.router.routes.append(Route("/health", health, methods=["GET"]))
    app.router.routes.append(Route("/status", status, methods=["GET"]))
    app.router.routes.append(Route("/proxy/{path:path}", pipeline.handle, methods=PROXY_METHODS))
    app.router.routes.append(Route("/proxy", pipeline.handle, methods=PROXY_METHODS))
    return app


def _base_url(request: Request) -> str:
    """The address the client used, honouring the scheme a front proxy reports."""
    scheme = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("host") or request.url.netloc
    return f"{scheme}://{host}"
