"""Checking a Vertex service account: the token mint works, and which Claude models are enabled.

1. Mint a token (a signed JWT exchanged at GCP_TOKEN_URL): `invalid_grant` and the like revoke.
2. For each known Claude model, `:rawPredict` with an invalid body (`max_tokens: -1`) in the
   account's region: Claude's 400 means the model is enabled for the project there (nothing is
   generated or billed); 404 means it is not; 403 without access to Vertex revokes.
"""

from __future__ import annotations

import asyncio

from proxy.keys.pool import CheckResult, Verdict
from proxy.keys.probe import Probe
from proxy.providers.claude_hosted import CLAUDE_MODELS
from proxy.providers.gcp.token import TokenRefused

INVALID = {"max_tokens": -1, "messages": []}


async def check(probe: Probe) -> CheckResult:
    dialect = probe.dialect
    try:
        await dialect.tokens.token(dialect.entry(probe.secret))  # type: ignore[attr-defined]
    except TokenRefused as exc:
        verdict = Verdict.RETRYABLE if exc.status >= 500 or exc.status == 429 else Verdict.REVOKED
        return CheckResult(verdict, detail=f"token {exc.status} {exc.error}")
    replies = await asyncio.gather(*(probe.post(f"/model/{m}/invoke", INVALID) for m in CLAUDE_MODELS))
    enabled: set[str] = set()
    for model, reply in zip(CLAUDE_MODELS, replies, strict=True):
        verdict = probe.classify(reply).verdict
        if verdict is Verdict.REVOKED:
            return CheckResult(Verdict.REVOKED, detail=f"rawPredict {reply.status}")
        if reply.status == 400 or verdict is Verdict.RATE_LIMITED:
            enabled.add(model)
    return CheckResult(Verdict.OK, models=frozenset(enabled), detail=f"{len(enabled)} Claude models enabled")
