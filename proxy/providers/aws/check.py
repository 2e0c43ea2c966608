"""Checking AWS credentials for Bedrock Claude, for next to nothing.

1. `GET /logging/modelinvocations` (control plane): refused credentials (UnrecognizedClient,
   InvalidSignature) revoke. A logging configuration that delivers text means every prompt is
   recorded in the owner's account: such credentials are refused unless ALLOW_AWS_LOGGING=true, and
   so are credentials not allowed to read the configuration (nobody can say it is off).
2. `GET /inference-profiles` (system-defined): the profile to call each model through from the key's
   region (`jp.` in Tokyo where it exists, else `apac.`, else `global.`), used from then on.
3. For each known Claude model, an `invoke` with an invalid body (`max_tokens: -1`), in the key's
   region: a 400 ValidationException means the model is enabled there (nothing is generated or
   billed); 403 AccessDenied or 404 means it is not.
"""

from __future__ import annotations

import asyncio

from proxy.keys.pool import CheckResult, Verdict
from proxy.keys.probe import Probe, Reply
from proxy.providers.aws.models import learned_profiles
from proxy.providers.claude_hosted import CLAUDE_MODELS, cloud_message

INVALID = {"max_tokens": -1, "messages": []}
# 400s that are about the model id, not the body: the model is not there (or not on demand) for this key.
NOT_THE_BODY = ("model identifier is invalid", "on-demand throughput", "inference profile")


def logging_on(reply: Reply) -> bool:
    config = reply.body.get("loggingConfig") if isinstance(reply.body, dict) else None
    if not isinstance(config, dict) or not config:
        return False
    return config.get("textDataDeliveryEnabled", True) is not False


async def check(probe: Probe, *, allow_logging: bool = False) -> CheckResult:
    logging = await probe.get("/logging/modelinvocations")
    outcome = probe.classify(logging)
    if outcome.verdict is Verdict.REVOKED:
        return CheckResult(Verdict.REVOKED, detail=f"credentials refused ({logging.status})")
    if logging.status >= 500 or outcome.verdict is Verdict.RATE_LIMITED:
        return CheckResult(Verdict.RETRYABLE, retry_after=outcome.retry_after, detail=f"logging {logging.status}")
    logged = logging_on(logging) if logging.status == 200 else None
    if logged is not False and not allow_logging:
        why = "invocation logging is on" if logged else "invocation logging status unreadable"
        return CheckResult(Verdict.REVOKED, detail=f"{why}; set ALLOW_AWS_LOGGING=true to use these credentials")
    listing = await probe.get("/inference-profiles?maxResults=1000&typeEquals=SYSTEM_DEFINED")
    if listing.status == 200 and isinstance(listing.body, dict):
        items = listing.body.get("inferenceProfileSummaries") or []
        ids = [str(i.get("inferenceProfileId") or "") for i in items if isinstance(i, dict)]
        region = probe.dialect.entry(probe.secret).region  # type: ignore[attr-defined]
        probe.dialect.profiles[region] = learned_profiles(ids, region)  # type: ignore[attr-defined]
    replies = await asyncio.gather(*(probe.post(f"/model/{m}/invoke", INVALID) for m in CLAUDE_MODELS))
    enabled: set[str] = set()
    for model, reply in zip(CLAUDE_MODELS, replies, strict=True):
        verdict = probe.classify(reply).verdict
        if verdict is Verdict.REVOKED:
            return CheckResult(Verdict.REVOKED, detail=f"invoke {reply.status}")
        about_model = any(text in cloud_message(reply.body).lower() for text in NOT_THE_BODY)
        if (reply.status == 400 and not about_model) or verdict is Verdict.RATE_LIMITED:
            enabled.add(model)
    tier = "logged" if logged else None
    return CheckResult(Verdict.OK, models=frozenset(enabled), tier=tier, detail=f"{len(enabled)} Claude models enabled")
