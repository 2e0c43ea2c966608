"""Shared pieces of the web UI: the context it is built from, escaping, formatting,
public base URLs and the small HTTP helper every panel uses to call the proxy."""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

SERVICE_LABELS = {
    "openai": "OpenAI",
    "anthropic": "Anthropic (Claude)",
    "google-ai": "Google AI (Gemini)",
    "deepseek": "DeepSeek",
    "xai": "xAI (Grok)",
    "mistral-ai": "Mistral AI",
    "openrouter": "OpenRouter",
    "groq": "Groq",
    "azure": "Azure OpenAI",
    "aws": "AWS Bedrock (Claude)",
    "gcp": "Google Vertex AI (Claude)",
}
# Services whose client base URL has a segment before /v1: /proxy/aws/claude/v1.
ROUTE_PREFIXES = {"azure": "openai", "aws": "claude", "gcp": "claude"}
KNOWN_SERVICES = ("openai", "anthropic")

# A host (name, IPv4 or [IPv6]) with an optional port; anything else is not shown.
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


@dataclass(frozen=True)
class UIContext:
    """Everything the UI needs from the server; the UI never reaches into proxy objects."""

    title: str
    self_url: str
    space_host: str | None
    space_id: str | None
    services: tuple[str, ...]
    auth_mode: str  # "none" | "proxy_key" | "user_token"
    status: Callable[[], dict]
    recent: Callable[[int], list[dict]]
    # Tests swap the network for an httpx.MockTransport; None means a real connection.
    transport: httpx.AsyncBaseTransport | None = None
    # Headers that tell the proxy which visitor a page call acts for, vouched by the server's own
    # secret (the server computes them; the page never sees them). None: send nothing.
    client_headers: Callable[[Any], dict[str, str]] | None = None
    # Chat models the live keys serve, per service (empty while unknown).
    models: Callable[[str], list[str]] | None = None
    # Requests and tokens per minute with their outcomes (UsageLedger.series).
    series: Callable[[], list[dict]] | None = None
    greeting: str = ""
    admin_enabled: bool = False  # an ADMIN_KEY is set
    show_costs: bool = False
    # SERVICE_INFO_PASSWORD: None when not set; else checks (typed password, gr.Request) on the server.
    info_check: Callable[[str | None, Any], bool] | None = None
    families: tuple[str, ...] = ()  # model families a token limit may name, served ones first
    # TOKEN_QUOTA_<FAMILY>: the token limits a new user gets for families left empty.
    quota_defaults: Mapping[str, int] | None = None


def served_models(ctx: UIContext, service: str) -> list[str]:
    if ctx.models is None:
        return []
    try:
        return list(ctx.models(service))
    except Exception:  # noqa: BLE001 - the page renders without them
        return []


# Cheap, capable chat models to show first, by how their id begins; newest (highest) id first.
PREFERRED_PREFIXES = (
    "gpt-4o-mini",
    "gpt-4.1-mini",
    "gpt-5-mini",
    "gpt-4o",
    "claude-haiku",
    "claude-3-5-haiku",
    "claude-sonnet",
    "claude-3-7-sonnet",
    "claude-3-5-sonnet",
)
NOT_CHAT = (
    "embedding",
    "ft:",
    "dall-e",
    "whisper",
    "tts",
    "moderation",
    "davinci",
    "babbage",
    "gpt-image",
    "realtime",
    "transcribe",
    "audio",
    "search",
    "similarity",
)


def is_chat_model(model: str) -> bool:
    name = model.lower()
    return not any(word in name for word in NOT_CHAT)


def preferred_model(models: list[str]) -> str | None:
    """The model to name in examples and preselect: a cheap chat model, else the first chat model."""
    chat = [m for m in models if is_chat_model(m)]
    for prefix in PREFERRED_PREFIXES:
        matching = sorted((m for m in chat if m == prefix or m.startswith(prefix + "-")), reverse=True)
        if matching:
            undated = [m for m in matching if not re.search(r"-\d{8}$|-\d{4}-\d{2}-\d{2}$", m)]
            return (undated or matching)[0]
    return sorted(chat)[0] if chat else None


def safe_markdown(text: str) -> str:
    """Owner-written Markdown with any HTML shown as text, never run: `<`, `>` and `&` escaped."""
    return html.escape(text or "", quote=False)


# ---------------------------------------------------------------- escaping / formatting


def esc(value: Any) -> str:
    """Escape user-provided text for Markdown: Markdown punctuation, then HTML (`<`, `>`, `&`)."""
    return html.escape(_MD_SPECIAL.sub(r"\\\1", str(value)), quote=False)


def service_label(service: str) -> str:
    return SERVICE_LABELS.get(service, service)


def service_path(service: str) -> str:
    """The OpenAI-style base path of a service on this server."""
    prefix = ROUTE_PREFIXES.get(service)
    return f"/proxy/{service}/{prefix}/v1" if prefix else f"/proxy/{service}/v1"


def fmt_time(epoch: float | None) -> str:
    if not epoch:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def fmt_date(epoch: float | None) -> str:
    if not epoch:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch))


def fmt_clock(epoch: float | None) -> str:
    if not epoch:
        return "—"
    return time.strftime("%H:%M:%S", time.gmtime(epoch))


def fmt_ago(epoch: float | None, now: float | None = None) -> str:
    if not epoch:
        return "never"
    delta = (time.time() if now is None else now) - epoch
    if delta < 0:
        return "in " + fmt_duration(-delta)
    return fmt_duration(delta) + " ago"


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def safe_status(ctx: UIContext) -> dict:
    """The status snapshot, or an empty one if the server could not produce it."""
    try:
        snapshot = ctx.status()
    except Exception:  # noqa: BLE001 - the page must render even if the snapshot fails
        return {}
    return snapshot if isinstance(snapshot, dict) else {}


def auth_hint(auth_mode: str) -> str:
    return {
        "none": "No password needed: anyone with the link can use it.",
        "proxy_key": "A proxy key (password) is needed. Ask the owner for it.",
        "user_token": "A personal user token is needed. Ask the owner for one.",
    }.get(auth_mode, "Access is restricted.")


def credential_name(auth_mode: str) -> str:
    return {"proxy_key": "proxy key", "user_token": "user token"}.get(auth_mode, "credential")


# ---------------------------------------------------------------- public base URLs


def _first_header(headers: Mapping[str, str] | None, name: str) -> str:
    if not headers:
        return ""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return (value or "").split(",")[0].strip()


def space_base_url(space_host: str | None) -> str | None:
    """`https://<first host>` from SPACE_HOST (may be a comma-separated list, may carry a scheme)."""
    if not space_host:
        return None
    first = next((h.strip() for h in space_host.split(",") if h.strip()), "")
    scheme = "https"
    if "://" in first:
        scheme, _, first = first.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            return None
    host = first.split("/")[0]
    return f"{scheme}://{host}" if host and _HOST_RE.match(host) else None


def request_base_url(headers: Mapping[str, str] | None, scheme: str = "http") -> str | None:
    """The address the browser used: its Host header, with x-forwarded-proto honoured."""
    host = _first_header(headers, "host")
    if not host or not _HOST_RE.match(host):
        return None
    proto = _first_header(headers, "x-forwarded-proto").lower() or scheme.lower()
    if proto not in ("http", "https"):
        proto = "http"
    return f"{proto}://{host}"


def forwarded_headers(ctx: UIContext, request: Any) -> dict[str, str]:
    """For calls the UI makes on a visitor's behalf: the visitor's IP, vouched by the server, so
    per-IP limits and the admin lockout see the visitor, not 127.0.0.1. A visitor's own
    X-Forwarded-For is never passed on."""
    if ctx.client_headers is None or request is None or getattr(request, "client", None) is None:
        return {}
    return ctx.client_headers(request)


def public_base_url(ctx: UIContext, request: Any = None) -> str:
    """Base URL to share: SPACE_HOST on a Space, else the request's host, else self_url."""
    from_space = space_base_url(ctx.space_host)
    if from_space:
        return from_space
    if request is not None:
        headers = getattr(request, "headers", None)
        url = getattr(request, "url", None)
        scheme = getattr(url, "scheme", None) or "http"
        try:
            from_request = request_base_url(headers, scheme)
        except Exception:  # noqa: BLE001 - odd request objects fall back to self_url
            from_request = None
        if from_request:
            return from_request
    return ctx.self_url.rstrip("/")


# ---------------------------------------------------------------- HTTP to the proxy


@dataclass(frozen=True)
class ApiResult:
    status: int  # 0 when the server could not be reached
    data: Any  # parsed JSON, or the raw text when the body is not JSON

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def auth_headers(credential: str | None, *, x_api_key: bool = False) -> dict[str, str]:
    """Headers carrying the credential the user typed (also as x-api-key, Anthropic-style)."""
    credential = (credential or "").strip()
    if not credential:
        return {}
    headers = {"Authorization": f"Bearer {credential}"}
    if x_api_key:
        headers["x-api-key"] = credential
    return headers


def http_client(ctx: UIContext, timeout: float | httpx.Timeout = 20.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=ctx.transport, timeout=timeout, follow_redirects=False)


def parse_body(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")


async def call_json(
    ctx: UIContext,
    method: str,
    path: str,
    *,
    credential: str | None = None,
    json_body: Any = None,
    timeout: float = 20.0,
    x_api_key: bool = False,
    request: Any = None,
) -> ApiResult:
    """Call this server over HTTP like any client, and never raise for network trouble.
    `request` is the visitor's gr.Request, used only to forward their IP."""
    url = ctx.self_url.rstrip("/") + path
    headers = {**forwarded_headers(ctx, request), **auth_headers(credential, x_api_key=x_api_key)}
    try:
        async with http_client(ctx, timeout) as client:
            response = await client.request(method, url, headers=headers, json=json_body)
    except httpx.HTTPError as exc:
        return ApiResult(0, f"could not reach the server ({type(exc).__name__})")
    return ApiResult(response.status_code, parse_body(response.content))


def error_message(data: Any, limit: int = 400) -> str:
    """The human part of an error body in OpenAI or Anthropic shape, unescaped, trimmed."""
    message: Any = data
    if isinstance(data, dict):
        message = data.get("error", data)
        if isinstance(message, dict):
            message = message.get("message") or message.get("type") or message
        if isinstance(message, dict):
            message = data.get("detail") or data.get("message") or json.dumps(message)[:limit]
    text = str(message if message is not None else "").strip() or "no details"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_error(status: int, data: Any) -> str:
    """A readable, escaped one-liner for a failed call (safe to render as Markdown)."""
    detail = esc(error_message(data))
    if status == 0:
        return f"Could not reach the proxy: {detail}"
    reason = {
        400: "Bad request",
        401: "Not authorised — check the key or token you entered",
        403: "Forbidden",
        404: "Not found",
        402: "Token quota spent",
        413: "Request too large",
        429: "Rate limited",
        500: "Server error",
        502: "Upstream error",
        503: "No key available right now",
        504: "Upstream timed out",
    }.get(status, "Upstream error" if status >= 500 else "Error")
    return f"{reason} ({status}): {detail}"
