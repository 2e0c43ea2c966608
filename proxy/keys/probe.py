"""What every provider's key check shares: bounded calls with one key, and reading their replies."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from proxy.families import NON_TEXT, family_of
from proxy.keys.pool import Outcome, Verdict

if TYPE_CHECKING:
    from proxy.providers.base import Dialect

MAX_BODY = 4 * 1024 * 1024  # a model list is tens of kilobytes; anything larger is not one


@dataclass(slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: Any  # parsed JSON, or None


@dataclass(slots=True)
class Probe:
    """Calls to one upstream with one key, addressed and signed by the dialect as at request time."""

    session: aiohttp.ClientSession
    base_url: str
    secret: str = field(repr=False)
    dialect: Dialect
    timeout: float

    async def get(self, path: str) -> Reply:
        return await self._call("GET", path, None)

    async def post(self, path: str, payload: dict) -> Reply:
        return await self._call("POST", path, json.dumps(payload, separators=(",", ":")).encode())

    async def _call(self, method: str, path: str, body: bytes | None) -> Reply:
        from proxy.providers.base import Call

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        out = await self.dialect.target(Call(method, path, self.secret, self.base_url, body))
        async with self.session.request(
            method, out.url, headers=out.headers, data=out.body, allow_redirects=False, timeout=timeout
        ) as response:
            raw = await response.content.read(MAX_BODY)
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            return Reply(response.status, response.headers, parsed)

    def classify(self, reply: Reply) -> Outcome:
        return self.dialect.classify(reply.status, reply.headers, reply.body)


def probe_verdict(outcome: Outcome) -> Verdict:
    """What a check's probe reply says. A client error is the answer a live key gets to a
    deliberately invalid request; a missing model or a server error means: ask again later."""
    if outcome.verdict is Verdict.CLIENT_ERROR:
        return Verdict.OK
    if outcome.verdict is Verdict.MODEL_MISSING:
        return Verdict.RETRYABLE
    return outcome.verdict


def listing_verdict(outcome: Outcome) -> Verdict:
    """What a failed model listing says: revoked or over quota are final, anything else is retried."""
    if outcome.verdict in (Verdict.REVOKED, Verdict.OVER_QUOTA, Verdict.RATE_LIMITED):
        return outcome.verdict
    return Verdict.RETRYABLE


def model_ids(body: Any) -> list[str]:
    """Model ids of an OpenAI- or Anthropic-shaped list."""
    items = body.get("data") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return []
    return [str(m["id"]) for m in items if isinstance(m, dict) and m.get("id")]


def read_limits(headers: Mapping[str, str], names: Mapping[str, str]) -> dict[str, int]:
    """{label: limit} from the rate-limit headers present, e.g. {"requests": 5000}."""
    limits: dict[str, int] = {}
    for label, header in names.items():
        value = headers.get(header)
        if value is None:
            continue
        try:
            limits[label] = int(float(value))
        except ValueError:
            continue
    return limits


def tier_of(limits: Mapping[str, int], trial_max_rpm: int) -> str:
    """trial when the request limit per minute is at most `trial_max_rpm`, paid above, unknown without it."""
    rpm = limits.get("requests")
    if rpm is None:
        return "unknown"
    return "trial" if rpm <= trial_max_rpm else "paid"


def cheapest(models: Iterable[str], preferences: Iterable[str], service: str) -> str | None:
    """The first listed model matching a preferred prefix, else the first text model, else any."""
    listed = sorted(models)
    for prefix in preferences:
        for model in listed:
            if model.startswith(prefix):
                return model
    for model in listed:
        family = family_of(model, service)
        if family not in NON_TEXT and family not in ("embeddings", "fine-tune"):
            return model
    return listed[0] if listed else None
